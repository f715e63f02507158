"""pyblend ops."""
