"""PyTorch's ``nn.utils`` gradient clipping names, over the ``.grad`` of a list of parameters."""
from __future__ import annotations

from ..autodiff.core import no_grad
from ..optim.clip import clip_by_global_norm, clip_by_value
from ..tensor import Tensor

__all__ = ["clip_grad_norm_", "clip_grad_value_"]


def _with_grads(parameters, what):
    ps = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    for p in ps:
        if not isinstance(p, Tensor):
            raise TypeError(f"{what}: parameters must be tensors, got {type(p).__name__}")
    return [p for p in ps if p.grad is not None]


def clip_grad_norm_(parameters, max_norm, norm_type=2.0):
    """Scale the ``.grad`` of ``parameters`` in place so their global L2 norm is at most ``max_norm``; return
    the norm before clipping (a 0-d tensor). The scale is max_norm / max(norm, max_norm)."""
    if float(norm_type) != 2.0:
        raise ValueError(f"clip_grad_norm_: only norm_type=2 is supported, got {norm_type}")
    if max_norm <= 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be positive, got {max_norm}")
    ps = _with_grads(parameters, "clip_grad_norm_")
    with no_grad():
        clipped, norm = clip_by_global_norm([p.grad for p in ps], float(max_norm))
    for p, g in zip(ps, clipped):
        p.grad = g
    return norm


def clip_grad_value_(parameters, clip_value):
    """Clip the ``.grad`` of ``parameters`` in place to [-clip_value, clip_value]; return None."""
    if clip_value < 0:
        raise ValueError(f"clip_grad_value_: clip_value must be non-negative, got {clip_value}")
    ps = _with_grads(parameters, "clip_grad_value_")
    with no_grad():
        for p in ps:
            p.grad = clip_by_value(p.grad, -float(clip_value), float(clip_value))
