"""Optimizer update primitives: one registry row per update rule, each one fused in-place kernel call.

Every row has ``kind="update"``, ``nondiff=True`` and ``extra["inplace"]`` = the positions of the inputs it
mutates (the parameter and its slot variables), so a tracing compiler records the call as an effect on those
variables. Inputs are ``(param, grad, slots..., lr, [step])``: ``lr`` and ``step`` are 0-d float tensors
(values that change between steps); static hyperparameters are keyword parameters. Sparse rows take the
gradient as two inputs, ``values`` (k, ...) and int64 ``indices`` (k,), sum duplicate indices first, and update
only the named rows. Each impl mutates its arrays in place and returns the parameter array.

A row holds all of its update: the CPU implementation (``_adam_impl``: the ``kernels_cpu`` kernel, serial or
``prange``), the CUDA implementation (``_adam_cuda``: the ``kernels_gpu`` kernel through the CUDA backend's
services, both loaded on first use) and the native-driver emitter (``extra["native"]``: the source lines a
compiled step's driver runs). The math of one element is ``kernels_scalar.adam_elem``, compiled for both targets.
"""
from __future__ import annotations

import numpy as np

from .. import bounds
from .. import kernels_cpu as K
from ..autodiff.core import Primitive, apply
from ..autodiff.sparse import unique_sum
from .. import kernelgen
from ..kernelgen import PARALLEL_THRESHOLD
from ..compiler import native as _native
from ..kernels_scalar import adam_scalars as _adam_scalars_jit
from ..lazy import LazyModule

_adam_scalars = _adam_scalars_jit.py_func      # Adam's bias correction (one definition: CPU, CUDA, native)
# the CUDA backend's services and kernels, imported when a CUDA implementation first runs (never on the CPU)
_G = LazyModule("jitnet.backend_cuda")
_KG = LazyModule("jitnet.kernels_gpu")
_C = LazyModule("jitnet.cuda")

__all__ = ["UPDATES", "sgd_update", "adagrad_update", "rmsprop_update", "adam_update",
           "sgd_sparse_update", "adagrad_sparse_update", "adam_sparse_update", "adamw_update"]

UPDATES: dict = {}


def _update_prim(name, impl, inplace, cuda=None, native=None):
    """Register update row ``name``: CPU ``impl``, ``cuda`` implementation, ``native`` emitter (or None)."""
    prim = Primitive(name, impl={"cpu": impl} if cuda is None else {"cpu": impl, "cuda": cuda}, kind="update",
                     nondiff=True)
    prim.extra["inplace"] = tuple(inplace)
    if native is not None:
        prim.extra["native"] = native
    if "sparse" in name:                      # inputs (param, values, indices, ...)
        bounds.mark(prim, i2=("index", "error"))
    UPDATES[name] = prim
    return prim


def _flat_state(a, what):
    """Return a flat view of a state array that must be updated in place."""
    if not a.flags.c_contiguous or not a.flags.writeable:
        raise ValueError(f"optimizer update: the {what} array must be C-contiguous and writeable")
    return a.reshape(-1)


def _flat_grad(g, p):
    """Return the gradient as a flat contiguous array of the parameter's dtype and size."""
    if g.shape != p.shape:
        g = np.broadcast_to(g, p.shape)
    return np.ascontiguousarray(g, dtype=p.dtype).reshape(-1)


def _rows(p, what="parameter"):
    if p.ndim == 0:
        raise ValueError("sparse update of a 0-d parameter")
    return _flat_state(p, what).reshape(p.shape[0], -1)


def _sparse_grad(p, values, indices):
    """Return (unique rows, summed 2-D gradient rows) after checking the indices against p's first axis."""
    n = p.shape[0]
    idx = bounds.check(np.asarray(indices), n, "sparse update", f"a parameter with {n} rows",
                       negative="error").reshape(-1)
    vals = np.asarray(values)
    if vals.dtype != p.dtype:
        vals = vals.astype(p.dtype)
    rows, vals = unique_sum(idx, vals.reshape(idx.shape[0], -1))
    return rows, np.ascontiguousarray(vals)


def _par(size):
    return size >= PARALLEL_THRESHOLD


