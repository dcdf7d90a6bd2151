"""Optimizers over parameter lists: PyTorch's ``zero_grad / backward / step`` and TensorFlow's ``minimize``.

Each optimizer keeps ``param_groups`` (a list of dicts: ``"params"`` plus the hyperparameters of that group),
``state`` (per parameter, a dict of slot variables: non-trainable ``jitnet.Variable`` tensors), and a
``global_step`` variable (int64) that ``step()`` increments. Every parameter update is a single primitive
call (:mod:`jitnet.optim.updates`): one fused in-place kernel over the parameter and its slots, which a
tracing compiler records as an effect on those variables.

Sparse gradients (:class:`jitnet.autodiff.sparse.IndexedSlices`, from embedding lookups) update only the
rows they name: SGD, AdaGrad and Adam have row kernels; RMSProp densifies them. Sparse SGD-with-momentum and
sparse Adam are *lazy* (TensorFlow's sparse momentum / LazyAdam, PyTorch's SparseAdam): the slots of rows
that were not looked up keep their values instead of decaying, and those rows do not move. Weight decay on
a sparse gradient likewise applies to the looked-up rows only. Adam's bias correction uses the optimizer's
``global_step`` (one count for all parameters, as in TensorFlow), not a per-parameter count.
"""
from __future__ import annotations

import numbers

import numpy as np

from .. import ops
from ..autodiff import core as _ad
from ..autodiff.backprop import gradients
from ..autodiff.core import enable_grad, no_grad
from ..autodiff.sparse import IndexedSlices
from ..io.checkpoint import unflatten_state
from ..lowp import is_floating
from ..tensor import Tensor, Variable
from . import updates as U
from .clip import clip_by_global_norm

__all__ = ["Optimizer", "SGD", "AdaGrad", "Adagrad", "RMSProp", "RMSprop", "Adam", "AdamW"]


def _f64(x):
    return Tensor._wrap(np.array(float(x), np.float64))


