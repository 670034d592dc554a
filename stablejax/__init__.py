"""stablejax: StABlE Training of machine-learning force fields in JAX.

Public API is re-exported here by hand.
"""

__version__ = "0.1.0"
