"""Native segments: runs of plan steps compiled into one generated ``@njit`` driver function.

A plan runs its steps from Python, one Numba call per fused kernel, BLAS call or view: each costs a few
microseconds of argument unboxing and dispatch, which dominates steps made of many small ops (an LSTM cell
unrolled over time, a loop body). This pass finds maximal runs of steps whose primitives have a *native
emitter* (fused groups, 2-D/batched matmul, basic indexing and its gradient, trailing/leading reductions,
reshape, transpose, stop_gradient), writes their source as one driver function (``seg(s1, s2, ...) ->
(outputs...)``, local variables instead of the plan's environment, intermediates allocated by Numba's
runtime) and replaces the run with a single step: one Python-to-native transition per run instead of one per
op. The driver module goes through the same disk cache as fused kernels, so a new process compiles nothing.

When a loop body's plan is one segment over its arguments, ``loop_driver`` also generates the whole loop
(``jn.scan``) natively: the body's driver is called T times from compiled code.

A driver that fails to compile (a layout or dtype its emitters did not foresee) is dropped at its first call
and the run goes back to its Python steps, so this pass never changes what a plan computes.
"""
from __future__ import annotations

import os

import numpy as np

from .. import bounds, kernelgen

__all__ = ["nativize", "MIN_STEPS"]

#: Runs shorter than this stay Python steps (one saved transition does not pay for a compile).
MIN_STEPS = 3
#: Longer runs are cut into drivers of at most this many steps (Numba's compile time grows faster than
#: linearly with the size of a function; a few transitions per step cost nothing next to that).
MAX_STEPS = 160
#: A driver is compiled on the run after this many runs of its Python steps (a plan run once or twice,
#: as in tests and one-off calls, never pays Numba's compile time; a training loop gets the driver at
#: its third step). ``JITNET_NATIVE_AFTER`` overrides it.
NATIVE_AFTER = int(os.environ.get("JITNET_NATIVE_AFTER", "2"))
#: Set while a step's first call runs its plan right after an abstract trace: that run takes the Python steps
#: and does not count toward NATIVE_AFTER (as the call that traced concretely never did).
HOLD = [False]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
FLOATS = _FLOATS        # the dtypes native emitters handle (rows' own emitters test against it)


def _enabled():
    return os.environ.get("JITNET_NATIVE", "1") not in ("0", "false", "no")


# --------------------------------------------------------------------------------------------------------------
# emitters: (node, input names, output name, globals) -> source lines, or None when not native
# --------------------------------------------------------------------------------------------------------------

_dt = kernelgen.dtype_source
_shape = kernelgen.shape_source
use_kernel = kernelgen.use_kernel       # (emitters call it for every kernel their lines call)
dtype_source = kernelgen.dtype_source




def _emit(info, names, kernels):
    """Return the source lines of one plan step, or None when it has no native form."""
    kind, unit, kernel, in_slots, o, into = info
    a = [names(s) for s in in_slots]
    if kind == "group":
        out = unit.root.out
        if out.dtype == np.dtype(object):
            return None
        kname = use_kernel(kernels, kernel)
        kshape = out.shape or (1,)
        if into is not None:
            dst = f"{names(into)}.reshape({_shape(kshape)})"
            return [f"{kname}({', '.join(a + [dst])})", f"{names(o)} = {names(into)}"]
        buf = f"_b{o}"
        lines = [f"{buf} = np.empty({_shape(kshape)}, {_dt(out.dtype)})", f"{kname}({', '.join(a + [buf])})"]
        lines.append(f"{names(o)} = {buf}" if kshape == out.shape else
                     f"{names(o)} = {buf}.reshape({_shape(out.shape)})")
        return lines
    n = unit
    if n.out is None or n.out.dtype == np.dtype(object) or any(v.dtype == np.dtype(object) for v in n.inputs):
        return None
    em = n.prim.extra.get("native")            # a row's own emitter: ops.py, nn/functional.py, optim/updates.py
    if em is None:
        return None
    return em(n, a, names(o), kernels)


