"""Compiled loops: ``jn.scan`` and ``jn.while_loop``.

Eagerly both are plain Python loops over the body (debuggable, differentiable through the tape). Under
``jitnet.jit`` the body is traced once into a sub-graph and compiled into its own plan; the loop becomes one
node of the step's graph that runs that plan for every iteration, so the step's graph, generated source and
compile time do not grow with the sequence length.

The gradient of a compiled scan is another scan, over the reversed sequence, whose body recomputes the
forward body at step t from the carry saved for step t and applies its VJP (per-step checkpointing: the
forward scan stores only the carries, never the body's intermediates).
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..autodiff import core as ad
from ..autodiff.core import Primitive, apply
from ..tensor import Tensor
from .passes import cse, dce, prune_scan_saves
from .native import loop_driver, while_driver
from .plan import build_plan
from .trace import Tracer, TracingError, flatten, substituting, unflatten

__all__ = ["scan", "while_loop"]


# --------------------------------------------------------------------------------------------------------------
# tuple plumbing: a loop node returns several arrays as one value; tuple_get picks one
# --------------------------------------------------------------------------------------------------------------

class TupleGrad:
    """Gradients of the parts of a tuple value (None for parts with no gradient)."""

    __slots__ = ("parts",)
    shape = ()
    dtype = np.dtype(object)

    def __init__(self, parts):
        self.parts = list(parts)

    def __add__(self, other):
        if other is None:
            return self
        out = []
        for a, b in zip(self.parts, other.parts):
            out.append(b if a is None else a if b is None else a + b)
        return TupleGrad(out)

    __radd__ = __add__

    def astype(self, dtype):
        return self

    def detach(self):
        return TupleGrad([None if p is None else p.detach() for p in self.parts])


def _tuple_get_vjp(g, ans, ins, needs, index, n):
    parts = [None] * n
    parts[index] = g
    return (TupleGrad(parts),)


TUPLE_GET = Primitive("tuple_get", impl={"cpu": lambda tup, index, n: tup[index]}, kind="view",
                      vjp=_tuple_get_vjp)


def _split(tt, n):
    return [apply(TUPLE_GET, tt, index=i, n=n) for i in range(n)]


# --------------------------------------------------------------------------------------------------------------
# loop bodies as compiled sub-plans
# --------------------------------------------------------------------------------------------------------------

class Body:
    """A traced loop body: its plan, and how many carry / per-step / captured inputs and outputs it has."""

    native = None           # a native.NativeLoop running the whole scan, when the body is one native segment
    native_while = None     # a native.NativeWhile, for a while_loop whose cond and body are native segments

    def __init__(self, plan, graph, n_carry, n_x, n_caps, n_out):
        self.plan, self.graph = plan, graph
        self.n_carry, self.n_x, self.n_caps, self.n_out = n_carry, n_x, n_caps, n_out

    def __call__(self, arrays):
        env = self.plan.run_arrays(arrays)
        return self.plan.outputs(env)

    def __repr__(self):
        return f"Body({len(self.plan.steps)} steps, {self.plan.kernel_count} kernels)"


def _leaves_as_tensors(leaves, what):
    out = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor):
            out.append(leaf)
        elif isinstance(leaf, (int, float, bool, np.ndarray, np.number)):
            out.append(Tensor(leaf))
        else:
            raise TypeError(f"{what} entry {i} is a {type(leaf).__name__}, expected a tensor")
    return out


def _trace_body(outer, fn, example_arrays, n_carry, n_x, grad=False):
    """Trace ``fn(*tensors) -> list of tensors`` under a child tracer; return (Body, captures, outputs)."""
    sub = Tracer(parent=outer)
    targs = []
    for i, a in enumerate(example_arrays):
        targs.append(sub.arg(Tensor._wrap(a), i))
    ctx = ad.enable_grad() if grad else ad.no_grad()
    with ad.push_interpreter(sub), ctx:
        outs = fn(*targs)
    caps = sub.finish_captures()
    g = sub.graph
    for o in outs:
        g.outputs.append(sub.value_of(o))
    dce(g)
    cse(g)
    dce(g)
    prune_scan_saves(g)
    plan = build_plan(g)
    return Body(plan, g, n_carry, n_x, len(caps), len(outs)), caps, outs


def _check_carry(new, old, where):
    if len(new) != len(old):
        raise TypeError(f"{where}: the body returned {len(new)} carry entries, expected {len(old)}")
    for i, (a, b) in enumerate(zip(new, old)):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise TypeError(f"{where}: carry entry {i} changed from {b.dtype}{list(b.shape)} to "
                            f"{a.dtype}{list(a.shape)}; the carry must keep its shape and dtype")


# --------------------------------------------------------------------------------------------------------------
# scan
# --------------------------------------------------------------------------------------------------------------

def _scan_impl(*arrays, body, length, reverse, save, y_specs):
    nc, nx = body.n_carry, body.n_x
    carry = list(arrays[:nc])
    xs = arrays[nc:nc + nx]
    caps = list(arrays[nc + nx:])
    ys = [np.empty((length,) + shp, dt) for shp, dt in y_specs]
    saved = [np.empty((length,) + c.shape, c.dtype) for c in carry] if save else []
    if body.native is not None and length > 0:
        final = body.native.run(length, bool(reverse), list(arrays), ys, saved)
        if final is not None:
            return tuple([np.array(c, copy=True) for c in final] + ys + saved)
    order = range(length - 1, -1, -1) if reverse else range(length)
    for t in order:
        for k, c in enumerate(carry):
            if save:
                saved[k][t] = c
        outs = body(carry + [x[t, ...] for x in xs] + caps)
        carry = outs[:nc]
        for k, y in enumerate(outs[nc:]):
            ys[k][t] = y
    carry = [np.array(c, copy=True) for c in carry]
    return tuple(carry + ys + saved)


def _leaf(t):
    """Return a fresh leaf with t's value (a graph read, never a baked constant) that requires grad if float."""
    r = ops.stop_gradient(t)
    if r.dtype.kind == "f":
        r.requires_grad_(True)
    return r


