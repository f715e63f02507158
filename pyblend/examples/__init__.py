"""Runnable examples on real data: ``python -m pyblend.examples.<name> --help``."""