def _compile_error(e):
    """True for the errors a driver that Numba cannot compile raises (the run then stays in Python)."""
    from numba.core.errors import NumbaError
    return isinstance(e, (NumbaError, TypeError, AttributeError, NotImplementedError))


class _Tiered:
    """A native path compiled on the run after ``NATIVE_AFTER`` and dropped for good if it fails to compile."""

    def __init__(self):
        self.failed = False
        self.runs = 0

    def attempt(self, call):
        """Return ``call()``, or None while the Python path should run (early runs, or after a failure)."""
        if self.failed or HOLD[0]:
            return None
        if self.runs < NATIVE_AFTER:
            self.runs += 1
            return None
        try:
            return call()
        except Exception as e:
            if not _compile_error(e):
                raise
            self.failed = True
            self.error = e
            return None


# --------------------------------------------------------------------------------------------------------------
# segments
# --------------------------------------------------------------------------------------------------------------

def _module_source(fn_lines, kernels):
    lines = ["# jitnet generated native driver: edit the graph, not this file", "import numpy as np",
             "from numba import njit", "import jitnet.kernels_cpu as K"]
    for kname, ln in kernels:
        if isinstance(ln, tuple):
            lines += [ln[0], f"{kname} = _a.{ln[1]}"]
        else:
            lines.append(f"{ln} {kname}")
    lines += ["", ""] + fn_lines
    return "\n".join(lines) + "\n"


class Segment(_Tiered):
    """A compiled run of plan steps: reads ``in_slots``, writes ``out_slots``; its driver and source."""

    def __init__(self, start, stop, in_slots, out_slots, source, fn_name="segment"):
        super().__init__()
        self.start, self.stop = start, stop
        self.in_slots, self.out_slots = in_slots, out_slots
        self.source = source
        self.fn_name = fn_name
        self._fn = None

    def function(self):
        if self._fn is None:
            mod = kernelgen.load_source(self.source, "cpu", "native")
            self._fn = getattr(mod, self.fn_name)
        return self._fn


def _segment_source(infos, start, stop, in_slots, out_slots):
    kernels = []
    body = []

    def names(s):
        return f"s{s}"
    for info in infos[start:stop]:
        lines = _emit(info, names, kernels)
        body += ["    " + ln for ln in lines]
    args = ", ".join(f"s{s}" for s in in_slots)
    ret = "(" + "".join(f"s{s}, " for s in out_slots) + ")" if out_slots else "0"
    fn = ["@njit(cache=True, nogil=True, error_model='numpy')", f"def segment({args}):"] + body + \
         [f"    return {ret}"]
    return _module_source(fn, kernels)


def _emittable(info):
    kernels = []
    try:
        return _emit(info, lambda s: f"s{s}", kernels) is not None
    except Exception:
        return False


def _segment_step(seg, fallback_steps):
    """Return the plan step that runs ``seg``'s driver, falling back to the Python steps if it fails to compile."""
    ins, outs = seg.in_slots, seg.out_slots

    def step(env):
        # the dispatcher, not a compiled entry point: it checks operand layouts (an entry point would not)
        try:
            r = seg.attempt(lambda: seg.function()(*[env[i] for i in ins]))
        except IndexError as e:
            bounds.reraise_native(e)
            raise
        if r is None:
            for st in fallback_steps:
                st(env)
        elif outs:
            for o, arr in zip(outs, r):
                env[o] = arr
    step.segment = seg
    return step


