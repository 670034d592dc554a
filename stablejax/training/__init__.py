"""stablejax.training."""
