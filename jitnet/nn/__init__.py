"""Neural-network layers, losses and initializers."""
from . import functional

__all__ = ["functional"]