def _native_update(kernel, n_state, h_fn, flags=()):
    """Native-driver emitter of a dense update: ``kernel(p, g, *state, h, *flags)``, ``h`` built in the driver;
    ``flags`` are functions of the node's params returning each flag's value.

    ``h_fn(params, scalar_sources)`` returns the source of the packed scalars: a list of expressions, or
    ``(njit function, argument sources)`` for a shared kernels_scalar function the driver calls."""
    def emit(n, a, o, kernels):
        p, g = n.inputs[0], n.inputs[1]
        if p.dtype not in _native.FLOATS or g.shape != p.shape or g.dtype != p.dtype:
            return None
        k = getattr(K, kernel + ("_par" if p.size >= PARALLEL_THRESHOLD else ""))
        kname = _native.use_kernel(kernels, k)
        state = [f"{a[2 + i]}.reshape(-1)" for i in range(n_state)]
        h = h_fn(n.params, [f"np.float64({v}[()])" for v in a[2 + n_state:]])
        h = f"[{', '.join(h)}]" if isinstance(h, list) else f"{_native.use_kernel(kernels, h[0])}({', '.join(h[1])})"
        fl = [kernelgen.flag_source(bool(f(n.params))) for f in flags]
        return [f"_h = np.array({h}, {_native.dtype_source(p.dtype)})",
                f"{kname}({a[0]}.reshape(-1), np.ascontiguousarray({a[1]}).reshape(-1), "
                f"{', '.join(state + ['_h'] + fl)})",
                f"{o} = {a[0]}"]
    return emit


def _f(v):
    return repr(float(v))


# -- SGD --------------------------------------------------------------------------------------------------------

def _h(p, *vals):
    """Return the scalars packed in one array of p's dtype (the kernels' ``h`` argument)."""
    return np.array(vals, p.dtype)


def _sgd_args(p, lr, momentum, dampening, nesterov, weight_decay):
    return (_h(p, float(lr), weight_decay, momentum, 1.0 - dampening), bool(nesterov), momentum != 0)