_TRACING_BACKWARD = []      # non-empty while _scan_vjp traces the reverse scan of a gradient


def _scan_vjp(g, ans, ins, needs, body, length, reverse, save, y_specs):
    if getattr(body, "is_backward", False):
        raise NotImplementedError(
            "jn.scan under jitnet.jit: a gradient of a gradient through a compiled scan is not supported (its "
            "reverse scan differentiates each step against detached copies of the step's inputs); take "
            "higher-order gradients eagerly, or use jn.scan(..., checkpoint=False) to unroll the loop")
    nc, nx, ncap = body.n_carry, body.n_x, body.n_caps
    ny = len(y_specs)
    parts = g.parts
    carry_in, xs, caps = ins[:nc], ins[nc:nc + nx], ins[nc + nx:]
    outs = _split(ans, nc + ny + (nc if save else 0))
    saved = outs[nc + ny:]
    g_carry = [parts[k] if parts[k] is not None else ops.zeros_like(carry_in[k]) for k in range(nc)]
    g_ys = [parts[nc + k] if parts[nc + k] is not None else ops.zeros((length,) + y_specs[k][0], y_specs[k][1])
            for k in range(ny)]
    fwd = body.fn
    # only the xs and captures whose gradients are asked for are differentiated (a per-step input such as a
    # token sequence or a mask, or a weight the caller treats as constant, costs no GEMM per step)
    need_x = [bool(needs[nc + k]) for k in range(nx)]
    need_k = [bool(needs[nc + nx + k]) for k in range(ncap)]
    kx = [k for k in range(nx) if need_x[k]]
    kk = [k for k in range(ncap) if need_k[k]]

    def bwd_body(bcarry, step):
        gc, gcap = bcarry
        c_t, x_t, gy_t = step
        with ad.enable_grad():
            leaves_c = [_leaf(c) for c in c_t]
            leaves_x = [_leaf(x) if need_x[k] else ops.stop_gradient(x) for k, x in enumerate(x_t)]
            leaves_k = [_leaf(c) if need_k[k] else ops.stop_gradient(c) for k, c in enumerate(caps)]
            outs_t = fwd(*leaves_c, *leaves_x, *leaves_k)
            targets = list(outs_t[:nc]) + list(outs_t[nc:])
            seeds = list(gc) + list(gy_t)
            pairs = [(o, s) for o, s in zip(targets, seeds) if o.requires_grad]
            wrt = leaves_c + [leaves_x[k] for k in kx] + [leaves_k[k] for k in kk]
            if pairs:
                grads = ad.gradients([o for o, _ in pairs], wrt, grad_ys=[s for _, s in pairs],
                                     create_graph=True)
            else:
                grads = [ops.zeros_like(w) for w in wrt]
        new_gc = list(grads[:nc])
        gx = list(grads[nc:nc + len(kx)])
        new_gcap = [a + b for a, b in zip(gcap, grads[nc + len(kx):])]
        return (new_gc, new_gcap), gx

    g_caps0 = [ops.zeros_like(caps[k]) for k in kk]
    _TRACING_BACKWARD.append(True)
    try:
        (gc_final, gcap_final), gxs = scan(bwd_body, (g_carry, g_caps0), (list(saved), list(xs), g_ys),
                                           length=length, reverse=not reverse)
    finally:
        _TRACING_BACKWARD.pop()
    gx_all, gk_all = [None] * nx, [None] * ncap
    for k, v in zip(kx, gxs):
        gx_all[k] = v
    for k, v in zip(kk, gcap_final):
        gk_all[k] = v
    return tuple(list(gc_final) + gx_all + gk_all)


