"""stablejax.md."""
