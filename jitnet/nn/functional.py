"""Neural-network functions: activations, softmax family, losses."""
from __future__ import annotations

from .. import ops
from ..ops import log_softmax, relu, sigmoid, softmax, softplus, tanh

__all__ = ["relu", "sigmoid", "tanh", "softplus", "softmax", "log_softmax"]
