"""Dynamic loss scaling for float16 training: :class:`GradScaler` (PyTorch's ``torch.amp.GradScaler``).

float16 flushes gradients below about 6e-8 to zero; multiplying the loss by a large factor before
``backward`` keeps them representable, and dividing the gradients by it before the update restores their
values. When a gradient overflows (inf or NaN) the update is skipped and the factor shrinks; after
``growth_interval`` steps without one it grows again::

    scaler = jn.optim.GradScaler()
    for x, y in loader:
        opt.zero_grad()
        with jn.autocast(jn.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)          # unscales the grads; skips opt.step() when one is inf/NaN
        scaler.update()           # backs off or grows the scale

**Devices.** The scale is a 0-d float32 variable on the host, read by device kernels as a scalar argument
(no copy). The overflow check reduces each gradient where it lives to one flag and ORs the flags, so an
eager step reads back one boolean (one scalar transfer from a GPU), never the gradients.

**Under jn.jit.** ``scale`` reads the scale variable, so a compiled step follows the updates without
retracing. ``step`` and ``update`` also trace: instead of skipping in Python, the compiled step runs the
optimizer's update and then writes back the previous values of the parameters, their slot variables and
the step counter where the check found an overflow (``where(found_inf, old, new)``: one extra read and write
of each); ``update`` computes the new scale and growth counter in the graph. The skipped step then leaves every
variable as it was, as eagerly. The gradients' flags are combined on their device, and the result is copied
to the host once for the counters.
"""
from __future__ import annotations

import numbers

import numpy as np

from .. import ops
from ..autodiff.core import current_interpreter, no_grad
from ..autodiff.sparse import IndexedSlices
from ..tensor import Tensor, Variable

__all__ = ["GradScaler"]

_F32 = np.dtype(np.float32)


