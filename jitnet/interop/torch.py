"""PyTorch weights in and out: map a PyTorch state dict onto a jitnet model and a jitnet model back to one.

PyTorch and jitnet name and lay out the same layers differently, so a state dict cannot be copied key by key:

============================  ===============================================  ==============================
layer                         jitnet                                           PyTorch
============================  ===============================================  ==============================
``Linear``                    ``W`` (in, out), ``b``                           ``weight`` (out, in), ``bias``
``Conv2d``                    ``W`` (out, in, kh, kw), ``b`` (cross-corr.)     ``weight``, ``bias`` (the same)
``BatchNorm1d/2d``            ``gamma``, ``beta``, ``moving_mean/var``         ``weight``, ``bias``,
                                                                               ``running_mean/var``,
                                                                               ``num_batches_tracked``
``Embedding``                 ``W`` (num, dim)                                 ``weight`` (the same)
``LSTM`` / ``LSTMCell``       ``W_ih`` (in, 4H), ``W_hh`` (H, 4H), ``b``       ``weight_ih`` (4H, in),
                              gates [i, f, g, o]                               ``weight_hh``, ``bias_ih`` +
                                                                               ``bias_hh``, gates [i, f, g, o]
``GRU`` / ``GRUCell``         ``W_ih``, ``W_hh``, ``b_ih``, ``b_hh``,          the same equations, transposed
                              gates [r, z, n], PyTorch's equations             weights
``RNN`` / ``RNNCell``         ``W_ih``, ``W_hh``, ``b``                        transposed, ``bias_ih + bias_hh``
============================  ===============================================  ==============================

A multi-layer ``jitnet.nn.LSTM`` keeps one cell per layer (``lstm/layer_1/W_ih``) where ``torch.nn.LSTM`` has
flat names (``lstm.weight_ih_l1``); both are seen as one *unit* per layer. Attention layers
(``BahdanauAttention``, ``LuongAttention``) are made of ``Linear`` units and map through them.

Matching walks both trees as lists of units (a unit is one layer: its weights together). A unit is paired
first with the PyTorch unit of the same name (``fc1`` with ``fc1.weight``; ``"/"`` and ``"."`` alike) when
kinds and shapes fit, then the remaining units are paired in order with the next PyTorch unit whose kind and
shapes fit. Whatever stays unpaired is reported by name and shape: ``strict=True`` raises ``ValueError`` naming
it; ``strict=False`` loads the pairs and returns the :class:`TorchMapping` report.

Order: a ``torch.nn.Module`` or its ``state_dict()`` (an ``OrderedDict``) is walked in registration order; any
other mapping (e.g. what ``safetensors.numpy.load_file`` returns: safetensors files store names sorted, not in
registration order) is walked in natural name order (``2.weight`` before ``10.weight``).

Not mapped (reported with the reason): bidirectional recurrent layers (``*_reverse``), ``LSTM(proj_size=)``,
``torch.nn.MultiheadAttention``, and layers jitnet does not have (``LayerNorm``, ``Conv1d``, ...).

A PyTorch ``Linear``/``Conv2d``/``LSTM`` made with ``bias=False`` loads into a jitnet layer with a bias as a
zero bias; the way back, a nonzero jitnet bias that the PyTorch layer cannot hold is reported.

Only weights and running statistics are mapped: the layers' settings (padding, stride, eps, an RNN's
nonlinearity, dropout) are the two model definitions' to agree on.

Nothing here imports PyTorch unless a torch module or tensor is given, or ``as_torch=True`` is asked for.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..io.safetensors import load_file, save_file
from ..nn.layers import Conv2d, Embedding, Linear, _BatchNorm
from ..nn.module import Module
from ..nn.recurrent import GRUCell, LSTMCell, RNNCell, _SeqBase
from ..tensor import Tensor

__all__ = ["TorchMapping", "load_torch_state_dict", "torch_state_dict", "save_torch_safetensors",
           "match_torch_state_dict"]

_EXTRA = 'pip install "jitnet[interop]"'
_CELL_ROLES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_LAYER_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")


# ==============================================================================================================
# The report
# ==============================================================================================================

@dataclass
class TorchMapping:
    """What a mapping between a jitnet model and a PyTorch state dict paired and what it left out.

    ``pairs``: (jitnet unit, [PyTorch keys]) for every unit mapped; ``missing``: (jitnet variable, shape) that
    got no value; ``unexpected``: (PyTorch key, shape, reason) not used; ``ignored``: PyTorch keys with no
    jitnet counterpart that do not affect outputs (``num_batches_tracked``); ``notes``: other problems (a bias
    that cannot be written, shapes that differ under the same name).
    """

    pairs: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def complete(self):
        """Return True when every variable and every PyTorch entry was mapped and nothing was lost."""
        return not (self.missing or self.unexpected or self.notes)

    def __str__(self):
        lines = [f"{len(self.pairs)} unit(s) mapped"]
        if self.missing:
            lines.append(f"{len(self.missing)} jitnet variable(s) got no PyTorch value:")
            lines += [f"  {n} {tuple(s)}" for n, s in self.missing]
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} PyTorch entr{'y' if len(self.unexpected) == 1 else 'ies'} "
                         "not used:")
            prev = None
            for k, s, why in self.unexpected:      # a unit's reason once, on its first entry
                lines.append(f"  {k} {tuple(s)}" + (f" ({why})" if why and why != prev else ""))
                prev = why
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ==============================================================================================================
# Units: one layer's weights together
# ==============================================================================================================

class _Unit:
    """One layer's weights: ``kind``, a name for matching, and its tensors by role."""

    __slots__ = ("name", "kind", "tensors", "keys", "layer", "prefix", "reason")

    def __init__(self, name, kind, tensors, keys=None, layer=None, prefix=None, reason=None):
        self.name, self.kind, self.tensors = name, kind, tensors
        self.keys = keys or {}        # role -> full PyTorch key (PyTorch units)
        self.layer, self.prefix, self.reason = layer, prefix, reason

    def shape(self, role):
        return tuple(self.tensors[role].shape)


