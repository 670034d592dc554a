"""stablejax.data."""