class GradScaler:
    """Scale the loss, unscale the gradients, skip steps with inf/NaN gradients, and adapt the scale.

    ``init_scale`` is the first factor; ``update()`` multiplies it by ``backoff_factor`` after a step with an
    inf/NaN gradient and by ``growth_factor`` after ``growth_interval`` consecutive good steps. With
    ``enabled=False`` every method passes through (``scale`` returns the loss, ``step`` calls
    ``optimizer.step()``), so one training loop serves both settings.
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                 enabled=True):
        for name, v in (("init_scale", init_scale), ("growth_factor", growth_factor),
                        ("backoff_factor", backoff_factor)):
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not np.isfinite(v):
                raise TypeError(f"GradScaler: {name} must be a finite number, got {v!r}")
        if init_scale <= 0:
            raise ValueError(f"GradScaler: init_scale must be positive, got {init_scale}")
        if growth_factor <= 1.0:
            raise ValueError(f"GradScaler: growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"GradScaler: backoff_factor must be in (0, 1), got {backoff_factor}")
        if not isinstance(growth_interval, numbers.Integral) or isinstance(growth_interval, bool) \
                or growth_interval < 1:
            raise ValueError(f"GradScaler: growth_interval must be a positive int, got {growth_interval!r}")
        self._enabled = bool(enabled)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._scale = Variable(np.array(init_scale, _F32), trainable=False, name="grad_scaler/scale", device="cpu")
        self._growth_tracker = Variable(np.array(0, np.int64), trainable=False, name="grad_scaler/growth_tracker",
                                        device="cpu")
        self._per_opt = {}          # id(optimizer) -> {"unscaled": bool, "stepped": bool, "found_inf": ...}

    # -- settings -------------------------------------------------------------------------------------------------
    def is_enabled(self) -> bool:
        """Return True when scaling is on."""
        return self._enabled

    def get_scale(self) -> float:
        """Return the current scale as a Python float (1.0 when disabled)."""
        if not self._enabled:
            return 1.0
        self._eager_only("get_scale")
        return float(self._scale.numpy())

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def _eager_only(self, what):
        if current_interpreter() is not None:
            raise RuntimeError(f"GradScaler.{what}() returns a Python value, which a jitted function cannot "
                               "compute; call it outside jn.jit")

    # -- the loop -------------------------------------------------------------------------------------------------
    def scale(self, outputs):
        """Return ``outputs`` (a tensor, or a list/tuple/dict of them) multiplied by the scale."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, Tensor):
            if outputs.dtype.kind not in "fV":
                raise TypeError(f"GradScaler.scale: expected a floating tensor, got dtype {outputs.dtype}")
            return outputs * self._scale        # (a float16 loss becomes float32: 2**16 overflows float16)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        if isinstance(outputs, dict):
            return {k: self.scale(v) for k, v in outputs.items()}
        raise TypeError(f"GradScaler.scale: expected a tensor or a list/tuple/dict of tensors, got "
                        f"{type(outputs).__name__}")

    def _state(self, optimizer):
        st = self._per_opt.get(id(optimizer))
        interp = current_interpreter()
        if st is None or st["interp"] is not interp:     # (left by a trace that stopped half way: dropped)
            st = self._per_opt[id(optimizer)] = {"unscaled": False, "stepped": False, "found_inf": None,
                                                 "optimizer": optimizer, "interp": interp}
        return st

    def unscale_(self, optimizer):
        """Divide the ``.grad`` of ``optimizer``'s parameters by the scale in place (before clipping, say).

        ``step`` unscales when this was not called; calling it twice before ``update()`` is an error."""
        if not self._enabled:
            return
        st = self._state(optimizer)
        if st["unscaled"]:
            raise RuntimeError("GradScaler.unscale_() was already called on this optimizer since the last "
                               "update()")
        if st["stepped"]:
            raise RuntimeError("GradScaler.unscale_() is being called after step(); call update() first")
        with no_grad():
            inv = ops.reciprocal(ops.astype(self._scale, np.float64)).astype(_F32)
            flags = []
            for group in optimizer.param_groups:
                for p in group["params"]:
                    g = p.grad
                    if g is None:
                        continue
                    if isinstance(g, IndexedSlices):
                        vals = _unscaled(g.values, inv)
                        p.grad = IndexedSlices(vals, g.indices, g.dense_shape)
                    else:
                        vals = _unscaled(g, inv)
                        p.grad = vals
                    flags.append(ops.logical_not(ops.all(ops.isfinite(vals))))
            found = None
            for f in flags:                       # OR'ed where the gradients live: one flag per optimizer
                found = f if found is None else ops.logical_or(found, f if f.device == found.device
                                                                 else f.to(found.device))
        st["unscaled"] = True
        st["found_inf"] = found                   # None: no gradient at all

    def step(self, optimizer, *args, **kwargs):
        """Unscale the gradients (unless ``unscale_`` did) and call ``optimizer.step(*args, **kwargs)`` when none
        is inf/NaN; return its result, or None when the step was skipped (no parameter or optimizer state
        changes). Eagerly the check reads one boolean from the gradients' device."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        st = self._state(optimizer)
        if st["stepped"]:
            raise RuntimeError("GradScaler.step() was already called on this optimizer since the last update()")
        if not st["unscaled"]:
            self.unscale_(optimizer)
        st["stepped"] = True
        found = st["found_inf"]
        if current_interpreter() is not None:
            return self._step_traced(optimizer, found, args, kwargs)
        if found is not None and bool(found.item()):       # the one scalar read back per step
            st["found_inf"] = True
            return None
        st["found_inf"] = False
        return optimizer.step(*args, **kwargs)

    def _step_traced(self, optimizer, found, args, kwargs):
        if found is None:
            return optimizer.step(*args, **kwargs)
        touched = [optimizer.global_step]
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    touched.append(p)
                    touched.extend(optimizer._slots(p, group).values())
        with no_grad():
            olds = [ops.copy(v) for v in touched]        # read before the update: the previous values
        out = optimizer.step(*args, **kwargs)
        with no_grad():
            for v, old in zip(touched, olds):
                f = found if found.device == v.device else found.to(v.device)
                v.assign(ops.where(f, old, v))
        return out

    def update(self, new_scale=None):
        """Back off the scale after a skipped step, grow it after ``growth_interval`` good steps (or set it to
        ``new_scale``); start the next iteration."""
        if not self._enabled:
            return
        if new_scale is not None:
            self._per_opt = {}
            if isinstance(new_scale, Tensor):
                with no_grad():
                    self._scale.assign(ops.astype(new_scale, _F32).to("cpu"))
            else:
                if not np.isfinite(new_scale) or new_scale <= 0:
                    raise ValueError(f"GradScaler.update: new_scale must be a positive finite number, got "
                                     f"{new_scale}")
                self._scale.assign(np.array(new_scale, _F32))
            self._growth_tracker.assign(np.array(0, np.int64))
            return
        interp = current_interpreter()
        states = [st for st in self._per_opt.values() if st["unscaled"] and st["interp"] is interp]
        if not states:
            raise RuntimeError("GradScaler.update(): no optimizer was stepped (or unscaled) since the last "
                               "update(); call scaler.step(optimizer) first")
        self._per_opt = {}
        flags = [st["found_inf"] for st in states if st["found_inf"] is not None]
        if current_interpreter() is not None:
            self._update_traced([f for f in flags if isinstance(f, Tensor)])
            return
        found = False
        for f in flags:
            found = found or (bool(f.item()) if isinstance(f, Tensor) else bool(f))
        scale = float(self._scale.numpy())
        tracker = int(self._growth_tracker.numpy())
        if found:
            scale, tracker = scale * self._backoff_factor, 0
        else:
            tracker += 1
            if tracker >= self._growth_interval:
                grown = scale * self._growth_factor
                if np.isfinite(np.float32(grown)):          # never grow into float32 infinity
                    scale = grown
                tracker = 0
        self._scale.assign(np.array(scale, _F32))
        self._growth_tracker.assign(np.array(tracker, np.int64))

    def _update_traced(self, flags):
        with no_grad():
            found = None
            for f in flags:
                f = f if f.device.type == "cpu" else f.to("cpu")      # one boolean copied to the host
                found = f if found is None else ops.logical_or(found, f)
            if found is None:
                found = ops.zeros((), np.bool_)
            nxt = self._growth_tracker + 1
            grow = ops.logical_and(ops.logical_not(found), nxt >= self._growth_interval)
            scale = self._scale
            grown = scale * np.float32(self._growth_factor)
            grown = ops.where(ops.isfinite(grown), grown, scale)
            new_scale = ops.where(found, scale * np.float32(self._backoff_factor),
                                  ops.where(grow, grown, scale))
            new_tracker = ops.where(ops.logical_or(found, grow), ops.zeros_like(nxt), nxt)
            self._scale.assign(new_scale)
            self._growth_tracker.assign(new_tracker)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Return the scale, the factors, the interval and the growth counter (an empty dict when disabled)."""
        if not self._enabled:
            return {}
        self._eager_only("state_dict")
        return {"scale": float(self._scale.numpy()), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": int(self._growth_tracker.numpy())}

    def load_state_dict(self, state_dict):
        """Restore what ``state_dict()`` returned."""
        if not self._enabled:
            return
        if not state_dict:
            raise RuntimeError("GradScaler.load_state_dict: the state dict is empty (saved from a disabled "
                               "GradScaler?)")
        missing = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"} - set(state_dict)
        if missing:
            raise KeyError(f"GradScaler.load_state_dict: missing {sorted(missing)}")
        scale = float(state_dict["scale"])
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"GradScaler.load_state_dict: scale must be a positive finite number, got {scale}")
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._scale.assign(np.array(scale, _F32))
        self._growth_tracker.assign(np.array(int(state_dict["_growth_tracker"]), np.int64))
        self._per_opt = {}

    def __repr__(self):
        return (f"GradScaler(enabled={self._enabled}, growth_factor={self._growth_factor}, "
                f"backoff_factor={self._backoff_factor}, growth_interval={self._growth_interval})")


def _unscaled(g, inv):
    """Return gradient ``g`` times ``inv`` (a 0-d float32 tensor), in ``g``'s dtype."""
    out = g * inv
    return out if out.dtype == g.dtype else ops.astype(out, g.dtype)