SCAN = Primitive("scan", impl={"cpu": _scan_impl}, vjp=_scan_vjp)


def _scan_eager(body, init, xs, length, reverse):
    c_leaves, c_tree = flatten(init)
    c_leaves = _leaves_as_tensors(c_leaves, "scan: init carry")
    x_leaves, x_tree = flatten(xs) if xs is not None else ([], None)
    x_leaves = _leaves_as_tensors(x_leaves, "scan: xs")
    carry = unflatten(c_tree, c_leaves)
    ys = []
    y_tree = None
    order = range(length - 1, -1, -1) if reverse else range(length)
    for t in order:
        x_t = unflatten(x_tree, [x[t] for x in x_leaves]) if xs is not None else None
        carry, y = body(carry, x_t)
        nl, _ = flatten(carry)
        _check_carry(_leaves_as_tensors(nl, "scan: carry"), c_leaves, "scan")
        yl, y_tree = flatten(y)
        ys.append(_leaves_as_tensors(yl, "scan: y"))
    if length == 0:
        with ad.no_grad():
            x0 = unflatten(x_tree, [ops.zeros(x.shape[1:], x.dtype) for x in x_leaves]) if xs is not None else None
            _, y = body(carry, x0)
        yl, y_tree = flatten(y)
        yl = _leaves_as_tensors(yl, "scan: y")
        return carry, unflatten(y_tree, [ops.zeros((0,) + t.shape, t.dtype) for t in yl])
    if reverse:
        ys.reverse()
    stacked = [ops.stack([y[k] for y in ys]) for k in range(len(ys[0]))]
    return carry, unflatten(y_tree, stacked)


def scan(body, init, xs=None, length=None, reverse=False, checkpoint=True):
    """Return ``(final_carry, stacked_ys)`` of ``carry, y = body(carry, x)`` over the leading axis of ``xs``.

    ``init`` and ``xs`` may be tensors or nested tuples/lists/dicts of tensors; ``length`` is needed when
    ``xs`` is None. With ``reverse=True`` the steps run from the last element to the first (ys keep the
    order of xs). Eagerly this is a Python loop; under ``jitnet.jit`` the body compiles once into a native
    loop and its gradient is a reverse scan that recomputes each step from the saved carry.

    ``checkpoint=False`` trades memory for time the other way: under ``jitnet.jit`` the loop is unrolled
    into the step's graph, so every step's intermediates are stored for the backward pass and nothing is
    recomputed (the backward is a little faster; memory grows with the step's intermediates times the
    length, and the graph, the generated source and the compile time grow with the length too). Eagerly
    the tape always stores every step.
    """
    x_leaves = flatten(xs)[0] if xs is not None else []
    if xs is not None:
        x_leaves = _leaves_as_tensors(x_leaves, "scan: xs")
        if not x_leaves:
            raise ValueError("scan: xs has no tensors")
        n = x_leaves[0].shape[0] if x_leaves[0].ndim else None
        for i, x in enumerate(x_leaves):
            if x.ndim == 0 or x.shape[0] != n:
                raise ValueError(f"scan: xs entry {i} has shape {x.shape}; every entry needs the same leading "
                                 f"length {n}")
        if length is not None and length != n:
            raise ValueError(f"scan: length={length} but xs have leading length {n}")
        length = n
    elif length is None:
        raise ValueError("scan: give xs or length")
    length = int(length)
    interp = ad.current_interpreter()
    if not isinstance(interp, Tracer) or not checkpoint:
        return _scan_eager(body, init, xs, length, reverse)
    return _scan_traced(interp, body, init, xs, length, reverse)