def _jitnet_kind(m):
    if isinstance(m, Linear):
        return "linear"
    if isinstance(m, Conv2d):
        return "conv"
    if isinstance(m, _BatchNorm):
        return "bn"
    if isinstance(m, Embedding):
        return "embedding"
    if isinstance(m, LSTMCell):
        return "lstm"
    if isinstance(m, GRUCell):
        return "gru"
    if isinstance(m, RNNCell):
        return "rnn"
    return "generic"


def _jitnet_units(model):
    """Return the units of a jitnet module tree in registration order (each variable in one unit)."""
    if not isinstance(model, Module):
        raise TypeError(f"expected a jitnet.nn.Module, got {type(model).__name__}")
    units, seen = [], set()
    parents = {}
    for path, m in model.named_modules():
        if isinstance(m, _SeqBase):
            for i, cell in enumerate(m.cells()):
                parents[id(cell)] = (path, i)
        own = OrderedDict()
        for n, v in list(m._parameters.items()) + list(m._buffers.items()):
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            own[n] = v
        if not own:
            continue
        prefix, layer = parents.get(id(m), (None, None))
        units.append(_Unit(path.replace("/", "."), _jitnet_kind(m), own, layer=layer, prefix=prefix))
    return units


def _natural_key(name):
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def _is_torch_module(obj):
    """Return True for a torch.nn.Module instance (without importing torch)."""
    return any(c.__name__ == "Module" and c.__module__.startswith("torch.nn") for c in type(obj).__mro__)


def _to_numpy(v, key):
    """Return ``v`` (a torch tensor, jitnet tensor or array-like) as a NumPy array (float32 for 16-bit floats)."""
    if isinstance(v, Tensor):
        a = v.numpy()
    elif hasattr(v, "detach") and type(v).__module__.split(".")[0] == "torch":
        t = v.detach().cpu()
        if t.is_floating_point() and t.element_size() < 4:
            t = t.float()
        a = t.numpy()
    else:
        a = np.asarray(v)
    if a.dtype.kind == "V" or (a.dtype.kind == "f" and a.dtype.itemsize < 4) or a.dtype.name == "bfloat16":
        a = a.astype(np.float32)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"PyTorch entry {key!r}: dtype {a.dtype} is not a number type")
    return a


