"""Compiled loops: ``jn.scan`` and ``jn.while_loop``.

Eagerly both are plain Python loops over the body (debuggable, differentiable through the tape). Under
``jitnet.jit`` the body is traced once into a sub-graph and compiled into its own plan; the loop becomes one
node of the step's graph that runs that plan for every iteration, so the step's graph, generated source and
compile time do not grow with the sequence length.

The gradient of a compiled scan is another scan, over the reversed sequence, that applies the step's VJP
at step t: on residuals the forward loop stacked (the default), or on the forward step recomputed from the
carry saved for step t (``checkpoint=True``: the forward scan stores only the carries).
"""
from __future__ import annotations

import numpy as np

from .. import backends, ops
from ..autodiff import core as ad
from ..autodiff import nans
from ..autodiff.core import Primitive, apply
from ..lazy import LazyModule
from ..lowp import is_floating
from ..tensor import Tensor
from .passes import cse, dce, prune_scan_saves
from .native import loop_driver, while_driver
from .plan import _debug_level, build_plan
from .trace import Tracer, TracerTensor, TracingError, flatten, substituting, unflatten

__all__ = ["scan", "while_loop"]

_C = LazyModule("jitnet.cuda")             # device array views, for loops whose arrays live on a GPU
_G = LazyModule("jitnet.backend_cuda")     # device copies


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


def _tuple_get(tup, index, n):
    return tup[index]