class Optimizer:
    """Base optimizer: param_groups, per-parameter slot variables, a global_step, step()/minimize()."""

    #: hyperparameters that may be a learning-rate schedule instead of a number
    _needs_step = False

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self.param_groups = []
        self.state = {}                    # id(param) -> {slot name: Variable}
        self._owner = {}                   # id(param) -> group
        self.global_step = Variable(np.array(0, np.int64), trainable=False, name="global_step", device="cpu")
        if isinstance(params, Tensor):
            raise TypeError("optimizer: params must be an iterable of tensors or of dicts, got a single Tensor "
                            "(wrap it in a list)")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        if isinstance(params[0], dict):
            for g in params:
                self.add_param_group(g)
        else:
            self.add_param_group({"params": params})

    # -- groups and slots ----------------------------------------------------------------------------------------
    def add_param_group(self, group):
        """Add a dict ``{"params": [...], hyperparameter overrides...}`` to ``param_groups``; return the group."""
        group = dict(group)
        params = group.get("params")
        if params is None:
            raise ValueError("add_param_group: the group has no 'params'")
        params = [params] if isinstance(params, Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            raise ValueError("optimizer: a parameter appears twice in a group")
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer: parameters must be tensors, got {type(p).__name__}")
            if not is_floating(p.dtype):
                raise TypeError(f"optimizer: parameter {p.name or ''} has dtype {p.dtype}; only floating "
                                "tensors can be optimized")
            if id(p) in self._owner:
                raise ValueError("optimizer: a parameter appears in more than one group (or twice)")
        for k in group:
            if k != "params" and k not in self.defaults:
                raise TypeError(f"{type(self).__name__}: unknown hyperparameter {k!r}")
        full = dict(self.defaults)
        full.update(group)
        full["params"] = params
        self._check_hyper(full)
        self.param_groups.append(full)
        for p in params:
            self._owner[id(p)] = full
            self._slots(p, full)
        return full

    def _check_hyper(self, group):
        lr = group["lr"]
        if isinstance(lr, numbers.Real) and lr < 0:
            raise ValueError(f"{type(self).__name__}: invalid learning rate {lr}")
        if group.get("weight_decay", 0.0) < 0:
            raise ValueError(f"{type(self).__name__}: invalid weight_decay {group['weight_decay']}")

    def _slot_inits(self, group):
        """Return {slot name: initial value} of the slots a parameter needs under ``group``'s settings."""
        return {}

    def _slots(self, p, group):
        """Return the slot variables of ``p``, creating any that ``group`` needs and that do not exist yet."""
        st = self.state.get(id(p))
        if st is None:
            st = self.state[id(p)] = {}
        for name, init in self._slot_inits(group).items():
            if name not in st:
                base = p.name or f"param{len(self.state) - 1}"
                st[name] = Variable(np.full(p.shape, init, p.dtype), trainable=False, name=f"{base}/{name}")
        if _ad._DEVICES:                 # slots live on their parameter's device (it may have moved)
            dev = p.device
            for v in st.values():
                if v.device != dev:
                    v._move_(dev)
        return st

    def _all_params(self):
        return [p for g in self.param_groups for p in g["params"]]

    # -- the PyTorch loop ----------------------------------------------------------------------------------------
    def zero_grad(self, set_to_none=True):
        """Clear ``.grad`` of every parameter (None, or zeros when ``set_to_none`` is False); return None."""
        for p in self._all_params():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad = ops.zeros_like(p)

    def _lr(self, group):
        lr = group["lr"]
        if isinstance(lr, Tensor):           # a 0-d variable (set by an lr_scheduler): read by compiled steps
            return lr if lr.dtype == np.float64 else ops.astype(lr, np.float64)
        if callable(lr):
            v = lr(self.global_step)
            if isinstance(v, Tensor):
                return v if v.dtype == np.float64 else ops.astype(v, np.float64)
            return _f64(v)
        return _f64(lr)

    def _step_tensor(self):
        """Return the 1-based number of the step being taken as a 0-d float64 tensor."""
        return ops.astype(self.global_step, np.float64) + 1.0

    def step(self, closure=None):
        """Update every parameter that has a ``.grad``, increment ``global_step``; return closure's loss or None."""
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        with no_grad():
            t = self._step_tensor() if self._needs_step else None
            for group in self.param_groups:
                lr = None
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if lr is None:
                        lr = self._lr(group)
                    self._apply_one(p, p.grad, group, lr, t)
            self.global_step.assign(self.global_step + 1)
        return loss

    # -- the TensorFlow way ---------------------------------------------------------------------------------------
    def compute_gradients(self, loss_fn, var_list=None):
        """Return (loss, [(gradient, variable), ...]) for ``loss_fn()`` (a tensor or a function returning one)."""
        if var_list is None:
            var_list = [p for p in self._all_params() if getattr(p, "trainable", True)]
        var_list = list(var_list)
        with enable_grad():
            loss = loss_fn() if callable(loss_fn) else loss_fn
        if not isinstance(loss, Tensor):
            raise TypeError(f"minimize: the loss must be a Tensor, got {type(loss).__name__}")
        grads = gradients(loss, var_list, create_graph=False) if loss.requires_grad else \
            [ops.zeros_like(v) for v in var_list]
        if isinstance(grads, (Tensor, IndexedSlices)):
            grads = [grads]
        return loss, list(zip(grads, var_list))

    def apply_gradients(self, grads_and_vars):
        """Apply one update with the given (gradient, variable) pairs, increment ``global_step``; return None."""
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        with no_grad():
            t = self._step_tensor() if self._needs_step else None
            lrs = {}
            for g, v in pairs:
                group = self._owner.get(id(v))
                if group is None:
                    group = self.add_param_group({"params": [v]})
                key = id(group)
                if key not in lrs:
                    lrs[key] = self._lr(group)
                self._apply_one(v, g, group, lrs[key], t)
            self.global_step.assign(self.global_step + 1)

    def minimize(self, loss_fn, var_list=None):
        """Compute gradients of ``loss_fn()`` w.r.t. ``var_list`` (default: all), apply them; return the loss."""
        loss, gv = self.compute_gradients(loss_fn, var_list)
        self.apply_gradients(gv)
        return loss.detach()

    def clip_grad_norm(self, max_norm):
        """Scale every ``.grad`` so that their global norm is at most ``max_norm``; return the norm before."""
        params = [p for p in self._all_params() if p.grad is not None]
        with no_grad():
            clipped, norm = clip_by_global_norm([p.grad for p in params], max_norm)
        for p, g in zip(params, clipped):
            p.grad = g
        return norm

    # -- one parameter -------------------------------------------------------------------------------------------
    def _apply_one(self, p, g, group, lr, t):
        slots = self._slots(p, group)
        if isinstance(g, IndexedSlices):
            if g.dense_shape != tuple(p.shape):
                raise ValueError(f"{type(self).__name__}: sparse gradient of dense shape {g.dense_shape} for a "
                                 f"parameter of shape {p.shape}")
            if self._sparse_update(p, g, slots, group, lr, t):
                return
            g = g.to_dense()
        if not isinstance(g, Tensor):
            g = Tensor(np.asarray(g, dtype=p.dtype))
        if g.shape != p.shape:
            raise ValueError(f"{type(self).__name__}: gradient of shape {g.shape} for a parameter of shape "
                             f"{p.shape}")
        self._dense_update(p, g, slots, group, lr, t)

    def _dense_update(self, p, g, slots, group, lr, t):
        raise NotImplementedError

    def _sparse_update(self, p, g, slots, group, lr, t):
        """Apply a row update for IndexedSlices ``g``; return False when the optimizer has no sparse kernel."""
        return False

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self):
        """Return {"global_step", "state": {i: {slot: Tensor}}, "param_groups": {j: {hyper: Tensor}}} (copies)."""
        params = self._all_params()
        state = {}
        for i, p in enumerate(params):
            st = self.state.get(id(p))
            if st:
                state[str(i)] = {k: Tensor(v.numpy().copy()) for k, v in st.items()}
        groups = {}
        for j, g in enumerate(self.param_groups):
            hyper = {}
            for k, v in g.items():
                if isinstance(v, Tensor) and v.ndim == 0:
                    hyper[k] = Tensor(np.asarray(v.numpy(), np.float64).copy())
                    continue
                if k == "params" or callable(v):
                    continue
                if isinstance(v, (bool, numbers.Real)) or (isinstance(v, tuple) and all(
                        isinstance(x, numbers.Real) for x in v)):
                    hyper[k] = Tensor(np.asarray(v, np.float64))
            groups[str(j)] = hyper
        return {"global_step": Tensor(self.global_step.numpy().copy()), "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore global_step, slot variables and numeric hyperparameters from ``state_dict``; return None."""
        sd = dict(state_dict)
        if any("/" in k for k in sd):                       # the flat form that jn.load returns
            sd = unflatten_state(sd)
        params = self._all_params()
        if "global_step" in sd:
            self.global_step.assign(np.asarray(sd["global_step"], np.int64))
        for key, slots in sd.get("state", {}).items():
            i = int(key)
            if not 0 <= i < len(params):
                raise ValueError(f"load_state_dict: state for parameter {i}, but the optimizer has "
                                 f"{len(params)} parameters")
            p = params[i]
            st = self._slots(p, self._owner[id(p)])
            for name, value in slots.items():
                arr = np.asarray(value)
                if arr.shape != tuple(p.shape):
                    raise ValueError(f"load_state_dict: slot {name!r} of parameter {i} has shape {arr.shape}, "
                                     f"the parameter has shape {p.shape}")
                if name not in st:
                    st[name] = Variable(np.zeros(p.shape, p.dtype), trainable=False,
                                        name=f"{p.name or f'param{i}'}/{name}")
                st[name].assign(arr.astype(p.dtype))
        for key, hyper in sd.get("param_groups", {}).items():
            j = int(key)
            if not 0 <= j < len(self.param_groups):
                raise ValueError(f"load_state_dict: hyperparameters for group {j}, but the optimizer has "
                                 f"{len(self.param_groups)} groups")
            g = self.param_groups[j]
            for k, v in hyper.items():
                if isinstance(g.get(k), Tensor):
                    g[k].assign(np.asarray(v, np.float64).astype(g[k].dtype))
                    continue
                if k not in g or callable(g[k]):
                    continue
                arr = np.asarray(v)
                cur = g[k]
                if isinstance(cur, tuple):
                    g[k] = tuple(float(x) for x in arr.reshape(-1))
                elif isinstance(cur, bool):
                    g[k] = bool(arr)
                elif isinstance(cur, int):
                    g[k] = int(arr)
                else:
                    g[k] = float(arr)

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for j, g in enumerate(self.param_groups):
            hp = ", ".join(f"{k}={v}" for k, v in g.items() if k != "params")
            lines.append(f"  group {j}: {len(g['params'])} params, {hp}")
        return "\n".join(lines) + "\n)"


class SGD(Optimizer):
    """Stochastic gradient descent: g += wd p; buf = momentum buf + (1 - dampening) g; p -= lr (g + momentum buf
    if nesterov else buf), PyTorch's rule (no buffer when momentum is 0)."""

    def __init__(self, params, lr=0.01, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                                      weight_decay=weight_decay))

    def _check_hyper(self, group):
        super()._check_hyper(group)
        if group["momentum"] < 0:
            raise ValueError(f"SGD: invalid momentum {group['momentum']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("SGD: Nesterov momentum requires momentum > 0 and dampening 0")

    def _slot_inits(self, group):
        return {"momentum_buffer": 0.0} if group["momentum"] != 0 else {}

    def _kw(self, group):
        return dict(momentum=group["momentum"], dampening=group["dampening"], nesterov=group["nesterov"],
                    weight_decay=group["weight_decay"])

    def _dense_update(self, p, g, slots, group, lr, t):
        buf = slots["momentum_buffer"] if group["momentum"] != 0 else None
        U.sgd_update(p, g, buf, lr, **self._kw(group))

    def _sparse_update(self, p, g, slots, group, lr, t):
        buf = slots["momentum_buffer"] if group["momentum"] != 0 else None
        U.sgd_sparse_update(p, g.values, g.indices, buf, lr, **self._kw(group))
        return True


class AdaGrad(Optimizer):
    """AdaGrad: acc += g^2; p -= lr g / (sqrt(acc) + eps), the accumulator starting at 0.1 (TensorFlow's)."""

    def __init__(self, params, lr=0.01, initial_accumulator_value=0.1, eps=1e-7, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, initial_accumulator_value=initial_accumulator_value, eps=eps,
                                      weight_decay=weight_decay))

    def _check_hyper(self, group):
        super()._check_hyper(group)
        if group["initial_accumulator_value"] < 0:
            raise ValueError(f"AdaGrad: invalid initial_accumulator_value {group['initial_accumulator_value']}")

    def _slot_inits(self, group):
        return {"accumulator": float(group["initial_accumulator_value"])}

    def _dense_update(self, p, g, slots, group, lr, t):
        U.adagrad_update(p, g, slots["accumulator"], lr, eps=group["eps"], weight_decay=group["weight_decay"])

    def _sparse_update(self, p, g, slots, group, lr, t):
        U.adagrad_sparse_update(p, g.values, g.indices, slots["accumulator"], lr, eps=group["eps"],
                                weight_decay=group["weight_decay"])
        return True


