"""Optimizer update primitives: one registry row per update rule, each one fused in-place kernel call.

Every row has ``kind="update"``, ``nondiff=True`` and ``extra["inplace"]`` = the positions of the inputs it
mutates (the parameter and its slot variables), so a tracing compiler records the call as an effect on those
variables. Inputs are ``(param, grad, slots..., lr, [step])``: ``lr`` and ``step`` are 0-d float tensors
(values that change between steps); static hyperparameters are keyword parameters. Sparse rows take the
gradient as two inputs, ``values`` (k, ...) and int64 ``indices`` (k,), sum duplicate indices first, and update
only the named rows. Each impl mutates its arrays in place and returns the parameter array.
"""
from __future__ import annotations

import numpy as np

from .. import bounds
from .. import kernels_cpu as K
from ..autodiff.core import Primitive, apply
from ..autodiff.sparse import unique_sum
from ..kernelgen import PARALLEL_THRESHOLD
from ..kernels_scalar import adam_scalars as _adam_scalars_jit

_adam_scalars = _adam_scalars_jit.py_func      # Adam's bias correction (one definition: CPU, CUDA, native)

__all__ = ["UPDATES", "sgd_update", "adagrad_update", "rmsprop_update", "adam_update",
           "sgd_sparse_update", "adagrad_sparse_update", "adam_sparse_update", "adamw_update"]

UPDATES: dict = {}


def _update_prim(name, impl, inplace):
    prim = Primitive(name, impl={"cpu": impl}, kind="update", nondiff=True)
    prim.extra["inplace"] = tuple(inplace)
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


SGD_UPDATE = _update_prim("sgd_update", _sgd_impl, (0,))
SGD_MOMENTUM_UPDATE = _update_prim("sgd_momentum_update", _sgd_momentum_impl, (0, 2))
SGD_SPARSE_UPDATE = _update_prim("sgd_sparse_update", _sgd_sparse_impl, (0,))
SGD_MOMENTUM_SPARSE_UPDATE = _update_prim("sgd_momentum_sparse_update", _sgd_momentum_sparse_impl, (0, 3))


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


ADAGRAD_UPDATE = _update_prim("adagrad_update", _adagrad_impl, (0, 2))
ADAGRAD_SPARSE_UPDATE = _update_prim("adagrad_sparse_update", _adagrad_sparse_impl, (0, 3))


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


RMSPROP_UPDATE = _update_prim("rmsprop_update", _rmsprop_impl, (0, 2))
RMSPROP_MOMENTUM_UPDATE = _update_prim("rmsprop_momentum_update", _rmsprop_momentum_impl, (0, 2, 3))
CENTERED_RMSPROP_UPDATE = _update_prim("centered_rmsprop_update", _centered_rmsprop_impl, (0, 2, 3))
CENTERED_RMSPROP_MOMENTUM_UPDATE = _update_prim("centered_rmsprop_momentum_update",
                                                _centered_rmsprop_momentum_impl, (0, 2, 3, 4))


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


ADAM_UPDATE = _update_prim("adam_update", _adam_impl, (0, 2, 3))
ADAM_SPARSE_UPDATE = _update_prim("adam_sparse_update", _adam_sparse_impl, (0, 3, 4))


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


ADAMW_UPDATE = _update_prim("adamw_update", _adamw_impl, (0, 2, 3))


def adamw_update(param, grad, m, v, lr, step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01):
    """Apply one AdamW step (decay p by lr * weight_decay, then Adam without L2) in place; return the param."""
    return apply(ADAMW_UPDATE, param, grad, m, v, lr, step, beta1=float(beta1), beta2=float(beta2),
                 eps=float(eps), weight_decay=float(weight_decay))
