"""The NaN/Inf mode (``jitnet.debug_nans``): stop at the first primitive that makes a non-finite value.

While the mode is on, every primitive's floating output is checked right after its kernel runs: eagerly in
``apply`` (forward ops and the ops a VJP runs inside ``backward``), while a step is traced, and after each
step of a compiled plan (plans built in this mode run every primitive as its own step: no fusion, no native
drivers or loop drivers, so the check names the primitive itself). The first NaN, or infinity made from
finite inputs, raises :class:`FloatingPointError` naming the primitive, its input shapes and dtypes, whether
it ran in the forward or the backward pass, and the user's line of code. Infinities that an op receives on
purpose (a ``-inf`` mask or padding value) pass through until they make a NaN. An input that is already NaN
is named as such (an argument of the step, a variable, or data made with the mode off).

Off by default; ``JITNET_DEBUG_NANS=1`` turns it on at import. When off, ``apply`` pays one global test and a
jitted call one more; nothing else changes. Peers: JAX's ``jax_debug_nans``, PyTorch's anomaly mode.
"""
from __future__ import annotations

import linecache
import os
import sys

import numpy as np

from . import core

__all__ = ["debug_nans", "debug_nans_enabled", "check_array", "suspended"]

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_USER_DIRS = tuple(os.path.join(_PKG_DIR, d) + os.sep for d in ("models", "examples"))


def debug_nans_enabled() -> bool:
    """Return True while the NaN/Inf mode is on."""
    return core._NAN_CHECK is not None


def _set(on):
    core._NAN_CHECK = check_eager if on else None


class debug_nans:
    """Turn the NaN/Inf mode on (or off with ``False``) now; used in a ``with`` block, restore the old mode after.

    ``jn.debug_nans(True)`` switches the mode for the rest of the program; ``with jn.debug_nans(): ...`` only
    for the block. A jitted function keeps one compiled plan per mode, so switching takes effect at its next
    call.
    """

    def __init__(self, enabled=True):
        self._prev = debug_nans_enabled()
        _set(bool(enabled))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _set(self._prev)
        return False

    def __repr__(self):
        return f"debug_nans({debug_nans_enabled()})"


class suspended:
    """Context manager that turns checks off inside the block (trial traces on placeholder values)."""

    def __enter__(self):
        self._prev = core._NAN_CHECK
        core._NAN_CHECK = None
        return self

    def __exit__(self, *exc):
        core._NAN_CHECK = self._prev
        return False


# --------------------------------------------------------------------------------------------------------------
# Finding non-finite values
# --------------------------------------------------------------------------------------------------------------

def check_array(a):
    """Return None when ``a`` holds only finite values (or is not floating), else "NaN" or "inf"."""
    if isinstance(a, np.ndarray):
        if (a.dtype.kind not in "fc" and a.dtype.name != "bfloat16") or a.size == 0:
            return None
        if np.isfinite(a).all():
            return None
        return "NaN" if np.isnan(a).any() else "inf"
    if isinstance(a, tuple):                      # the several arrays of a loop node
        kinds = [check_array(x) for x in a]
        return "NaN" if "NaN" in kinds else ("inf" if "inf" in kinds else None)
    if isinstance(a, (np.generic, float)):
        return check_array(np.asarray(a))
    if _device_counts is not None and hasattr(a, "dtype") and hasattr(a, "shape"):     # a CUDA device array
        if np.dtype(a.dtype).kind not in "fc" or a.size == 0:
            return None
        n_nan, n_inf = _device_counts(a)
        return "NaN" if n_nan else ("inf" if n_inf else None)
    return None


_device_counts = None      # (NaN count, inf count) of a device array: a reduction kernel, set by the CUDA backend


def set_device_counter(fn):
    """Install ``fn(device_array) -> (n_nan, n_inf)``, the device-side check (called when the GPU backend loads)."""
    global _device_counts
    _device_counts = fn


def _param_has_inf(params):
    for v in params.values():
        if isinstance(v, (float, np.floating)) and not np.isfinite(v):
            return True
    return False


def _allowed(kind, inputs, params):
    """An infinity (no NaN) is allowed when an input or parameter already held one: a mask, a padding value."""
    if kind != "inf":
        return False
    return _param_has_inf(params) or any(check_array(a) is not None for a in inputs)


# --------------------------------------------------------------------------------------------------------------
# Where: the user's line, and the forward op a backward op differentiates
# --------------------------------------------------------------------------------------------------------------