class RMSProp(Optimizer):
    """RMSProp: ms = decay ms + (1 - decay) g^2 (centered: minus mg^2, mg = decay mg + (1 - decay) g);
    step = lr g / sqrt(ms + eps); with momentum mom = momentum mom + step; p -= mom (else p -= step)."""

    def __init__(self, params, lr=0.001, decay=0.9, momentum=0.0, eps=1e-10, centered=False, weight_decay=0.0,
                 initial_accumulator_value=0.0):
        super().__init__(params, dict(lr=lr, decay=decay, momentum=momentum, eps=eps, centered=centered,
                                      weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value))

    def _check_hyper(self, group):
        super()._check_hyper(group)
        if not 0.0 <= group["decay"] < 1.0:
            raise ValueError(f"RMSProp: invalid decay {group['decay']}")
        if group["momentum"] < 0:
            raise ValueError(f"RMSProp: invalid momentum {group['momentum']}")

    def _slot_inits(self, group):
        s = {"ms": float(group["initial_accumulator_value"])}
        if group["centered"]:
            s["mg"] = 0.0
        if group["momentum"] != 0:
            s["momentum"] = 0.0
        return s

    def _dense_update(self, p, g, slots, group, lr, t):
        U.rmsprop_update(p, g, slots["ms"], slots["mg"] if group["centered"] else None,
                         slots["momentum"] if group["momentum"] != 0 else None, lr, rho=group["decay"],
                         eps=group["eps"], momentum=group["momentum"], weight_decay=group["weight_decay"])


