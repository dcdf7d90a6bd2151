"""jitnet: a deep-learning library whose tensor ops and gradients are Numba kernels."""
__version__ = "0.1.0"
