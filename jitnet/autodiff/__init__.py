"""Reverse-mode automatic differentiation.

The package's own names are those of its lowest layer, :mod:`jitnet.autodiff.core` (the primitive registry,
``apply()``, the tape, ``no_grad``), which tensors and ops are built on; importing any ``jitnet.autodiff.*``
module loads this file first, so it imports nothing from the layers above. The gradients themselves
(``backward``, ``gradients``, ``grad``, ``value_and_grad``: :mod:`jitnet.autodiff.backprop`) and sparse
gradients (``IndexedSlices``: :mod:`jitnet.autodiff.sparse`) run jitnet ops, so they sit above ``ops``;
``jitnet`` itself exports them (``jn.grad``, ``jn.IndexedSlices``, ...).
"""
from .core import (REGISTRY, Node, Primitive, apply, current_interpreter, enable_grad, is_grad_enabled, no_grad,
                   push_interpreter)

__all__ = ["REGISTRY", "Node", "Primitive", "apply", "current_interpreter", "enable_grad", "is_grad_enabled",
           "no_grad", "push_interpreter"]