def _sgd_impl(p, g, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    pf = _flat_state(p, "parameter")
    k = K.sgd_update_par if _par(pf.size) else K.sgd_update
    k(pf, _flat_grad(g, p), pf, *_sgd_args(p, lr, 0.0, 0.0, False, weight_decay))
    return p


def _sgd_momentum_impl(p, g, buf, lr, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0):
    pf = _flat_state(p, "parameter")
    k = K.sgd_update_par if _par(pf.size) else K.sgd_update
    k(pf, _flat_grad(g, p), _flat_state(buf, "momentum"),
      *_sgd_args(p, lr, momentum, dampening, nesterov, weight_decay))
    return p


def _sgd_sparse_impl(p, values, indices, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    rows, vals = _sparse_grad(p, values, indices)
    p2 = _rows(p)
    if rows.size:
        K.sgd_sparse_update(p2, rows, vals, p2, *_sgd_args(p, lr, 0.0, 0.0, False, weight_decay))
    return p


def _sgd_momentum_sparse_impl(p, values, indices, buf, lr, momentum=0.9, dampening=0.0, nesterov=False,
                              weight_decay=0.0):
    rows, vals = _sparse_grad(p, values, indices)
    if rows.size:
        K.sgd_sparse_update(_rows(p), rows, vals, _rows(buf, "momentum"),
                            *_sgd_args(p, lr, momentum, dampening, nesterov, weight_decay))
    return p


def _sgd_cuda(p, g, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    t = p.dtype.type
    pf = _G.flat_state(p, "parameter")
    _G.launch(_KG.sgd_update, pf.size, pf, _G.grad_like(g, p), pf, t(_G.host_value(lr)), t(weight_decay), t(0),
              t(1), False, False)
    return p


def _sgd_momentum_cuda(p, g, buf, lr, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0):
    t = p.dtype.type
    pf = _G.flat_state(p, "parameter")
    _G.launch(_KG.sgd_update, pf.size, pf, _G.grad_like(g, p), _G.flat_state(buf, "momentum"),
              t(_G.host_value(lr)), t(weight_decay), t(momentum), t(1.0 - dampening), bool(nesterov), momentum != 0)
    return p


def _sgd_sparse_cuda(p, values, indices, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    t = p.dtype.type
    p2, g2, flags = _G.sparse_rows(p, values, indices, "sgd")
    _G.launch(_KG.sgd_rows_update, p2.size, p2, g2, p2, flags, t(_G.host_value(lr)), t(weight_decay), t(0), t(1),
              False, False)
    return p


def _sgd_momentum_sparse_cuda(p, values, indices, buf, lr, momentum=0.9, dampening=0.0, nesterov=False,
                              weight_decay=0.0):
    t = p.dtype.type
    p2, g2, flags = _G.sparse_rows(p, values, indices, "sgd")
    _G.launch(_KG.sgd_rows_update, p2.size, p2, g2, _C.reshape(buf, p2.shape), flags, t(_G.host_value(lr)),
              t(weight_decay), t(momentum), t(1.0 - dampening), bool(nesterov), momentum != 0)
    return p


def _sgd_h(P, s):
    return [s[0], _f(P.get("weight_decay", 0.0)), _f(P.get("momentum", 0.0)), _f(1.0 - P.get("dampening", 0.0))]


_sgd_plain_native = _native_update("sgd_update", 1,
                                   lambda P, s: [s[0], _f(P.get("weight_decay", 0.0)), "0.0", "1.0"],
                                   (lambda P: False, lambda P: False))


def _sgd_native(n, a, o, kernels):
    # sgd without momentum: the momentum slot is the parameter itself (the kernel never reads it)
    return _sgd_plain_native(n, [a[0], a[1], a[0]] + a[2:], o, kernels)


SGD_UPDATE = _update_prim("sgd_update", _sgd_impl, (0,), _sgd_cuda, _sgd_native)
SGD_MOMENTUM_UPDATE = _update_prim(
    "sgd_momentum_update", _sgd_momentum_impl, (0, 2), _sgd_momentum_cuda,
    _native_update("sgd_update", 1, _sgd_h, (lambda P: P.get("nesterov"),
                                             lambda P: P.get("momentum", 0.0) != 0)))
SGD_SPARSE_UPDATE = _update_prim("sgd_sparse_update", _sgd_sparse_impl, (0,), _sgd_sparse_cuda)
SGD_MOMENTUM_SPARSE_UPDATE = _update_prim("sgd_momentum_sparse_update", _sgd_momentum_sparse_impl, (0, 3),
                                          _sgd_momentum_sparse_cuda)


def sgd_update(param, grad, buf, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    """Apply one SGD step to ``param`` in place (``buf``: momentum slot or None); return the updated param."""
    kw = dict(momentum=float(momentum), dampening=float(dampening), nesterov=bool(nesterov),
              weight_decay=float(weight_decay))
    if buf is None:
        return apply(SGD_UPDATE, param, grad, lr, **kw)
    return apply(SGD_MOMENTUM_UPDATE, param, grad, buf, lr, **kw)


def sgd_sparse_update(param, values, indices, buf, lr, momentum=0.0, dampening=0.0, nesterov=False,
                      weight_decay=0.0):
    """Apply one SGD step to the rows ``indices`` of ``param`` in place (lazy momentum); return the param."""
    kw = dict(momentum=float(momentum), dampening=float(dampening), nesterov=bool(nesterov),
              weight_decay=float(weight_decay))
    if buf is None:
        return apply(SGD_SPARSE_UPDATE, param, values, indices, lr, **kw)
    return apply(SGD_MOMENTUM_SPARSE_UPDATE, param, values, indices, buf, lr, **kw)


# -- AdaGrad ----------------------------------------------------------------------------------------------------

def _adagrad_impl(p, g, acc, lr, eps=1e-7, weight_decay=0.0):
    pf = _flat_state(p, "parameter")
    k = K.adagrad_update_par if _par(pf.size) else K.adagrad_update
    k(pf, _flat_grad(g, p), _flat_state(acc, "accumulator"), _h(p, float(lr), weight_decay, eps))
    return p


def _adagrad_sparse_impl(p, values, indices, acc, lr, eps=1e-7, weight_decay=0.0):
    rows, vals = _sparse_grad(p, values, indices)
    if rows.size:
        K.adagrad_sparse_update(_rows(p), rows, vals, _rows(acc, "accumulator"),
                                _h(p, float(lr), weight_decay, eps))
    return p


def _adagrad_cuda(p, g, acc, lr, eps=1e-7, weight_decay=0.0):
    t = p.dtype.type
    pf = _G.flat_state(p, "parameter")
    _G.launch(_KG.adagrad_update, pf.size, pf, _G.grad_like(g, p), _G.flat_state(acc, "accumulator"),
              t(_G.host_value(lr)), t(weight_decay), t(eps))
    return p


def _adagrad_sparse_cuda(p, values, indices, acc, lr, eps=1e-7, weight_decay=0.0):
    t = p.dtype.type
    p2, g2, flags = _G.sparse_rows(p, values, indices, "adagrad")
    _G.launch(_KG.adagrad_rows_update, p2.size, p2, g2, _C.reshape(acc, p2.shape), flags, t(_G.host_value(lr)),
              t(weight_decay), t(eps))
    return p


ADAGRAD_UPDATE = _update_prim(
    "adagrad_update", _adagrad_impl, (0, 2), _adagrad_cuda,
    _native_update("adagrad_update", 1, lambda P, s: [s[0], _f(P.get("weight_decay", 0.0)), _f(P.get("eps", 1e-7))]))
ADAGRAD_SPARSE_UPDATE = _update_prim("adagrad_sparse_update", _adagrad_sparse_impl, (0, 3), _adagrad_sparse_cuda)


def adagrad_update(param, grad, acc, lr, eps=1e-7, weight_decay=0.0):
    """Apply one AdaGrad step to ``param`` and its accumulator in place; return the updated param."""
    return apply(ADAGRAD_UPDATE, param, grad, acc, lr, eps=float(eps), weight_decay=float(weight_decay))


def adagrad_sparse_update(param, values, indices, acc, lr, eps=1e-7, weight_decay=0.0):
    """Apply one AdaGrad step to the rows ``indices`` of ``param`` and its accumulator; return the param."""
    return apply(ADAGRAD_SPARSE_UPDATE, param, values, indices, acc, lr, eps=float(eps),
                 weight_decay=float(weight_decay))


# -- RMSProp ----------------------------------------------------------------------------------------------------

def _rmsprop_run(p, g, ms, mg, mom, lr, rho, eps, momentum, centered, weight_decay):
    pf = _flat_state(p, "parameter")
    msf = _flat_state(ms, "ms")
    mgf = _flat_state(mg, "mg") if mg is not None else pf
    momf = _flat_state(mom, "momentum") if mom is not None else pf
    k = K.rmsprop_update_par if _par(pf.size) else K.rmsprop_update
    k(pf, _flat_grad(g, p), msf, mgf, momf, _h(p, float(lr), weight_decay, rho, 1.0 - rho, eps, momentum),
      bool(centered), mom is not None)
    return p


def _rmsprop_impl(p, g, ms, lr, rho=0.9, eps=1e-10, weight_decay=0.0):
    return _rmsprop_run(p, g, ms, None, None, lr, rho, eps, 0.0, False, weight_decay)


def _rmsprop_momentum_impl(p, g, ms, mom, lr, rho=0.9, eps=1e-10, momentum=0.0, weight_decay=0.0):
    return _rmsprop_run(p, g, ms, None, mom, lr, rho, eps, momentum, False, weight_decay)


def _centered_rmsprop_impl(p, g, ms, mg, lr, rho=0.9, eps=1e-10, weight_decay=0.0):
    return _rmsprop_run(p, g, ms, mg, None, lr, rho, eps, 0.0, True, weight_decay)


def _centered_rmsprop_momentum_impl(p, g, ms, mg, mom, lr, rho=0.9, eps=1e-10, momentum=0.0, weight_decay=0.0):
    return _rmsprop_run(p, g, ms, mg, mom, lr, rho, eps, momentum, True, weight_decay)


def _rmsprop_cuda(centered, has_mom):
    """The CUDA implementation of the RMSProp row with these slots (inputs p, g, ms, [mg], [mom], lr)."""
    def run(p, g, ms, *rest, rho=0.9, eps=1e-10, momentum=0.0, weight_decay=0.0):
        *slots, lr = rest
        mg = slots[0] if centered else None
        mom = slots[-1] if has_mom else None
        t = p.dtype.type
        pf = _G.flat_state(p, "parameter")
        _G.launch(_KG.rmsprop_update, pf.size, pf, _G.grad_like(g, p), _G.flat_state(ms, "ms"),
                  _G.flat_state(mg, "mg") if mg is not None else pf,
                  _G.flat_state(mom, "momentum") if mom is not None else pf,
                  t(_G.host_value(lr)), t(weight_decay), t(rho), t(1.0 - rho), t(eps), t(momentum), bool(centered),
                  mom is not None)
        return p
    return run


def _rms_h(P, s):
    rho = P.get("rho", 0.9)
    return [s[0], _f(P.get("weight_decay", 0.0)), _f(rho), _f(1.0 - rho), _f(P.get("eps", 1e-10)),
            _f(P.get("momentum", 0.0))]


def _rmsprop_native(centered, momentum):
    inner = _native_update("rmsprop_update", 3, _rms_h, (lambda P: centered, lambda P: momentum))

    def emit(n, a, o, kernels):
        # inputs: p, g, ms, [mg], [mom], lr; the kernel always takes ms, mg, mom (p stands in for absent ones)
        i = 3
        mg = a[i] if centered else a[0]
        i += centered
        mom = a[i] if momentum else a[0]
        i += momentum
        return inner(n, [a[0], a[1], a[2], mg, mom] + a[i:], o, kernels)
    return emit


RMSPROP_UPDATE = _update_prim("rmsprop_update", _rmsprop_impl, (0, 2), _rmsprop_cuda(False, False),
                              _rmsprop_native(False, False))
RMSPROP_MOMENTUM_UPDATE = _update_prim("rmsprop_momentum_update", _rmsprop_momentum_impl, (0, 2, 3),
                                       _rmsprop_cuda(False, True), _rmsprop_native(False, True))
CENTERED_RMSPROP_UPDATE = _update_prim("centered_rmsprop_update", _centered_rmsprop_impl, (0, 2, 3),
                                       _rmsprop_cuda(True, False), _rmsprop_native(True, False))
CENTERED_RMSPROP_MOMENTUM_UPDATE = _update_prim("centered_rmsprop_momentum_update",
                                                _centered_rmsprop_momentum_impl, (0, 2, 3, 4),
                                                _rmsprop_cuda(True, True), _rmsprop_native(True, True))


def rmsprop_update(param, grad, ms, mg, mom, lr, rho=0.9, eps=1e-10, momentum=0.0, weight_decay=0.0):
    """Apply one RMSProp step in place (``mg`` for centered, ``mom`` for momentum, else None); return param."""
    kw = dict(rho=float(rho), eps=float(eps), weight_decay=float(weight_decay))
    if mom is not None:
        kw["momentum"] = float(momentum)
    if mg is None and mom is None:
        return apply(RMSPROP_UPDATE, param, grad, ms, lr, **kw)
    if mg is None:
        return apply(RMSPROP_MOMENTUM_UPDATE, param, grad, ms, mom, lr, **kw)
    if mom is None:
        return apply(CENTERED_RMSPROP_UPDATE, param, grad, ms, mg, lr, **kw)
    return apply(CENTERED_RMSPROP_MOMENTUM_UPDATE, param, grad, ms, mg, mom, lr, **kw)


# -- Adam -------------------------------------------------------------------------------------------------------

def _adam_args(p, lr, step, beta1, beta2, eps, weight_decay, decoupled=False):
    return (_h(p, *_adam_scalars(float(lr), float(step), beta1, beta2, eps, weight_decay, decoupled)),)


def _adam_impl(p, g, m, v, lr, step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    pf = _flat_state(p, "parameter")
    k = K.adam_update_par if _par(pf.size) else K.adam_update
    k(pf, _flat_grad(g, p), _flat_state(m, "m"), _flat_state(v, "v"),
      *_adam_args(p, lr, step, beta1, beta2, eps, weight_decay))
    return p


def _adam_sparse_impl(p, values, indices, m, v, lr, step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    rows, vals = _sparse_grad(p, values, indices)
    if rows.size:
        K.adam_sparse_update(_rows(p), rows, vals, _rows(m, "m"), _rows(v, "v"),
                             *_adam_args(p, lr, step, beta1, beta2, eps, weight_decay))
    return p


def _adam_cuda_scalars(p, lr, step, beta1, beta2, eps, weight_decay, decoupled=False):
    t = p.dtype.type
    return tuple(t(x) for x in _adam_scalars(float(_G.host_value(lr)), float(_G.host_value(step)), beta1, beta2,
                                             eps, weight_decay, decoupled))


def _adam_cuda(p, g, m, v, lr, step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    pf = _G.flat_state(p, "parameter")
    _G.launch(_KG.adam_update, pf.size, pf, _G.grad_like(g, p), _G.flat_state(m, "m"), _G.flat_state(v, "v"),
              *_adam_cuda_scalars(p, lr, step, beta1, beta2, eps, weight_decay))
    return p


def _adam_sparse_cuda(p, values, indices, m, v, lr, step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    p2, g2, flags = _G.sparse_rows(p, values, indices, "adam")
    _G.launch(_KG.adam_rows_update, p2.size, p2, g2, _C.reshape(m, p2.shape), _C.reshape(v, p2.shape), flags,
              *_adam_cuda_scalars(p, lr, step, beta1, beta2, eps, weight_decay))
    return p


def _adam_h(decoupled):
    """The driver's scalars: a call of the compiled ``adam_scalars`` on the step's lr and step count."""
    def h(P, s):
        return _adam_scalars_jit, [s[0], s[1], _f(P.get("beta1", 0.9)), _f(P.get("beta2", 0.999)),
                                   _f(P.get("eps", 1e-8)), _f(P.get("weight_decay", 0.0)), repr(decoupled)]
    return h


ADAM_UPDATE = _update_prim("adam_update", _adam_impl, (0, 2, 3), _adam_cuda,
                           _native_update("adam_update", 2, _adam_h(False)))
ADAM_SPARSE_UPDATE = _update_prim("adam_sparse_update", _adam_sparse_impl, (0, 3, 4), _adam_sparse_cuda)


def adam_update(param, grad, m, v, lr, step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    """Apply one Adam step (``step`` counts from 1, for bias correction) in place; return the updated param."""
    return apply(ADAM_UPDATE, param, grad, m, v, lr, step, beta1=float(beta1), beta2=float(beta2),
                 eps=float(eps), weight_decay=float(weight_decay))


def adam_sparse_update(param, values, indices, m, v, lr, step, beta1=0.9, beta2=0.999, eps=1e-8,
                       weight_decay=0.0):
    """Apply one lazy Adam step to the rows ``indices`` only (their moments too); return the param."""
    return apply(ADAM_SPARSE_UPDATE, param, values, indices, m, v, lr, step, beta1=float(beta1),
                 beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay))


# -- AdamW (decoupled weight decay) -------------------------------------------------------------------------------

def _adamw_args(p, lr, step, beta1, beta2, eps, weight_decay):
    return _adam_args(p, lr, step, beta1, beta2, eps, weight_decay, True)


def _adamw_impl(p, g, m, v, lr, step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01):
    pf = _flat_state(p, "parameter")
    k = K.adamw_update_par if _par(pf.size) else K.adamw_update
    k(pf, _flat_grad(g, p), _flat_state(m, "m"), _flat_state(v, "v"),
      *_adamw_args(p, lr, step, beta1, beta2, eps, weight_decay))
    return p


def _adamw_cuda(p, g, m, v, lr, step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01):
    pf = _G.flat_state(p, "parameter")
    _G.launch(_KG.adamw_update, pf.size, pf, _G.grad_like(g, p), _G.flat_state(m, "m"), _G.flat_state(v, "v"),
              *_adam_cuda_scalars(p, lr, step, beta1, beta2, eps, weight_decay, True))
    return p


ADAMW_UPDATE = _update_prim("adamw_update", _adamw_impl, (0, 2, 3), _adamw_cuda,
                            _native_update("adamw_update", 2, _adam_h(True)))


def adamw_update(param, grad, m, v, lr, step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01):
    """Apply one AdamW step (decay p by lr * weight_decay, then Adam without L2) in place; return the param."""
    return apply(ADAMW_UPDATE, param, grad, m, v, lr, step, beta1=float(beta1), beta2=float(beta2),
                 eps=float(eps), weight_decay=float(weight_decay))
