"""PyTorch-style learning-rate schedulers: ``scheduler.step()`` once per epoch (or batch), ``get_last_lr()``.

A scheduler turns each group's ``"lr"`` into a 0-d float64 ``Variable`` (its ``initial_lr`` is kept as a
float) and ``step()`` assigns the new rate to it. The optimizer reads that variable, so a ``@jitnet.jit``
training step follows the schedule without retracing, exactly as eager code does. Read a group's rate with
``float(group["lr"])`` or ``scheduler.get_last_lr()``.

Like PyTorch, constructing a scheduler takes its first step (``last_epoch`` becomes 0) and sets the rate of
epoch 0; every ``step()`` then advances one epoch. The TensorFlow-style schedules of
:mod:`jitnet.optim.schedules` (functions of the optimizer's ``global_step``) are the other way to vary a rate.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from ..tensor import Tensor, Variable
from .optimizer import Optimizer

__all__ = ["LRScheduler", "LambdaLR", "StepLR", "CosineAnnealingLR", "OneCycleLR", "ReduceLROnPlateau"]


def _lr_variable(opt, group, j, what):
    """Return the 0-d float64 Variable holding ``group``'s rate, creating it from a float rate."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.ndim != 0:
            raise ValueError(f"{what}: param group {j} has a learning rate of shape {lr.shape}, expected 0-d")
        return lr
    if callable(lr):
        raise TypeError(f"{what}: param group {j} of {type(opt).__name__} already has a learning-rate schedule "
                        f"({type(lr).__name__}); use either a schedule or an lr_scheduler, not both")
    if not isinstance(lr, numbers.Real):
        raise TypeError(f"{what}: param group {j} has a learning rate of type {type(lr).__name__}")
    v = Variable(np.array(float(lr), np.float64), trainable=False, name=f"lr{j}", device="cpu")
    group["lr"] = v
    return v


class LRScheduler:
    """Base class: subclasses define ``get_lr()`` (the rates of epoch ``last_epoch``, one per group)."""

    def __init__(self, optimizer, last_epoch=-1):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: expected a jitnet optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        what = type(self).__name__
        self._vars = [_lr_variable(optimizer, g, j, what) for j, g in enumerate(optimizer.param_groups)]
        for j, g in enumerate(optimizer.param_groups):
            if last_epoch == -1:
                g.setdefault("initial_lr", float(self._vars[j].numpy()))
            elif "initial_lr" not in g:
                raise KeyError(f"{what}: param group {j} has no 'initial_lr' (needed when resuming with "
                               f"last_epoch={last_epoch})")
        self.base_lrs = [float(g["initial_lr"]) for g in optimizer.param_groups]
        self.last_epoch = int(last_epoch)
        self._last_lr = [float(v.numpy()) for v in self._vars]
        self.step()

    def get_lr(self):
        """Return the list of rates (one per param group) for epoch ``last_epoch``."""
        raise NotImplementedError

    def get_last_lr(self):
        """Return the list of rates the last ``step()`` set, one float per param group."""
        return list(self._last_lr)

    def _set(self, lrs):
        for v, lr in zip(self._vars, lrs):
            v.assign(np.array(float(lr), np.float64))
        self._last_lr = [float(x) for x in lrs]

    def step(self, epoch=None):
        """Advance one epoch (or to ``epoch``) and set every group's rate; return None."""
        self.last_epoch = self.last_epoch + 1 if epoch is None else int(epoch)
        self._set(self.get_lr())

    def state_dict(self):
        """Return the scheduler's state (its numbers; not the optimizer, not lambdas) as a dict."""
        return {k: v for k, v in self.__dict__.items()
                if k not in ("optimizer", "_vars", "lr_lambdas") and not callable(v)}

    def load_state_dict(self, state):
        """Restore the state saved by ``state_dict()`` and set the rates it had; return None."""
        self.__dict__.update(state)
        self._set(self._last_lr)

    def __repr__(self):
        return f"{type(self).__name__}(last_epoch={self.last_epoch}, lr={self._last_lr})"