def _torch_state(state, where):
    """Return an ordered list of (key, NumPy array) from a torch module, a state dict or a safetensors path."""
    keep_order = False
    if isinstance(state, (str, os.PathLike)):
        state = load_file(state)
    elif _is_torch_module(state):
        state = state.state_dict()
        keep_order = True
    if not isinstance(state, Mapping):
        raise TypeError(f"{where}: expected a PyTorch state dict (a mapping of names to tensors or arrays), a "
                        f"torch.nn.Module or a safetensors path, got {type(state).__name__}")
    keep_order = keep_order or type(state) is OrderedDict
    items = [(str(k), _to_numpy(v, k)) for k, v in state.items()]
    if not keep_order:
        items.sort(key=lambda kv: _natural_key(kv[0]))
    return items


def _torch_units(items):
    """Group ordered (key, array) pairs into PyTorch units (a torch.nn.LSTM layer is one unit per layer)."""
    groups = OrderedDict()
    for key, arr in items:
        prefix, _, role = key.rpartition(".")
        mt = _LAYER_KEY.match(role)
        if mt:
            base, layer, rev = mt.group(1), int(mt.group(2)), mt.group(3)
            gname = (f"{prefix}." if prefix else "") + f"layer_{layer}" + ("_reverse" if rev else "")
            g = groups.setdefault(("L", gname), (gname, OrderedDict(), OrderedDict(), prefix, layer, bool(rev)))
            g[1][base] = arr
            g[2][base] = key
        else:
            g = groups.setdefault(("M", prefix), (prefix, OrderedDict(), OrderedDict(), None, None, False))
            g[1][role] = arr
            g[2][role] = key
    units = []
    for name, tensors, keys, prefix, layer, rev in groups.values():
        kind, reason = _classify(tensors, rev)
        units.append(_Unit(name, kind, tensors, keys, layer=layer, prefix=prefix, reason=reason))
    return units


