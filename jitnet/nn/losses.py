"""Loss modules (PyTorch's ``nn.CrossEntropyLoss`` and friends): thin Modules over :mod:`jitnet.nn.functional`.

Each is called as ``loss_fn(input, target)`` and reduces with ``reduction`` ("mean", "sum" or "none").
"""
from __future__ import annotations

from .. import ops
from . import functional as F
from .module import Module

__all__ = ["CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss", "L1Loss", "HuberLoss", "SmoothL1Loss"]

_REDUCTIONS = ("mean", "sum", "none")


class _Loss(Module):
    def __init__(self, reduction="mean"):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{type(self).__name__}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction

    def extra_repr(self):
        """Return the reduction, as shown by repr."""
        return f"reduction={self.reduction!r}"


class CrossEntropyLoss(_Loss):
    """Softmax cross entropy of logits (N, C) against class ids (N,) or probability rows (N, C).

    Labels equal to ``ignore_index`` (default -100; any negative label is ignored) add nothing to the loss and
    are left out of the mean. Per-class ``weight`` is not supported.
    """

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        super().__init__(reduction)
        if weight is not None:
            raise ValueError("CrossEntropyLoss: per-class weight is not supported; scale the per-row losses of "
                             "reduction='none' instead")
        if ignore_index >= 0:
            raise ValueError(f"CrossEntropyLoss: ignore_index must be negative (negative labels are ignored), "
                             f"got {ignore_index}")
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)

    def forward(self, input, target):
        """Return the cross entropy of ``input`` logits against ``target``, reduced."""
        return F.cross_entropy(input, target, reduction=self.reduction, label_smoothing=self.label_smoothing)


class MSELoss(_Loss):
    """Squared error (input - target) ** 2."""

    def forward(self, input, target):
        """Return the squared error of ``input`` against ``target``, reduced."""
        return F.mse_loss(input, target, reduction=self.reduction)


class BCEWithLogitsLoss(_Loss):
    """Sigmoid cross entropy of logits against targets in [0, 1] (``pos_weight`` weights the positives)."""

    def __init__(self, weight=None, reduction="mean", pos_weight=None):
        super().__init__(reduction)
        if weight is not None:
            raise ValueError("BCEWithLogitsLoss: weight is not supported; use pos_weight, or scale the losses of "
                             "reduction='none'")
        self.pos_weight = pos_weight

    def forward(self, input, target):
        """Return the sigmoid cross entropy of ``input`` logits against ``target``, reduced."""
        return F.binary_cross_entropy_with_logits(input, target, reduction=self.reduction,
                                                  pos_weight=self.pos_weight)


class L1Loss(_Loss):
    """Absolute error |input - target|."""

    def forward(self, input, target):
        """Return the absolute error of ``input`` against ``target``, reduced."""
        return F._reduce(ops.abs(F._t(input) - F._t(target)), self.reduction, "L1Loss")


class HuberLoss(_Loss):
    """0.5 d ** 2 where |d| <= delta, else delta (|d| - 0.5 delta), with d = input - target."""

    def __init__(self, reduction="mean", delta=1.0):
        super().__init__(reduction)
        if delta <= 0:
            raise ValueError(f"HuberLoss: delta must be positive, got {delta}")
        self.delta = float(delta)

    def forward(self, input, target):
        """Return the Huber loss of ``input`` against ``target``, reduced."""
        return F.huber_loss(input, target, delta=self.delta, reduction=self.reduction)


class SmoothL1Loss(_Loss):
    """HuberLoss(delta=beta) / beta: 0.5 d ** 2 / beta where |d| < beta, else |d| - 0.5 beta."""

    def __init__(self, reduction="mean", beta=1.0):
        super().__init__(reduction)
        if beta <= 0:
            raise ValueError(f"SmoothL1Loss: beta must be positive, got {beta}")
        self.beta = float(beta)

    def forward(self, input, target):
        """Return the smooth L1 loss of ``input`` against ``target``, reduced."""
        loss = F.huber_loss(input, target, delta=self.beta, reduction=self.reduction)
        return loss if self.beta == 1.0 else loss * (1.0 / self.beta)