def user_site():
    """Return (filename, lineno) of the innermost frame of the user's code (outside jitnet's library code)."""
    f = sys._getframe(1)
    while f is not None:
        fn = f.f_code.co_filename
        a = os.path.abspath(fn)
        if not a.startswith(_PKG_DIR + os.sep) or a.startswith(_USER_DIRS):
            return fn, f.f_lineno
        f = f.f_back
    return "<unknown>", 0


def where_now():
    """Return the site record of an op running now: (phase, file, line[, forward prim, its file, its line])."""
    fn, ln = user_site()
    node = core._State.backward_of
    if node is None:
        return ("forward", fn, ln)
    fw = getattr(node, "where", None)
    return ("backward", fn, ln, node.prim.name) + ((fw[1], fw[2]) if fw else ("<unknown>", 0))


def _line(fn, ln):
    src = linecache.getline(fn, ln).strip() if ln else ""
    return f'File "{fn}", line {ln}' + (f": {src}" if src else "")


def _sig(a):
    if isinstance(a, tuple):
        return "(" + ", ".join(_sig(x) for x in a) + ")"
    shape = tuple(getattr(a, "shape", ()))
    return f"{np.dtype(getattr(a, 'dtype', np.float64))}{list(shape)}"


def _message(prim_name, kind, inputs, site, labels, context=""):
    phase = site[0] if site else "forward"
    head = f"jitnet.debug_nans: {prim_name} produced {kind} in the {phase} pass{context}"
    if phase == "backward" and len(site) > 3:
        head += f" (an op of {site[3]}'s gradient)"
    lines = [head, f"  {prim_name}({', '.join(_sig(a) for a in inputs)})"]
    for k, a in enumerate(inputs):
        if kind == "NaN" and check_array(a) == "NaN":
            lines.append(f"  input {k} ({_sig(a)}) was already NaN: {labels(k)}")
            break
    if site:
        if phase == "backward":
            if len(site) > 3 and site[5]:
                lines.append(f"  the forward {site[3]} ran at {_line(site[4], site[5])}")
            elif len(site) > 3:
                lines.append(f"  (the forward {site[3]} ran before debug_nans was on, so its line is not known)")
            lines.append(f"  the gradient was requested at {_line(site[1], site[2])}")
        else:
            lines.append(f"  at {_line(site[1], site[2])}")
    return "\n".join(lines)


def raise_nonfinite(prim, kind, inputs, params, site, labels, context=""):
    """Raise FloatingPointError for ``prim``'s non-finite output unless the infinity is one passed in on purpose."""
    if _allowed(kind, inputs, params):
        return
    raise FloatingPointError(_message(prim.name, kind, inputs, site, labels, context))


def _eager_label(k):
    return "it was not made by a jitnet op while debug_nans was on (data passed in, or computed with the mode off)"


def check_eager(prim, inputs, params, out):
    """Check the output of an eager op (installed as ``autodiff.core._NAN_CHECK`` while the mode is on)."""
    node = out._node
    if node is not None:
        node.where = where_now()
    kind = check_array(out._data)
    if kind is not None:
        raise_nonfinite(prim, kind, [t._data for t in inputs], params, where_now(), _eager_label)


def value_label(v):
    """Return where graph value ``v`` comes from, in words (for a non-finite input of a compiled step)."""
    kind = getattr(v, "kind", None)
    if kind == "arg":
        return (f"argument {v.arg_index} of the compiled step" if v.arg_index is not None
                else "an input of the compiled loop body")
    if kind == "state":
        return f"the value of variable {v.name or ''}{list(v.shape)} when the step started"
    if kind == "gradin":
        return f"the accumulated .grad of a variable {list(v.shape)}"
    if kind == "const":
        return "a constant the step captured"
    return "an earlier op's output"


def checked_step(step, node, in_slots, o):
    """Return plan step ``step`` (running graph ``node`` into slot ``o``) followed by a check of its output."""
    prim, params = node.prim, node.params
    site = getattr(node, "where", None)
    ins = list(node.inputs)

    def labels(k):
        return value_label(ins[k])

    def run(env):
        step(env)
        kind = check_array(env[o])
        if kind is not None:
            raise_nonfinite(prim, kind, [env[i] for i in in_slots], params, site, labels, " of a jitted step")
    return run


if os.environ.get("JITNET_DEBUG_NANS", "").strip().lower() not in ("", "0", "false", "no", "off"):
    _set(True)
