"""Reverse-mode differentiation: ``backward``, ``gradients``, ``grad`` and ``value_and_grad`` over the tape.

The tape (:class:`jitnet.autodiff.core.Node` on every computed tensor that needs a gradient) is recorded by
``autodiff.core.apply``; this module walks it backwards, running each primitive's VJP, which is written in
jitnet ops. So it sits above ``tensor`` and ``ops`` (and :mod:`jitnet.autodiff.sparse`, the sparse gradients
it accumulates), where ``core`` sits below them. Broadcasting is undone here and only here (``ops.sum_to``).

Loading it binds ``Tensor.backward`` and adds the four functions to ``autodiff.core``'s namespace, where
earlier code reached them (``autodiff.core.gradients``).
"""
from __future__ import annotations

from .. import ops
from ..tensor import Tensor
from . import core as _core
from .core import _State, _toposort, enable_grad, no_grad
from .sparse import IndexedSlices

__all__ = ["backward", "gradients", "grad", "value_and_grad"]


def _add_grads(prev, g):
    """Return prev + g for gradients that may be dense Tensors or IndexedSlices (sparse rows)."""
    if prev is None:
        return g
    return g.__radd__(prev) if isinstance(g, IndexedSlices) else prev + g


def _run_backward(roots, root_grads, targets=None, create_graph=False):
    """Propagate ``root_grads`` from ``roots``; return {id(tensor): grad} for leaves or ``targets``."""
    prev = _State.backward_of
    try:
        return _backward_pass(roots, root_grads, targets, create_graph)
    finally:
        _State.backward_of = prev        # (debug_nans labels the ops a VJP runs; an error must not leave it set)


def _backward_pass(roots, root_grads, targets, create_graph):
    order = _toposort(roots)
    grads = {}
    for r, g in zip(roots, root_grads):
        if r.requires_grad:
            grads[id(r)] = g if id(r) not in grads else grads[id(r)] + g
    if targets is not None:
        # only propagate along paths that reach a target
        want = {id(t) for t in targets}
        reach = set()
        for t in order:
            if id(t) in want or (t._node is not None and any(id(i) in reach for i in t._node.inputs)):
                reach.add(id(t))
    results = {}
    ctx = enable_grad() if create_graph else no_grad()
    with ctx:
        for t in reversed(order):
            g = grads.pop(id(t), None)
            if g is None:
                continue
            node = t._node
            if isinstance(g, IndexedSlices) and g.dense_at_leaf and (node is None or (targets is not None
                                                                                  and id(t) in want)):
                g = g.to_dense()                 # a slice's gradient reaching a leaf or target: dense
            if targets is None:
                if node is None:
                    results[id(t)] = (t, g)
                    continue
            else:
                if id(t) in want:
                    results[id(t)] = (t, g)
                if node is None:
                    continue
            ins = node.inputs
            if isinstance(g, IndexedSlices):     # sparse gradients stay sparse only on their way to leaves
                g = g.to_dense()
            needs = tuple(i.requires_grad and (targets is None or id(i) in reach) for i in ins)
            if not any(needs):
                continue
            if _core._NAN_CHECK is not None:
                _State.backward_of = node      # ops run by the VJP are labelled "backward"
            in_grads = node.prim.vjp(g, t, ins, needs, **node.params)
            for i, gi, need in zip(ins, in_grads, needs):
                if gi is None or not need:
                    continue
                if gi.shape != i.shape:          # broadcasting is undone here and only here
                    gi = ops.sum_to(gi, i.shape)
                if gi.dtype != i.dtype:
                    gi = gi.astype(i.dtype)
                prev = grads.get(id(i))
                grads[id(i)] = _add_grads(prev, gi)
    return results


def _seed(ys, grad_ys):
    ys = list(ys)
    if grad_ys is None:
        gs = []
        for y in ys:
            if y.size != 1:
                raise ValueError(
                    f"backward: gradient can be implicitly created only for a scalar output, got shape "
                    f"{y.shape}; pass grad= (or grad_ys=) with the same shape as the output")
            gs.append(ops.ones_like(y))
        return ys, gs
    grad_ys = list(grad_ys)
    gs = []
    for y, g in zip(ys, grad_ys):
        g = g if isinstance(g, Tensor) else Tensor._from_value(g, dtype=y.dtype)
        if g.shape != y.shape:
            raise ValueError(f"backward: grad shape {g.shape} does not match output shape {y.shape}")
        gs.append(g)
    return ys, gs


