"""Optimizers, learning-rate schedules and gradient clipping.

``opt = jn.optim.Adam(model.parameters(), lr=1e-3)``; then per step ``opt.zero_grad(); loss.backward();
opt.step()`` (PyTorch), or ``opt.minimize(loss_fn)`` (TensorFlow). Each parameter update is one fused,
in-place kernel; sparse (embedding) gradients update only the rows they name.
"""
from . import lr_scheduler, updates
from .clip import clip_by_global_norm, clip_by_norm, clip_by_value, global_norm
from .grad_scaler import GradScaler
from .optimizer import SGD, Adagrad, AdaGrad, Adam, AdamW, Optimizer, RMSprop, RMSProp
from .schedules import (ExponentialDecay, LearningRateSchedule, PiecewiseConstant, StepDecay, exponential_decay,
                        piecewise_constant, step_decay)

__all__ = ["Optimizer", "SGD", "AdaGrad", "Adagrad", "RMSProp", "RMSprop", "Adam", "AdamW", "LearningRateSchedule",
           "ExponentialDecay", "StepDecay", "PiecewiseConstant", "exponential_decay", "step_decay",
           "piecewise_constant", "clip_by_value", "clip_by_norm", "clip_by_global_norm", "global_norm",
           "updates", "lr_scheduler", "GradScaler"]
