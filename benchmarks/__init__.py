"""pyblend's benchmark suite (importable as ``pyblend.benchmarks``); ``pyblend bench`` / ``make bench`` run it."""