def nativize(plan, min_steps=None):
    """Replace runs of native-emittable steps of ``plan`` by compiled driver steps (in place)."""
    if not _enabled() or not plan.infos or len(plan.infos) != len(plan.steps):
        return plan
    min_steps = MIN_STEPS if min_steps is None else min_steps
    ok = [_emittable(info) for info in plan.infos]
    # slots read after each position (and by the plan's results)
    final_reads = set()
    for s in plan.out_slots:
        if not isinstance(s, tuple):
            final_reads.add(s)
    for _, s in plan.grad_writes:
        if s is None:
            continue
        if isinstance(s, tuple):
            final_reads.update((s[1], s[2]))
        else:
            final_reads.add(s)
    n = len(plan.infos)
    reads_after = [None] * (n + 1)
    acc = set(final_reads)
    reads_after[n] = set(acc)
    for i in range(n - 1, -1, -1):
        acc.update(plan.infos[i][3])
        if plan.infos[i][5] is not None:
            acc.add(plan.infos[i][5])
        reads_after[i] = set(acc)

    runs = []
    i = 0
    while i < n:
        if not ok[i]:
            i += 1
            continue
        j = i
        while j < n and ok[j]:
            j += 1
        if j - i >= min_steps:
            nchunks = -(-(j - i) // MAX_STEPS)
            size = -(-(j - i) // nchunks)
            for a in range(i, j, size):
                runs.append((a, min(a + size, j)))
        i = j
    if not runs:
        return plan
    new_steps, new_names, new_infos = [], [], []
    plan.segments = []
    pos = 0
    for (i, j) in runs:
        new_steps += plan.steps[pos:i]
        new_names += plan.step_names[pos:i]
        new_infos += plan.infos[pos:i]
        produced, in_slots = set(), []
        for info in plan.infos[i:j]:
            for s in list(info[3]) + ([info[5]] if info[5] is not None else []):
                if s not in produced and s not in in_slots:
                    in_slots.append(s)
            produced.add(info[4])
        out_slots = [info[4] for info in plan.infos[i:j] if info[4] in reads_after[j]]
        out_slots = list(dict.fromkeys(out_slots))
        src = _segment_source(plan.infos, i, j, in_slots, out_slots)
        seg = Segment(i, j, in_slots, out_slots, src)
        plan.segments.append(seg)
        plan.sources.append(src)
        new_steps.append(_segment_step(seg, plan.steps[i:j]))
        new_names.append(f"native[{j - i} steps]")
        new_infos.append(("segment", seg, None, in_slots, None, None))
        pos = j
    new_steps += plan.steps[pos:]
    new_names += plan.step_names[pos:]
    new_infos += plan.infos[pos:]
    plan.steps, plan.step_names, plan.infos = new_steps, new_names, new_infos
    return plan


# --------------------------------------------------------------------------------------------------------------
# native loops
# --------------------------------------------------------------------------------------------------------------

def _loop_source(plan, seg, n_carry, n_x, n_args, save):
    """Source of ``loop(length, reverse, a0.., q0.., y0.., v0..)`` running the body segment ``length`` times."""
    slot_arg = {s: i for s, i in plan.arg_slots}
    arg_of = {i: s for s, i in plan.arg_slots}
    slot_const = {s: k for k, (s, _) in enumerate(plan.const_env)}
    nq = len(plan.const_env)
    ny = len(plan.out_slots) - n_carry

    def expr(s):
        if s in slot_const:
            return f"q{slot_const[s]}"
        i = slot_arg.get(s)
        if i is None:
            return None
        if i < n_carry:
            return f"c{i}"
        if i < n_carry + n_x:
            return f"a{i}[t]"
        return f"a{i}"

    seg_args = [expr(s) for s in seg.in_slots]
    if any(e is None for e in seg_args):
        return None
    outs = []
    for s in plan.out_slots:
        if isinstance(s, tuple):
            return None
        if s in seg.out_slots:
            outs.append(f"r[{seg.out_slots.index(s)}]")
        else:
            e = expr(s)
            if e is None:
                return None
            outs.append(e)
    carry_ranks = [len(plan.slot_shapes.get(arg_of.get(k), (0,))) for k in range(n_carry)]
    y_ranks = [len(plan.slot_shapes.get(s, (0,))) for s in plan.out_slots[n_carry:]]
    args = ["length", "reverse"] + [f"a{i}" for i in range(n_args)] + [f"q{k}" for k in range(nq)] + \
        [f"y{k}" for k in range(ny)] + ([f"v{k}" for k in range(n_carry)] if save else [])
    lines = ["@njit(cache=True, nogil=True, error_model='numpy')", f"def loop({', '.join(args)}):"]
    for k in range(n_carry):
        lines.append(f"    c{k} = a{k}")
    lines += ["    for i in range(length):", "        t = length - 1 - i if reverse else i"]
    if save:
        for k in range(n_carry):
            lines.append(f"        K.copy_into(v{k}[t], c{k})" if carry_ranks[k] else f"        v{k}[t] = c{k}[()]")
    lines.append(f"        r = body({', '.join(seg_args)})")
    for k in range(ny):
        o = outs[n_carry + k]
        lines.append(f"        K.copy_into(y{k}[t], {o})" if y_ranks[k] else f"        y{k}[t] = {o}[()]")
    for k in range(n_carry):
        lines.append(f"        n{k} = {outs[k]}")
    for k in range(n_carry):
        lines.append(f"        c{k} = n{k}")
    lines.append("    return (" + "".join(f"c{k}, " for k in range(n_carry)) + ")")
    head = ["# jitnet generated native loop: edit the graph, not this file", "import numpy as np",
            "from numba import njit", "import jitnet.kernels_cpu as K", "from {segmod} import segment as body", "", ""]
    return "\n".join(head + lines) + "\n"


class NativeLoop(_Tiered):
    """A scan body's plan compiled with its loop: ``run(length, reverse, arrays, y_out, saved_out)``."""

    def __init__(self, plan, seg, n_carry, n_x):
        super().__init__()
        self.plan, self.seg, self.n_carry, self.n_x = plan, seg, n_carry, n_x
        self._fns = {}

    def _function(self, save, n_args):
        fn = self._fns.get(save)
        if fn is None:
            r = _loop_source(self.plan, self.seg, self.n_carry, self.n_x, n_args, save)
            if r is None:
                raise TypeError("no native loop for this body")
            segmod = self.seg.function().py_func.__module__
            src = r.replace("{segmod}", segmod)
            fn = self._fns[save] = getattr(kernelgen.load_source(src, "cpu", "native-loop"), "loop")
        return fn

    def run(self, length, reverse, arrays, ys, saved):
        """Run the loop; return the final carry arrays, or None when it cannot run natively."""
        consts = [a for _, a in self.plan.const_env]
        try:
            return self.attempt(lambda: self._function(bool(saved), len(arrays))(
                length, reverse, *arrays, *consts, *ys, *saved))
        except IndexError as e:
            bounds.reraise_native(e)
            raise


def loop_driver(plan, n_carry, n_x):
    """Return a NativeLoop when ``plan`` (a loop body's) is one native segment over its arguments, else None."""
    segs = getattr(plan, "segments", None)
    if not segs or len(segs) != 1 or len(plan.steps) != 1 or plan.state_slots or plan.gradin_slots \
            or plan.grad_writes:
        return None
    seg = segs[0]
    if len(plan.out_slots) < n_carry:
        return None
    arg_of = {i: s for s, i in plan.arg_slots}
    # per-step x slices of rank 0 would be scalars inside Numba: keep those loops in Python
    for i in range(n_carry, n_carry + n_x):
        if not plan.slot_shapes.get(arg_of.get(i), (0,)):
            return None
    if _loop_source(plan, seg, n_carry, n_x, len(arg_of), False) is None:
        return None
    return NativeLoop(plan, seg, n_carry, n_x)


def _while_source(cond_plan, cond_seg, body_plan, body_seg, n_carry, n_ccaps, n_bcaps):
    """Source of ``wloop(a0.., ca0.., ba0.., cq0.., bq0..)``: the body's driver while the cond's driver is true."""
    def exprs(plan, seg, caps_prefix, cq_prefix):
        slot_arg = {s: i for s, i in plan.arg_slots}
        slot_const = {s: k for k, (s, _) in enumerate(plan.const_env)}

        def expr(s):
            if s in slot_const:
                return f"{cq_prefix}{slot_const[s]}"
            i = slot_arg.get(s)
            if i is None:
                return None
            return f"c{i}" if i < n_carry else f"{caps_prefix}{i - n_carry}"
        args = [expr(s) for s in seg.in_slots]
        outs = []
        for s in plan.out_slots:
            if isinstance(s, tuple):
                return None, None
            outs.append(f"r[{seg.out_slots.index(s)}]" if s in seg.out_slots else expr(s))
        if any(e is None for e in args + outs):
            return None, None
        return args, outs
    cargs, couts = exprs(cond_plan, cond_seg, "ck", "cq")
    bargs, bouts = exprs(body_plan, body_seg, "bk", "bq")
    if cargs is None or bargs is None or len(couts) != 1 or len(bouts) != n_carry:
        return None
    args = [f"a{k}" for k in range(n_carry)] + [f"ck{k}" for k in range(n_ccaps)] + \
        [f"bk{k}" for k in range(n_bcaps)] + [f"cq{k}" for k in range(len(cond_plan.const_env))] + \
        [f"bq{k}" for k in range(len(body_plan.const_env))]
    cond_out = couts[0].replace("r[", "rc[")
    lines = ["# jitnet generated native while loop: edit the graph, not this file", "import numpy as np",
             "from numba import njit", "from {condmod} import segment as cond",
             "from {bodymod} import segment as body", "", "",
             "@njit(cache=True, nogil=True, error_model='numpy')", f"def wloop({', '.join(args)}):"]
    lines += [f"    c{k} = a{k}" for k in range(n_carry)]
    lines += ["    while True:", f"        rc = cond({', '.join(cargs)})", f"        if not {cond_out}[()]:",
              "            break", f"        r = body({', '.join(bargs)})"]
    lines += [f"        n{k} = {bouts[k]}" for k in range(n_carry)]
    lines += [f"        c{k} = n{k}" for k in range(n_carry)]
    lines.append("    return (" + "".join(f"c{k}, " for k in range(n_carry)) + ")")
    return "\n".join(lines) + "\n"


class NativeWhile(_Tiered):
    """A while_loop whose cond and body plans are each one native segment, run as one compiled loop."""

    def __init__(self, cond_plan, body_plan, n_carry, n_ccaps, n_bcaps):
        super().__init__()
        self.cond_plan, self.body_plan = cond_plan, body_plan
        self.n_carry, self.n_ccaps, self.n_bcaps = n_carry, n_ccaps, n_bcaps
        self._fn = None

    def _function(self):
        if self._fn is None:
            src = _while_source(self.cond_plan, self.cond_plan.segments[0], self.body_plan,
                                self.body_plan.segments[0], self.n_carry, self.n_ccaps, self.n_bcaps)
            src = src.replace("{condmod}", self.cond_plan.segments[0].function().py_func.__module__)
            src = src.replace("{bodymod}", self.body_plan.segments[0].function().py_func.__module__)
            self._fn = kernelgen.load_source(src, "cpu", "native-while").wloop
        return self._fn

    def run(self, carry, ccaps, bcaps):
        """Return the final carry arrays, or None when the loop cannot run natively."""
        consts = [a for _, a in self.cond_plan.const_env] + [a for _, a in self.body_plan.const_env]
        try:
            return self.attempt(lambda: self._function()(*carry, *ccaps, *bcaps, *consts))
        except IndexError as e:
            bounds.reraise_native(e)
            raise


def while_driver(cond_plan, body_plan, n_carry, n_ccaps, n_bcaps):
    """Return a NativeWhile when both plans are single native segments over their arguments, else None."""
    for p in (cond_plan, body_plan):
        segs = getattr(p, "segments", None)
        if not segs or len(segs) != 1 or len(p.steps) != 1 or p.state_slots or p.gradin_slots or p.grad_writes:
            return None
    if _while_source(cond_plan, cond_plan.segments[0], body_plan, body_plan.segments[0], n_carry, n_ccaps,
                     n_bcaps) is None:
        return None
    return NativeWhile(cond_plan, body_plan, n_carry, n_ccaps, n_bcaps)