def backward(t, grad=None, create_graph=False):
    """Accumulate d(t)/d(leaf) into ``leaf.grad`` for every leaf that requires a gradient."""
    if not t.requires_grad:
        raise RuntimeError("backward: the tensor does not require grad (no input had requires_grad=True, "
                           "or it was computed under no_grad())")
    ys, gs = _seed([t], None if grad is None else [grad])
    res = _run_backward(ys, gs, None, create_graph)
    for leaf, g in res.values():
        if not create_graph:
            g = g.detach()
        leaf.grad = _add_grads(leaf.grad, g)


def gradients(ys, xs, grad_ys=None, create_graph=None):
    """Return the list of sum(ys)'s gradients w.r.t. each of ``xs`` (None-free: zeros where unconnected)."""
    single_y = isinstance(ys, Tensor)
    ys = [ys] if single_y else list(ys)
    single_x = isinstance(xs, Tensor)
    xs = [xs] if single_x else list(xs)
    if grad_ys is not None and isinstance(grad_ys, Tensor):
        grad_ys = [grad_ys]
    live = [y for y in ys if y.requires_grad]
    if create_graph is None:
        create_graph = _State.grad_enabled and bool(_State.interpreters)
    if live:
        idx = [k for k, y in enumerate(ys) if y.requires_grad]
        ys2, gs = _seed(live, None if grad_ys is None else [grad_ys[k] for k in idx])
        res = _run_backward(ys2, gs, xs, create_graph)
    else:
        res = {}
    out = []
    for x in xs:
        r = res.get(id(x))
        out.append(r[1] if r is not None else ops.zeros_like(x))
    return out[0] if single_x and len(out) == 1 else out


def _prepare_args(args, argnums):
    args = list(args)
    targets = []
    nested = False
    for i in argnums:
        if i >= len(args):
            raise ValueError(f"grad: argnums {i} out of range for {len(args)} positional arguments")
        a = args[i]
        if not isinstance(a, Tensor):
            a = Tensor._from_value(a)
        if a.dtype.kind not in "fV":                   # (V: bfloat16)
            raise TypeError(f"grad: argument {i} has dtype {a.dtype}; only floating tensors have gradients")
        if a.requires_grad:
            nested = True
            a = ops.identity(a)          # a fresh node: the inner gradient stops here, the outer sees through
        else:
            a = a.detach()
            a.requires_grad = True
        args[i] = a
        targets.append(a)
    return args, targets, nested


def value_and_grad(fun, argnums=0, has_aux=False):
    """Return a function computing ``(fun(*args), gradient)``; gradient is a tuple when argnums is a tuple."""
    multi = isinstance(argnums, (tuple, list))
    nums = tuple(argnums) if multi else (argnums,)

    def vg(*args, **kwargs):
        args, targets, nested = _prepare_args(args, nums)
        with enable_grad():
            out = fun(*args, **kwargs)
        aux = None
        if has_aux:
            out, aux = out
        if not isinstance(out, Tensor):
            raise TypeError(f"grad: the function must return a scalar Tensor, got {type(out).__name__}")
        if out.size != 1:
            raise ValueError(f"grad: the function must return a scalar, got shape {out.shape}")
        create = nested or bool(_State.interpreters)
        gs = gradients(out, targets, create_graph=create)
        if not create:
            gs = [g.detach() for g in gs]
            out = out.detach()
        g = tuple(gs) if multi else gs[0]
        return ((out, aux), g) if has_aux else (out, g)

    vg.__name__ = f"value_and_grad({getattr(fun, '__name__', 'f')})"
    return vg


def grad(fun, argnums=0, has_aux=False):
    """Return a function computing the gradient of scalar ``fun`` w.r.t. the arguments ``argnums``."""
    vg = value_and_grad(fun, argnums, has_aux)

    def g_plain(*args, **kwargs):
        return vg(*args, **kwargs)[1]

    def g_aux(*args, **kwargs):
        (v, aux), gr = vg(*args, **kwargs)
        return gr, aux

    out = g_aux if has_aux else g_plain
    out.__name__ = f"grad({getattr(fun, '__name__', 'f')})"
    return out


def _tensor_backward(self, grad=None, create_graph=False):
    """Accumulate gradients of this tensor into ``.grad`` of the leaves that require them."""
    backward(self, grad, create_graph)


_tensor_backward.__name__ = _tensor_backward.__qualname__ = "backward"
Tensor.backward = _tensor_backward
_core.backward, _core.gradients, _core.grad, _core.value_and_grad = backward, gradients, grad, value_and_grad