class LambdaLR(LRScheduler):
    """lr = initial_lr * lr_lambda(epoch) (one function, or one per param group)."""

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        n = len(optimizer.param_groups)
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != n:
                raise ValueError(f"LambdaLR: {len(lr_lambda)} lr_lambdas for {n} param groups")
            self.lr_lambdas = list(lr_lambda)
        else:
            self.lr_lambdas = [lr_lambda] * n
        for f in self.lr_lambdas:
            if not callable(f):
                raise TypeError(f"LambdaLR: lr_lambda must be callable, got {type(f).__name__}")
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        """Return initial_lr * lr_lambda(last_epoch) for every group."""
        return [b * float(f(self.last_epoch)) for b, f in zip(self.base_lrs, self.lr_lambdas)]


class StepLR(LRScheduler):
    """lr = initial_lr * gamma ** (epoch // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        if int(step_size) <= 0:
            raise ValueError(f"StepLR: step_size must be a positive integer, got {step_size}")
        self.step_size = int(step_size)
        self.gamma = float(gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        """Return initial_lr * gamma ** (last_epoch // step_size) for every group."""
        return [b * self.gamma ** (self.last_epoch // self.step_size) for b in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (initial_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2 (SGDR without restarts)."""

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        if int(T_max) <= 0:
            raise ValueError(f"CosineAnnealingLR: T_max must be a positive integer, got {T_max}")
        self.T_max = int(T_max)
        self.eta_min = float(eta_min)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        """Return the cosine-annealed rate of epoch ``last_epoch`` for every group."""
        c = (1.0 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2.0
        return [self.eta_min + (b - self.eta_min) * c for b in self.base_lrs]


class OneCycleLR(LRScheduler):
    """The 1cycle policy, stepped once per batch: warm up from max_lr / div_factor to max_lr over
    ``pct_start`` of ``total_steps``, then anneal to initial_lr / final_div_factor (cosine or linear);
    ``three_phase`` goes back down to the initial rate before the final annealing (PyTorch's phases).

    Momentum cycling is not done (``cycle_momentum`` must be False): jitnet's betas and momentum are static
    settings of the fused update kernels, not variables a compiled step re-reads.
    """

    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None, pct_start=0.3,
                 anneal_strategy="cos", cycle_momentum=False, div_factor=25.0, final_div_factor=1e4,
                 three_phase=False, last_epoch=-1):
        if cycle_momentum:
            raise ValueError("OneCycleLR: cycle_momentum=True is not supported (betas/momentum are static "
                             "kernel settings in jitnet); pass cycle_momentum=False")
        if total_steps is None:
            if epochs is None or steps_per_epoch is None:
                raise ValueError("OneCycleLR: give total_steps, or both epochs and steps_per_epoch")
            total_steps = int(epochs) * int(steps_per_epoch)
        if int(total_steps) <= 0:
            raise ValueError(f"OneCycleLR: total_steps must be positive, got {total_steps}")
        if not 0.0 <= pct_start <= 1.0:
            raise ValueError(f"OneCycleLR: pct_start must be in [0, 1], got {pct_start}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"OneCycleLR: anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self.total_steps = int(total_steps)
        self.anneal_strategy = anneal_strategy
        n = len(optimizer.param_groups)
        maxs = list(max_lr) if isinstance(max_lr, (list, tuple)) else [max_lr] * n
        if len(maxs) != n:
            raise ValueError(f"OneCycleLR: {len(maxs)} max_lr values for {n} param groups")
        self.max_lrs = [float(m) for m in maxs]
        self.initial_lrs = [m / float(div_factor) for m in self.max_lrs]
        self.min_lrs = [i / float(final_div_factor) for i in self.initial_lrs]
        last = float(self.total_steps - 1)
        if three_phase:
            self._phases = [(float(pct_start * self.total_steps) - 1, "initial", "max"),
                            (float(2 * pct_start * self.total_steps) - 2, "max", "initial"),
                            (last, "initial", "min")]
        else:
            self._phases = [(float(pct_start * self.total_steps) - 1, "initial", "max"), (last, "max", "min")]
        if last_epoch == -1:                 # PyTorch sets initial_lr to max_lr / div_factor
            for g, i in zip(optimizer.param_groups, self.initial_lrs):
                g["initial_lr"] = i
        super().__init__(optimizer, last_epoch)

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)
        return (end - start) * pct + start

    def get_lr(self):
        """Return the 1cycle rate of step ``last_epoch`` for every group."""
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(f"OneCycleLR: stepped {step} times, more than total_steps={self.total_steps}")
        out = []
        for j in range(len(self.max_lrs)):
            vals = {"initial": self.initial_lrs[j], "max": self.max_lrs[j], "min": self.min_lrs[j]}
            start = 0.0
            for k, (end, a, b) in enumerate(self._phases):
                if step <= end or k == len(self._phases) - 1:
                    pct = (step - start) / (end - start) if end != start else 1.0
                    out.append(self._anneal(vals[a], vals[b], pct))
                    break
                start = end
        return out


class ReduceLROnPlateau:
    """Multiply the rate by ``factor`` when ``step(metric)`` has not improved for more than ``patience``
    epochs (``mode`` "min" or "max", ``threshold`` relative or absolute), then wait ``cooldown`` epochs."""

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4, threshold_mode="rel",
                 cooldown=0, min_lr=0.0, eps=1e-8):
        if factor >= 1.0:
            raise ValueError(f"ReduceLROnPlateau: factor must be < 1.0, got {factor}")
        if mode not in ("min", "max"):
            raise ValueError(f"ReduceLROnPlateau: mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"ReduceLROnPlateau: threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        self.optimizer = optimizer
        self._vars = [_lr_variable(optimizer, g, j, "ReduceLROnPlateau")
                      for j, g in enumerate(optimizer.param_groups)]
        n = len(self._vars)
        mins = list(min_lr) if isinstance(min_lr, (list, tuple)) else [min_lr] * n
        if len(mins) != n:
            raise ValueError(f"ReduceLROnPlateau: {len(mins)} min_lr values for {n} param groups")
        self.min_lrs = [float(m) for m in mins]
        self.mode, self.factor, self.patience = mode, float(factor), int(patience)
        self.threshold, self.threshold_mode = float(threshold), threshold_mode
        self.cooldown, self.eps = int(cooldown), float(eps)
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.last_epoch = 0
        self._last_lr = [float(v.numpy()) for v in self._vars]

    def _is_better(self, a):
        if self.mode == "min":
            bound = self.best * (1.0 - self.threshold) if self.threshold_mode == "rel" else \
                self.best - self.threshold
            return a < bound
        bound = self.best * (1.0 + self.threshold) if self.threshold_mode == "rel" else self.best + self.threshold
        return a > bound

    def step(self, metrics):
        """Record this epoch's metric (a number or 0-d tensor); reduce the rates after a plateau; return None."""
        try:
            current = float(metrics)
        except (TypeError, ValueError):
            raise TypeError(f"ReduceLROnPlateau.step: the metric must be a number or a 0-d tensor, got "
                            f"{type(metrics).__name__}") from None
        self.last_epoch += 1
        if self._is_better(current):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            for j, v in enumerate(self._vars):
                old = float(v.numpy())
                new = max(old * self.factor, self.min_lrs[j])
                if old - new > self.eps:
                    v.assign(np.array(new, np.float64))
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = [float(v.numpy()) for v in self._vars]

    def get_last_lr(self):
        """Return the current rates, one float per param group."""
        return list(self._last_lr)

    def state_dict(self):
        """Return the scheduler's state (its numbers, not the optimizer) as a dict."""
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_vars")}

    def load_state_dict(self, state):
        """Restore the state saved by ``state_dict()``; return None."""
        self.__dict__.update(state)