class Adam(Optimizer):
    """Adam (Kingma & Ba, Algorithm 1): m, v moments; p -= lr m_hat / (sqrt(v_hat) + eps), bias-corrected
    with the 1-based global step. Sparse gradients take the lazy rule (only looked-up rows and moments move)."""

    _needs_step = True

    def __init__(self, params, lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps,
                                      weight_decay=weight_decay))

    def _check_hyper(self, group):
        super()._check_hyper(group)
        group["betas"] = tuple(float(b) for b in group["betas"])
        b1, b2 = group["betas"]
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"Adam: invalid betas {group['betas']}")
        if group["eps"] < 0:
            raise ValueError(f"Adam: invalid eps {group['eps']}")

    def _slot_inits(self, group):
        return {"m": 0.0, "v": 0.0}

    def _dense_update(self, p, g, slots, group, lr, t):
        b1, b2 = group["betas"]
        U.adam_update(p, g, slots["m"], slots["v"], lr, t, beta1=b1, beta2=b2, eps=group["eps"],
                      weight_decay=group["weight_decay"])

    def _sparse_update(self, p, g, slots, group, lr, t):
        b1, b2 = group["betas"]
        U.adam_sparse_update(p, g.values, g.indices, slots["m"], slots["v"], lr, t, beta1=b1, beta2=b2,
                             eps=group["eps"], weight_decay=group["weight_decay"])
        return True


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter, PyTorch's ``optim.AdamW``): p -= lr * weight_decay * p, then Adam's step
    with no L2 term in the moments; one fused kernel. Sparse gradients are densified."""

    def __init__(self, params, lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _dense_update(self, p, g, slots, group, lr, t):
        b1, b2 = group["betas"]
        U.adamw_update(p, g, slots["m"], slots["v"], lr, t, beta1=b1, beta2=b2, eps=group["eps"],
                       weight_decay=group["weight_decay"])

    def _sparse_update(self, p, g, slots, group, lr, t):
        return False


Adagrad = AdaGrad
RMSprop = RMSProp