def _scan_traced(outer, body, init, xs, length, reverse):
    c_leaves, c_tree = flatten(init)
    c_leaves = _leaves_as_tensors(c_leaves, "scan: init carry")
    x_leaves, x_tree = flatten(xs) if xs is not None else ([], None)
    x_leaves = _leaves_as_tensors(x_leaves, "scan: xs")
    nc, nx = len(c_leaves), len(x_leaves)
    y_tree_box = []

    def flat_fn(*leaves):
        carry = unflatten(c_tree, list(leaves[:nc]))
        x_t = unflatten(x_tree, list(leaves[nc:nc + nx])) if xs is not None else None
        new_carry, y = body(carry, x_t)
        nl, _ = flatten(new_carry)
        nl = _leaves_as_tensors(nl, "scan: carry")
        _check_carry(nl, c_leaves, "scan")
        yl, yt = flatten(y)
        y_tree_box[:] = [yt]
        return nl + _leaves_as_tensors(yl, "scan: y")

    t0 = length - 1 if reverse else 0
    examples = [c._data for c in c_leaves] + [
        (x._data[t0, ...] if length else np.zeros(x.shape[1:], x.dtype)) for x in x_leaves]
    b, caps, outs = _trace_body(outer, flat_fn, examples, nc, nx)
    b.native = loop_driver(b.plan, nc, nx)

    # the function the backward pass recomputes: the body on explicit leaves (captures passed in too)
    def fwd_fn(*leaves):
        carry = unflatten(c_tree, list(leaves[:nc]))
        x_t = unflatten(x_tree, list(leaves[nc:nc + nx])) if xs is not None else None
        cap_vals = leaves[nc + nx:]
        with substituting(caps, cap_vals):
            new_carry, y = body(carry, x_t)
        nl, _ = flatten(new_carry)
        yl, _ = flatten(y)
        return _leaves_as_tensors(nl, "scan: carry") + _leaves_as_tensors(yl, "scan: y")

    b.fn = fwd_fn
    b.is_backward = bool(_TRACING_BACKWARD)
    y_specs = tuple((tuple(o.shape), o.dtype) for o in outs[nc:])
    inputs = c_leaves + x_leaves + caps
    save = ad.is_grad_enabled() and any(t.requires_grad for t in inputs)
    tt = outer.apply(SCAN, tuple(inputs), dict(body=b, length=length, reverse=reverse, save=save,
                                               y_specs=y_specs))
    parts = _split(tt, nc + len(y_specs) + (nc if save else 0))
    carry = unflatten(c_tree, parts[:nc])
    ys = unflatten(y_tree_box[0], parts[nc:nc + len(y_specs)])
    return carry, ys


# --------------------------------------------------------------------------------------------------------------
# while_loop
# --------------------------------------------------------------------------------------------------------------

def _while_impl(*arrays, cond, body, n_carry):
    carry = list(arrays[:n_carry])
    ccaps = list(arrays[n_carry:n_carry + cond.n_caps])
    bcaps = list(arrays[n_carry + cond.n_caps:])
    nw = getattr(body, "native_while", None)
    if nw is not None:
        final = nw.run(carry, ccaps, bcaps)
        if final is not None:
            return tuple(np.array(c, copy=True) for c in final)
    while bool(cond(carry + ccaps)[0]):
        carry = body(carry + bcaps)
    return tuple(np.array(c, copy=True) for c in carry)


def _while_vjp(g, ans, ins, needs, **params):
    raise TypeError("while_loop has no gradient (its trip count depends on data); use jn.scan with a fixed "
                    "length, or jn.stop_gradient on its inputs")


WHILE = Primitive("while_loop", impl={"cpu": _while_impl}, vjp=_while_vjp)


def while_loop(cond, body, init):
    """Return the carry after ``carry = body(carry)`` runs while ``cond(carry)`` is true (forward only).

    ``cond`` returns a scalar bool tensor. Eagerly a Python loop; under ``jitnet.jit`` both functions compile
    once and the loop runs natively. There is no gradient through a while_loop.
    """
    c_leaves, c_tree = flatten(init)
    c_leaves = _leaves_as_tensors(c_leaves, "while_loop: init")
    interp = ad.current_interpreter()
    if not isinstance(interp, Tracer):
        carry = unflatten(c_tree, c_leaves)
        while True:
            c = cond(carry)
            c = c if isinstance(c, Tensor) else Tensor(c)
            if c.size != 1:
                raise ValueError(f"while_loop: cond must return a scalar, got shape {c.shape}")
            if not bool(c._data.reshape(())):
                break
            carry = body(carry)
            nl, _ = flatten(carry)
            _check_carry(_leaves_as_tensors(nl, "while_loop: carry"), c_leaves, "while_loop")
        return carry
    n = len(c_leaves)

    def cond_fn(*leaves):
        c = cond(unflatten(c_tree, list(leaves)))
        c = c if isinstance(c, Tensor) else Tensor(c)
        if c.size != 1:
            raise ValueError(f"while_loop: cond must return a scalar, got shape {c.shape}")
        return [ops.reshape(c, ())]

    def body_fn(*leaves):
        nl, _ = flatten(body(unflatten(c_tree, list(leaves))))
        nl = _leaves_as_tensors(nl, "while_loop: carry")
        _check_carry(nl, c_leaves, "while_loop")
        return nl

    examples = [c._data for c in c_leaves]
    cb, ccaps, _ = _trace_body(interp, cond_fn, examples, n, 0)
    bb, bcaps, _ = _trace_body(interp, body_fn, examples, n, 0)
    bb.native_while = while_driver(cb.plan, bb.plan, n, len(ccaps), len(bcaps))
    tt = interp.apply(WHILE, tuple(c_leaves + ccaps + bcaps), dict(cond=cb, body=bb, n_carry=n))
    return unflatten(c_tree, _split(tt, n))


__all__ += ["TracingError"]