def _classify(t, reverse):
    """Return (kind, reason it cannot map or None) of a PyTorch unit from its roles and shapes."""
    roles = set(t)
    if reverse:
        return "unsupported", "bidirectional recurrent layers have no jitnet counterpart"
    if "weight_hr" in roles:
        return "unsupported", "LSTM(proj_size=...) has no jitnet counterpart"
    if {"in_proj_weight", "q_proj_weight"} & roles:
        return "unsupported", "torch.nn.MultiheadAttention has no jitnet counterpart"
    if {"weight_ih", "weight_hh"} <= roles and roles <= set(_CELL_ROLES):
        wih, whh = t["weight_ih"], t["weight_hh"]
        if wih.ndim == 2 and whh.ndim == 2 and whh.shape[1] and wih.shape[0] == whh.shape[0] \
                and whh.shape[0] % whh.shape[1] == 0:
            kind = {4: "lstm", 3: "gru", 1: "rnn"}.get(whh.shape[0] // whh.shape[1])
            if kind:
                return kind, None
        return "unsupported", f"recurrent weights of shapes {wih.shape} and {whh.shape} fit no jitnet cell"
    if "running_mean" in roles and "running_var" in roles \
            and roles <= {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}:
        return "bn", None
    if "weight" in roles and roles <= {"weight", "bias"}:
        nd = t["weight"].ndim
        if nd == 2:
            return "w2d", None
        if nd == 4:
            return "conv", None
        if nd == 1:
            return "unsupported", ("a 1-D weight without running statistics (LayerNorm, GroupNorm, BatchNorm "
                                   "without track_running_stats): no jitnet counterpart")
        return "unsupported", f"a {nd}-D weight (Conv1d, Conv3d, ...): no jitnet counterpart"
    return "generic", None


# ==============================================================================================================
# Compatibility and conversion, per kind
# ==============================================================================================================

def _shape_of(v):
    return tuple(v.shape)


def _fits(ju, tu):
    """Return True when jitnet unit ``ju`` and PyTorch unit ``tu`` are the same layer with fitting shapes."""
    j, t = ju.tensors, tu.tensors
    k = ju.kind
    if k == "linear":
        if tu.kind != "w2d" or ("bias" in t and "b" not in j):    # no bias in torch: jitnet's b becomes 0
            return False
        ok = tu.shape("weight") == _shape_of(j["W"])[::-1]
        return ok and ("b" not in j or "bias" not in t or tu.shape("bias") == _shape_of(j["b"]))
    if k == "embedding":
        return tu.kind == "w2d" and "bias" not in t and tu.shape("weight") == _shape_of(j["W"])
    if k == "conv":
        if tu.kind != "conv" or ("bias" in t and "b" not in j):
            return False
        return tu.shape("weight") == _shape_of(j["W"]) and ("b" not in j or "bias" not in t
                                                            or tu.shape("bias") == _shape_of(j["b"]))
    if k == "bn":
        if tu.kind != "bn" or ("gamma" in j) != ("weight" in t) or ("beta" in j) != ("bias" in t):
            return False
        c = _shape_of(j["moving_mean"])
        return all(tu.shape(r) == c for r in ("running_mean", "running_var", "weight", "bias") if r in t)
    if k in ("lstm", "gru", "rnn"):
        if tu.kind != k:
            return False
        if tu.shape("weight_ih") != _shape_of(j["W_ih"])[::-1] or tu.shape("weight_hh") != _shape_of(j["W_hh"])[::-1]:
            return False
        g = _shape_of(j["W_hh"])[1]
        return all(tu.shape(r) == (g,) for r in ("bias_ih", "bias_hh") if r in t)
    # a module jitnet does not know: the same names and shapes
    return tu.kind == "generic" and list(t) == list(j) and all(tu.shape(n) == _shape_of(v) for n, v in j.items())


def _to_jitnet(ju, tu):
    """Return {jitnet variable name: array} for PyTorch unit ``tu`` converted into jitnet unit ``ju``'s layout."""
    t, k = tu.tensors, ju.kind
    if k in ("linear", "conv"):
        out = {"W": t["weight"].T if k == "linear" else t["weight"]}
        if "b" in ju.tensors:         # a PyTorch layer made with bias=False is the same layer with a zero bias
            out["b"] = t["bias"] if "bias" in t else np.zeros(_shape_of(ju.tensors["b"]), t["weight"].dtype)
        return out
    if k == "embedding":
        return {"W": t["weight"]}
    if k == "bn":
        out = {"moving_mean": t["running_mean"], "moving_var": t["running_var"]}
        if "weight" in t:
            out["gamma"] = t["weight"]
        if "bias" in t:
            out["beta"] = t["bias"]
        return out
    if k in ("lstm", "gru", "rnn"):
        g = t["weight_hh"].shape[0]
        zero = np.zeros(g, t["weight_hh"].dtype)
        bih, bhh = t.get("bias_ih", zero), t.get("bias_hh", zero)
        out = {"W_ih": t["weight_ih"].T, "W_hh": t["weight_hh"].T}
        if k == "gru":
            out.update(b_ih=bih, b_hh=bhh)
        else:       # jitnet adds one bias: PyTorch's two summed
            out["b"] = bih + bhh
        return out
    return dict(t)


def _to_torch(ju, roles=None):
    """Return {PyTorch role: array} of jitnet unit ``ju``; ``roles`` (the target's roles) limits the biases.

    Also returns a list of notes for values that cannot be written into the target (a nonzero bias where the
    target has none).
    """
    j = {n: v.numpy() for n, v in ju.tensors.items()}
    k, notes = ju.kind, []
    if k == "linear":
        out = {"weight": j["W"].T}
        if "b" in j:
            out["bias"] = j["b"]
    elif k in ("embedding", "conv"):
        out = {"weight": j["W"], **({"bias": j["b"]} if "b" in j else {})}
    elif k == "bn":
        out = {}
        if "gamma" in j:
            out["weight"] = j["gamma"]
        if "beta" in j:
            out["bias"] = j["beta"]
        out.update(running_mean=j["moving_mean"], running_var=j["moving_var"],
                   num_batches_tracked=np.array(0, np.int64))
    elif k in ("lstm", "gru", "rnn"):
        out = {"weight_ih": j["W_ih"].T, "weight_hh": j["W_hh"].T}
        if k == "gru":
            out.update(bias_ih=j["b_ih"], bias_hh=j["b_hh"])
        else:
            out.update(bias_ih=j["b"], bias_hh=np.zeros_like(j["b"]))
        if roles is not None and not ({"bias_ih", "bias_hh"} & set(roles)):
            _drop_bias(ju, out["bias_ih"] + out["bias_hh"], notes)
            del out["bias_ih"], out["bias_hh"]
    else:
        out = dict(j)
    if roles is not None:
        if k in ("linear", "conv") and "bias" in out and "bias" not in roles:
            _drop_bias(ju, out["bias"], notes)
        out = {r: out[r] for r in roles if r in out}
    return {r: np.ascontiguousarray(a) for r, a in out.items()}, notes


def _drop_bias(ju, bias, notes):
    """Note a nonzero jitnet bias that a bias-free PyTorch layer cannot hold (a zero one is no loss)."""
    if np.any(bias != 0):
        notes.append(f"{ju.name or '<root>'}: the PyTorch layer has no bias, but the jitnet bias is not zero "
                     f"(max |b| = {float(np.abs(bias).max()):.3g}); it is dropped")


# ==============================================================================================================
# Matching
# ==============================================================================================================

def _match(junits, tunits):
    """Return (pairs [(ju, tu)], jitnet units left, PyTorch units left, notes): by name, then in order."""
    pairs, notes = [], []
    by_name = {}
    for tu in tunits:
        by_name.setdefault(tu.name, []).append(tu)
    used_t, used_j = set(), set()
    for ju in junits:
        for tu in by_name.get(ju.name, ()):
            if id(tu) in used_t:
                continue
            if _fits(ju, tu):
                pairs.append((ju, tu))
                used_t.add(id(tu))
                used_j.add(id(ju))
                break
    rest_t = [tu for tu in tunits if id(tu) not in used_t and tu.kind != "unsupported"]
    pos = 0
    for ju in junits:
        if id(ju) in used_j:
            continue
        for i in range(pos, len(rest_t)):
            if _fits(ju, rest_t[i]):
                pairs.append((ju, rest_t[i]))
                used_t.add(id(rest_t[i]))
                used_j.add(id(ju))
                pos = i + 1
                break
    left_j = [ju for ju in junits if id(ju) not in used_j]
    left_t = [tu for tu in tunits if id(tu) not in used_t]
    for ju in left_j:        # say which PyTorch unit came closest and how its shapes differ
        near = [tu for tu in by_name.get(ju.name, ()) if id(tu) not in used_t and _same_kind(ju, tu)]
        near = near or [tu for tu in left_t if _same_kind(ju, tu)]
        if near:
            tu = near[0]
            want = ", ".join(f"{r} {a.shape}" for r, a in _to_torch(ju)[0].items() if r in tu.tensors)
            got = ", ".join(f"{r} {tu.shape(r)}" for r in tu.tensors)
            notes.append(f"jitnet {ju.name or '<root>'} ({ju.kind}) needs PyTorch [{want}]; the nearest "
                         f"unmatched PyTorch layer {tu.name or '<root>'} has [{got}]")
    order = {id(ju): i for i, ju in enumerate(junits)}
    pairs.sort(key=lambda p: order[id(p[0])])
    return pairs, left_j, left_t, notes


def _same_kind(ju, tu):
    """Return True when PyTorch unit ``tu`` is the kind of layer jitnet unit ``ju`` is (shapes aside)."""
    if ju.kind in ("linear", "embedding"):
        return tu.kind == "w2d"
    return tu.kind == ju.kind and ju.kind != "generic"


def _report(pairs, left_j, left_t, notes):
    rep = TorchMapping(notes=list(notes))
    for ju, tu in pairs:
        rep.pairs.append((ju.name, list(tu.keys.values())))
        if "num_batches_tracked" in tu.keys:
            rep.ignored.append(tu.keys["num_batches_tracked"])
    for ju in left_j:
        for n, v in ju.tensors.items():
            rep.missing.append((f"{ju.name}.{n}".lstrip(".").replace(".", "/"), _shape_of(v)))
    for tu in left_t:
        for r, key in tu.keys.items():
            rep.unexpected.append((key, tu.shape(r), tu.reason))
    return rep


def _raise(rep, where):
    raise ValueError(f"{where}: the model and the PyTorch state dict do not match (strict=True; pass "
                     f"strict=False to load what matches and get this report back)\n{rep}")


def match_torch_state_dict(model, state):
    """Return the :class:`TorchMapping` that :func:`load_torch_state_dict` would apply, changing nothing."""
    junits = _jitnet_units(model)
    tunits = _torch_units(_torch_state(state, "match_torch_state_dict"))
    return _report(*_match(junits, tunits))


def load_torch_state_dict(model, state, strict=True):
    """Copy a PyTorch state dict into jitnet ``model`` (converting layouts); return the :class:`TorchMapping`.

    ``state``: a mapping of PyTorch names to torch tensors or NumPy arrays (``torch_model.state_dict()``,
    ``safetensors.numpy.load_file(path)``), a ``torch.nn.Module``, or the path of a safetensors file (saved
    by ``safetensors.torch.save_file``). With ``strict=True`` (default) nothing is written and ``ValueError``
    names every jitnet variable and PyTorch entry left unmatched (with shapes); with ``strict=False`` the
    matched units are written and the report lists the rest.
    """
    where = "load_torch_state_dict"
    junits = _jitnet_units(model)
    tunits = _torch_units(_torch_state(state, where))
    pairs, left_j, left_t, notes = _match(junits, tunits)
    rep = _report(pairs, left_j, left_t, notes)
    if strict and not rep.complete:
        _raise(rep, where)
    for ju, tu in pairs:
        for n, arr in _to_jitnet(ju, tu).items():
            var = ju.tensors[n]
            var.assign(np.ascontiguousarray(arr).astype(var.dtype, copy=False))
    return rep


def _default_key(ju, role):
    if ju.layer is not None:          # a layer of a jitnet LSTM/GRU/RNN: torch.nn.LSTM's flat names
        prefix = ju.prefix.replace("/", ".")
        return (f"{prefix}." if prefix else "") + f"{role}_l{ju.layer}"
    return f"{ju.name}.{role}" if ju.name else role


def _as_torch_tensors(out):
    try:
        import torch
    except ImportError:
        raise ImportError(f"torch_state_dict(as_torch=True) needs PyTorch: {_EXTRA}") from None
    return OrderedDict((k, torch.from_numpy(np.array(v, copy=True))) for k, v in out.items())


def torch_state_dict(model, like=None, as_torch=False, strict=True, return_report=False):
    """Return jitnet ``model``'s weights as a PyTorch-layout state dict (an OrderedDict of NumPy arrays).

    Without ``like`` the names are the ones PyTorch gives the same tree (``0.weight`` for ``0/W``; a jitnet
    ``LSTM``'s layers as ``torch.nn.LSTM``'s ``weight_ih_l0``...). With ``like`` (a torch module, its state
    dict, or a safetensors path) the units are matched to it as :func:`load_torch_state_dict` does and its
    names are used, so ``torch_model.load_state_dict(torch_state_dict(model, like=torch_model, as_torch=True))``
    works across differently named trees; ``strict`` then raises ``ValueError`` naming anything unmatched.
    ``as_torch=True`` returns torch tensors (needs PyTorch). ``return_report=True`` returns (state, report).
    """
    junits = _jitnet_units(model)
    out, rep = OrderedDict(), TorchMapping()
    if like is None:
        for ju in junits:
            vals, _ = _to_torch(ju)
            for role, arr in vals.items():
                out[_default_key(ju, role)] = arr
            rep.pairs.append((ju.name, [_default_key(ju, r) for r in vals]))
    else:
        tunits = _torch_units(_torch_state(like, "torch_state_dict"))
        pairs, left_j, left_t, notes = _match(junits, tunits)
        rep = _report(pairs, left_j, left_t, notes)
        got = {}
        for ju, tu in pairs:
            vals, more = _to_torch(ju, roles=list(tu.keys))
            rep.notes.extend(more)
            for role, arr in vals.items():
                key = tu.keys[role]
                want = tu.tensors[role]
                got[key] = arr.astype(want.dtype, copy=False) if arr.dtype != want.dtype else arr
        if strict and not rep.complete:
            _raise(rep, "torch_state_dict")
        for tu in tunits:             # the target's order
            for key in tu.keys.values():
                if key in got:
                    out[key] = got[key]
    if as_torch:
        out = _as_torch_tensors(out)
    return (out, rep) if return_report else out


def save_torch_safetensors(model, path, like=None, metadata=None, strict=True):
    """Write ``model``'s weights in PyTorch layout to the safetensors file ``path``; return the key list.

    PyTorch reads it with ``safetensors.torch.load_file(path)`` and ``torch_model.load_state_dict``; names
    and ``like`` as in :func:`torch_state_dict`.
    """
    state = torch_state_dict(model, like=like, strict=strict)
    save_file(state, path, metadata=metadata)
    return list(state)