TUPLE_GET = Primitive("tuple_get", impl={"cpu": _tuple_get, "cuda": _tuple_get}, kind="view",
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


def _child_trace(outer, fn, example_arrays, grad=False):
    """Run ``fn`` on argument tensors of a new child tracer of ``outer``; return (tracer, fn's outputs)."""
    sub = Tracer(parent=outer)
    targs = [sub.arg(Tensor._wrap(a), i) for i, a in enumerate(example_arrays)]
    with ad.push_interpreter(sub), (ad.enable_grad() if grad else ad.no_grad()):
        return sub, fn(*targs)


def _trace_body(outer, fn, example_arrays, n_carry, n_x, grad=False):
    """Trace ``fn(*tensors) -> list of tensors`` under a child tracer; return (Body, captures, outputs)."""
    sub, outs = _child_trace(outer, fn, example_arrays, grad)
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


def _row(x, t):
    """``x[t, ...]`` of a device array: a view of row ``t`` (no copy)."""
    return _C.view(x, x.shape[1:], x.strides[1:], t * x.strides[0])


def _scan_cuda(*arrays, body, length, reverse, save, y_specs):
    """The scan node on a GPU: a host loop over the body's plan, whose steps launch CUDA kernels. Per-step inputs
    are row views of the stacked xs; per-step outputs are copied into rows of the stacked ys by a kernel; nothing
    crosses between host and device."""
    nc, nx = body.n_carry, body.n_x
    be = backends.CUDA
    carry = list(arrays[:nc])
    xs = arrays[nc:nc + nx]
    caps = list(arrays[nc + nx:])
    ys = [be.empty((length,) + shp, dt) for shp, dt in y_specs]
    saved = [be.empty((length,) + c.shape, c.dtype) for c in carry] if save else []
    order = range(length - 1, -1, -1) if reverse else range(length)
    for t in order:
        if save:
            for k, c in enumerate(carry):
                _G.copy_into(_row(saved[k], t), c)
        outs = body(carry + [_row(x, t) for x in xs] + caps)
        carry = outs[:nc]
        for k, y in enumerate(outs[nc:]):
            _G.copy_into(_row(ys[k], t), y)
    carry = [_G.copy(c) for c in carry]     # the body's plan may reuse the arrays it returned
    return tuple(carry + ys + saved)


def _leaf(t):
    """Return a fresh leaf with t's value (a graph read, never a baked constant) that requires grad if float."""
    r = ops.stop_gradient(t)
    if is_floating(r.dtype):
        r.requires_grad_(True)
    return r


_TRACING_BACKWARD = []      # non-empty while _scan_vjp traces the reverse scan of a gradient


def _step_grads(targets, seeds, wrt, gcap, nc, nkx):
    """One reverse step: the VJP of the step's outputs ``targets`` for ``seeds`` w.r.t. ``wrt`` (carry leaves,
    needed x leaves, needed capture leaves); return ((carry grads, accumulated capture grads), x grads)."""
    pairs = [(o, s) for o, s in zip(targets, seeds) if o.requires_grad]
    if pairs:
        grads = ad.gradients([o for o, _ in pairs], wrt, grad_ys=[s for _, s in pairs], create_graph=True)
    else:
        grads = [ops.zeros_like(w) for w in wrt]
    new_gcap = [a + b for a, b in zip(gcap, grads[nc + nkx:])]
    return (list(grads[:nc]), new_gcap), list(grads[nc:nc + nkx])


def _reverse_scan(bwd_body, g_carry, caps, steps, kx, kk, nx, ncap, length, reverse):
    """Run the reverse scan of a gradient; return the VJP tuple (carry, xs, captures; None where unneeded)."""
    g_caps0 = [ops.zeros_like(caps[k]) for k in kk]
    _TRACING_BACKWARD.append(True)
    try:
        (gc_final, gcap_final), gxs = scan(bwd_body, (g_carry, g_caps0), steps, length=length,
                                           reverse=not reverse)
    finally:
        _TRACING_BACKWARD.pop()
    gx_all, gk_all = [None] * nx, [None] * ncap
    for k, v in zip(kx, gxs):
        gx_all[k] = v
    for k, v in zip(kk, gcap_final):
        gk_all[k] = v
    return tuple(list(gc_final) + gx_all + gk_all)


def _scan_vjp(g, ans, ins, needs, body, length, reverse, save, y_specs):
    if getattr(body, "is_backward", False):
        raise NotImplementedError(
            "jn.scan under jitnet.jit: a gradient of a gradient through a compiled scan is not supported (its "
            "reverse scan differentiates each step against detached copies of the step's inputs); take "
            "higher-order gradients eagerly, or use jn.scan(..., checkpoint='unroll') to unroll the loop")
    nc, nx, ncap = body.n_carry, body.n_x, body.n_caps
    ny = len(y_specs)
    parts = g.parts
    carry_in, xs, caps = ins[:nc], ins[nc:nc + nx], ins[nc + nx:]
    outs = _split(ans, nc + ny + (nc if save else 0))
    saved = outs[nc + ny:]
    g_carry = [parts[k] if parts[k] is not None else ops.zeros_like(carry_in[k]) for k in range(nc)]
    nu = getattr(body, "n_user_out", nc + ny) - nc  # the caller's ys (a residual-storing scan adds its own)
    dev = next((t.device for t in ins if t.is_cuda), None)      # zeros for unused ys on the loop's device
    g_ys = [parts[nc + k] if parts[nc + k] is not None
            else ops.zeros((length,) + y_specs[k][0], y_specs[k][1], device=dev) for k in range(nu)]
    fwd = body.fn
    # only the xs and captures whose gradients are asked for are differentiated (a per-step input such as a
    # token sequence or a mask, or a weight the caller treats as constant, costs no GEMM per step)
    need_x = [bool(needs[nc + k]) for k in range(nx)]
    need_k = [bool(needs[nc + nx + k]) for k in range(ncap)]
    kx = [k for k in range(nx) if need_x[k]]
    kk = [k for k in range(ncap) if need_k[k]]
    st = getattr(body, "store", None)
    if st is not None:
        return _scan_vjp_stored(st, g_carry, g_ys, outs[nc + nu:nc + ny], saved, xs, caps, kx, kk, nc, nx, ncap,
                                length, reverse)

    def bwd_body(bcarry, step):
        gc, gcap = bcarry
        c_t, x_t, gy_t = step
        with ad.enable_grad():
            leaves_c = [_leaf(c) for c in c_t]
            leaves_x = [_leaf(x) if need_x[k] else ops.stop_gradient(x) for k, x in enumerate(x_t)]
            leaves_k = [_leaf(c) if need_k[k] else ops.stop_gradient(c) for k, c in enumerate(caps)]
            outs_t = fwd(*leaves_c, *leaves_x, *leaves_k)
            wrt = leaves_c + [leaves_x[k] for k in kx] + [leaves_k[k] for k in kk]
            return _step_grads(list(outs_t), list(gc) + list(gy_t), wrt, gcap, nc, len(kx))

    return _reverse_scan(bwd_body, g_carry, caps, (list(saved), list(xs), g_ys), kx, kk, nx, ncap, length,
                         reverse)


def _scan_vjp_stored(st, g_carry, g_ys, res, saved, xs, caps, kx, kk, nc, nx, ncap, length, reverse):
    """The reverse scan of a residual-storing scan: each step runs the step's VJP on its stacked residuals."""
    leaves_c, leaves_x, leaves_k = st.lc, st.lx, st.lk

    def bwd_body(bcarry, step):
        gc, gcap = bcarry
        c_t, x_t, gy_t, r_t = step
        with ad.enable_grad(), substituting([*leaves_c, *leaves_x, *leaves_k, *st.res],
                                            [*c_t, *x_t, *caps, *r_t]):
            wrt = list(leaves_c) + [leaves_x[k] for k in kx] + [leaves_k[k] for k in kk]
            return _step_grads(st.outs, list(gc) + list(gy_t), wrt, gcap, nc, len(kx))

    return _reverse_scan(bwd_body, g_carry, caps, (list(saved), list(xs), g_ys, list(res)), kx, kk, nx, ncap,
                         length, reverse)


SCAN = Primitive("scan", impl={"cpu": _scan_impl, "cuda": _scan_cuda}, vjp=_scan_vjp)


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


def scan(body, init, xs=None, length=None, reverse=False, checkpoint=False):
    """Return ``(final_carry, stacked_ys)`` of ``carry, y = body(carry, x)`` over the leading axis of ``xs``.

    ``init`` and ``xs`` may be tensors or nested tuples/lists/dicts of tensors; ``length`` is needed when
    ``xs`` is None. With ``reverse=True`` the steps run from the last element to the first (ys keep the
    order of xs). Eagerly this is a Python loop (the tape stores every step). Under ``jitnet.jit`` the body
    compiles once into a native loop whatever the length, and its gradient is a reverse scan:

    * ``checkpoint=False`` (default): the forward loop also stacks the *residuals* of each step, the
      intermediates its VJP reads (found by tracing the step's backward once), and the reverse scan runs the
      step's VJP on them. Memory grows with those residuals times the length. If a body cannot be split
      this way the scan falls back to recomputing.
    * ``checkpoint=True``: store only the carry of each step and recompute the step in the reverse scan
      (least memory, one extra forward step per step).
    * ``checkpoint="unroll"``: unroll the loop into the step's graph (the graph, generated source and compile
      time grow with the length; for short fixed loops).
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
    if checkpoint not in (True, False, "unroll"):
        raise ValueError(f"scan: checkpoint must be False (store residuals), True (recompute) or 'unroll', "
                         f"got {checkpoint!r}")
    if not isinstance(interp, Tracer) or checkpoint == "unroll":
        return _scan_eager(body, init, xs, length, reverse)
    return _scan_traced(interp, body, init, xs, length, reverse, store=checkpoint is False)


def _example_row(x, t, length):
    """Row ``t`` of stacked per-step input ``x`` on its device (zeros when the sequence is empty)."""
    if not length:
        return _filled_on(x, 0, x.shape[1:])
    return x[t, ...] if isinstance(x, np.ndarray) else _row(x, t)


def _filled_on(a, value, shape=None):
    """An array of ``shape`` (default: ``a``'s) filled with ``value``, on ``a``'s device (its backend's fill)."""
    return backends.backend_of(a).full(a.shape if shape is None else shape, value, a.dtype)


def _scan_traced(outer, body, init, xs, length, reverse, store=False):
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
    examples = [c._data for c in c_leaves] + [_example_row(x._data, t0, length) for x in x_leaves]
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
    n_user_y = len(y_specs)
    if store and save and not b.is_backward:
        sb = _store_body(outer, fwd_fn, examples, nc, nx, caps, len(outs))
        if sb is not None:                     # the forward loop also stacks the residuals its VJP reads
            b = sb
            y_specs = y_specs + tuple((tuple(r.shape), r.dtype) for r in sb.store.res)
    tt = outer.apply(SCAN, tuple(inputs), dict(body=b, length=length, reverse=reverse, save=save,
                                               y_specs=y_specs))
    parts = _split(tt, nc + len(y_specs) + (nc if save else 0))
    carry = unflatten(c_tree, parts[:nc])
    ys = unflatten(y_tree_box[0], parts[nc:nc + n_user_y])
    return carry, ys


class _Store:
    """What a residual-storing scan keeps from tracing its step with gradients: the step's tape (its outputs,
    the leaves standing for carry / x / captures) and the tape tensors its VJP reads (stacked per step)."""

    def __init__(self, outs, lc, lx, lk, res):
        self.outs, self.lc, self.lx, self.lk, self.res = outs, lc, lx, lk, res


class _Hits(dict):
    """A substitution map that records which keys were looked up."""

    def __init__(self, *a):
        super().__init__(*a)
        self.hit = set()

    def get(self, k, default=None):
        r = super().get(k, default)
        if r is not None:
            self.hit.add(k)
        return r


def _step_tape(fwd_fn, args, nc, nx, caps):
    """Run ``fwd_fn`` on fresh leaves for carry, x and captures with gradients on; return (outs, lc, lx, lk)."""
    with ad.enable_grad():
        lc = [_leaf(a) for a in args[:nc]]
        lx = [_leaf(a) if is_floating(a.dtype) else ops.stop_gradient(a) for a in args[nc:nc + nx]]
        lk = [_leaf(k) if is_floating(k.dtype) else ops.stop_gradient(k) for k in caps]
        outs = fwd_fn(*lc, *lx, *lk)
    return list(outs), lc, lx, lk


def _tape_tensors(outs, leaves):
    """Traced tensors of the step's tape (results and operands of its nodes), leaves excluded, in order."""
    skip = {id(t) for t in leaves}
    seen, found = set(), []
    for t in ad._toposort([o for o in outs if o.requires_grad]):
        node = t._node
        if node is None:
            continue
        for u in (t,) + tuple(node.inputs):
            if isinstance(u, TracerTensor) and id(u) not in skip and id(u) not in seen \
                    and u.dtype != np.dtype(object):
                seen.add(id(u))
                found.append(u)
    return found


def _store_body(outer, fwd_fn, examples, nc, nx, caps, n_out):
    """Trace a scan body that also returns the residuals of its VJP, or return None (then: recompute).

    The step is traced once with gradients on; a trial trace of its backward (on placeholder seeds, with
    every tape tensor substituted by a placeholder) tells which tape tensors the VJP really reads; the body
    is traced again returning those as extra per-step outputs. The reverse scan then runs the step's VJP on
    the stacked residuals instead of recomputing the step.
    """
    try:
        # 1. the step's tape (traced only: no plan is built for it)
        _, (outs, lc, lx, lk) = _child_trace(outer, lambda *args: _step_tape(fwd_fn, args, nc, nx, caps),
                                             examples)
        leaves = lc + lx + lk
        cand = _tape_tensors(outs, leaves)
        # 2. a trial backward on placeholders: which tape tensors does the VJP read?
        sub = Tracer(parent=outer)
        ph = [sub.arg(Tensor._wrap(_filled_on(t._data, 0)), i) for i, t in enumerate(cand)]
        seeds = [sub.arg(Tensor._wrap(_filled_on(o._data, 1)), len(cand) + i) for i, o in enumerate(outs)]
        lph = [sub.arg(Tensor._wrap(t._data), len(cand) + len(outs) + i) for i, t in enumerate(leaves)]
        sm = substituting(cand + leaves, ph + lph)
        sm.map = _Hits(sm.map)
        with ad.push_interpreter(sub), ad.enable_grad(), sm, nans.suspended():    # placeholders: no NaN checks
            pairs = [(o, s) for o, s in zip(outs, seeds) if o.requires_grad]
            if pairs:
                ad.gradients([o for o, _ in pairs], leaves, grad_ys=[s for _, s in pairs], create_graph=True)
        box = {}

        # 3. the body again, returning those tensors as extra per-step outputs
        def res_fn(*args):
            outs2, lc2, lx2, lk2 = _step_tape(fwd_fn, args, nc, nx, caps)
            tape = _tape_tensors(outs2, lc2 + lx2 + lk2)
            if len(tape) != len(cand):
                raise TracingError("scan store: the step traced differently")
            keep = [tape[i] for i, t in enumerate(cand) if id(t) in sm.map.hit]
            box["store"] = _Store(outs2, lc2, lx2, lk2, keep)
            return outs2 + keep
        b, caps2, _ = _trace_body(outer, res_fn, examples, nc, nx)
        if [id(c) for c in caps2] != [id(c) for c in caps]:
            raise TracingError("the step's captures changed between traces")
        b.native = loop_driver(b.plan, nc, nx)
        b.store = box["store"]
        b.fn = fwd_fn
        b.n_user_out = n_out
        return b
    except Exception as e:                  # any surprise: the recompute scan, which always works
        if _debug_level():
            print(f"[jitnet] scan: residuals not stored ({type(e).__name__}: {e}); the backward recomputes")
        return None


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


def _while_cuda(*arrays, cond, body, n_carry):
    """The while_loop node on a GPU: a host loop over the body's plan; the condition, a device scalar, is read
    back once per iteration (the one transfer a data-dependent trip count needs)."""
    carry = list(arrays[:n_carry])
    ccaps = list(arrays[n_carry:n_carry + cond.n_caps])
    bcaps = list(arrays[n_carry + cond.n_caps:])
    while bool(_G.host_value(cond(carry + ccaps)[0])):
        carry = body(carry + bcaps)
    return tuple(_G.copy(c) for c in carry)


WHILE = Primitive("while_loop", impl={"cpu": _while_impl, "cuda": _while_cuda}, vjp=_while_vjp)


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
