"""Learning-rate schedules: objects called with the global step that return the learning rate.

A schedule called with a Python number returns a Python float; called with a tensor (the optimizer's
``global_step`` variable) it returns a 0-d float64 tensor computed with jitnet ops, so that a compiled step
reads the step variable and the learning rate follows it without retracing.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .. import ops

__all__ = ["LearningRateSchedule", "ExponentialDecay", "StepDecay", "PiecewiseConstant", "exponential_decay",
           "step_decay", "piecewise_constant"]


class LearningRateSchedule:
    """Base class: ``schedule(step)`` returns the learning rate at ``step`` (a float, or a 0-d tensor)."""

    def __call__(self, step):
        if isinstance(step, numbers.Number) or isinstance(step, np.generic):
            return float(self.value(float(step)))
        return self.tensor_value(ops.astype(step, np.float64))

    def value(self, step: float) -> float:
        """Return the learning rate at a Python step number."""
        raise NotImplementedError

    def tensor_value(self, step):
        """Return the learning rate at a 0-d float64 step tensor as a 0-d tensor."""
        raise NotImplementedError


class ExponentialDecay(LearningRateSchedule):
    """lr * decay_rate ** (step / decay_steps), the exponent floored when ``staircase`` (TensorFlow's rule)."""

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False):
        if decay_steps <= 0:
            raise ValueError(f"exponential_decay: decay_steps must be positive, got {decay_steps}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = float(decay_steps)
        self.decay_rate = float(decay_rate)
        self.staircase = bool(staircase)

    def value(self, step):
        """Return the decayed learning rate at a Python step number."""
        p = step / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return self.initial_learning_rate * self.decay_rate ** p

    def tensor_value(self, step):
        """Return the decayed learning rate at a step tensor."""
        p = step / self.decay_steps
        if self.staircase:
            p = ops.floor(p)
        return ops.power(self.decay_rate, p) * self.initial_learning_rate

    def __repr__(self):
        return (f"ExponentialDecay({self.initial_learning_rate}, decay_steps={self.decay_steps:g}, "
                f"decay_rate={self.decay_rate}, staircase={self.staircase})")


class StepDecay(LearningRateSchedule):
    """lr * gamma ** floor(step / step_size): multiply the rate by ``gamma`` every ``step_size`` steps."""

    def __init__(self, initial_learning_rate, step_size, gamma=0.1):
        if step_size <= 0:
            raise ValueError(f"step_decay: step_size must be positive, got {step_size}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.step_size = float(step_size)
        self.gamma = float(gamma)

    def value(self, step):
        """Return the learning rate at a Python step number."""
        return self.initial_learning_rate * self.gamma ** math.floor(step / self.step_size)

    def tensor_value(self, step):
        """Return the learning rate at a step tensor."""
        return ops.power(self.gamma, ops.floor(step / self.step_size)) * self.initial_learning_rate

    def __repr__(self):
        return f"StepDecay({self.initial_learning_rate}, step_size={self.step_size:g}, gamma={self.gamma})"


class PiecewiseConstant(LearningRateSchedule):
    """values[i] while boundaries[i-1] < step <= boundaries[i] (TensorFlow's piecewise_constant)."""

    def __init__(self, boundaries, values):
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"piecewise_constant: need len(values) == len(boundaries) + 1, got {len(values)} "
                             f"values for {len(boundaries)} boundaries")
        self.boundaries = [float(b) for b in boundaries]
        self.values = [float(v) for v in values]

    def value(self, step):
        """Return the learning rate at a Python step number."""
        for b, v in zip(self.boundaries, self.values):
            if step <= b:
                return v
        return self.values[-1]

    def tensor_value(self, step):
        """Return the learning rate at a step tensor."""
        out = ops.full((), self.values[-1], np.float64)
        for b, v in reversed(list(zip(self.boundaries, self.values))):
            out = ops.where(step <= b, v, out)
        return ops.astype(out, np.float64)


def exponential_decay(learning_rate, decay_steps, decay_rate, staircase=False):
    """Return an ExponentialDecay schedule: lr * decay_rate ** (step / decay_steps)."""
    return ExponentialDecay(learning_rate, decay_steps, decay_rate, staircase)


def step_decay(learning_rate, step_size, gamma=0.1):
    """Return a StepDecay schedule: lr * gamma ** floor(step / step_size)."""
    return StepDecay(learning_rate, step_size, gamma)


def piecewise_constant(boundaries, values):
    """Return a PiecewiseConstant schedule (values[i] up to boundaries[i])."""
    return PiecewiseConstant(boundaries, values)
