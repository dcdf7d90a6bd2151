"""Reverse-mode automatic differentiation: the primitive registry, apply(), the tape and gradients."""
from .core import (REGISTRY, Node, Primitive, apply, backward, current_interpreter, enable_grad, grad,
                   gradients, is_grad_enabled, no_grad, push_interpreter, value_and_grad)
from .sparse import IndexedSlices

__all__ = ["REGISTRY", "Node", "Primitive", "apply", "backward", "current_interpreter", "enable_grad", "grad",
           "IndexedSlices", "gradients", "is_grad_enabled", "no_grad", "push_interpreter", "value_and_grad"]
