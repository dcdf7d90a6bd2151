"""Generated CUDA kernels for elementwise programs, and plans that run a traced step on the GPU.

The same :class:`jitnet.kernelgen.ElementwiseProgram` that becomes ``@njit`` kernels on the CPU (one op
eagerly, a whole fusion group under ``jitnet.jit``) becomes one ``@cuda.jit`` kernel here: the scalar
templates of the primitives are spliced unchanged into a grid-stride loop over the output's elements. The
source goes through the same disk cache (:func:`jitnet.kernelgen.load_source`, target ``"cuda"``).

Layouts: in *flat* mode every array operand is a contiguous 1-D view of the output's size; in *strided*
mode the flat index is split into the output's (collapsed) multi-index and each operand is indexed with its
own strides (zero for broadcast dims); *indexed* mode (fused groups) maps each operand's dims onto the
output's loop indices as ``kernelgen.indexed_source`` does. A scalar operand is read once before the loop:
from a 1-element device array, or passed by value when it is a 0-d host array (a Python number).

:func:`build_gpu_plan` is the GPU counterpart of ``compiler.plan.build_plan`` for a step traced with CUDA
tensors: the same fusion groups (from ``compiler.passes.fuse`` and ``compiler.codegen.group_program``) run as
generated CUDA kernels, other nodes run their primitive's CUDA impl, and host-side nodes (a learning-rate
schedule on a CPU step counter) keep running on the CPU. Nothing in a plan copies between host and device.
"""
from __future__ import annotations

import hashlib
import os
import sys

import numpy as np

from . import cuda as _cuda
from . import kernelgen
from . import kernels_gpu as KG
from .autodiff import nans
from .compiler.plan import Plan
from .kernelgen import dtype_name

__all__ = ["elementwise_kernel", "group_kernel", "launch_elementwise", "build_gpu_plan", "GpuPlan"]

# Template calls whose Python semantics differ from the GPU's on inf/NaN get the helpers of kernels_gpu
_REWRITES = (("math.floor(", "floor_s("), ("math.ceil(", "ceil_s("), ("math.sin(", "sin_s("),
             ("math.cos(", "cos_s("), ("tanh_v(", "math.tanh("))     # the CPU's vectorizable tanh: CUDA's is fine
_HELPERS = ("fexp", "floor_s", "ceil_s", "sin_s", "cos_s", "sigmoid_s", "softplus_s", "sign_s", "maximum_s",
            "minimum_s", "floordiv_s", "ifloordiv_s", "imod_s", "fmod_s")

_salt = None


def _flags():
    global _salt
    if _salt is None:
        here = os.path.dirname(os.path.abspath(__file__))
        h = hashlib.sha256()
        for name in ("kernels_gpu.py", "kernels_scalar.py"):     # the helpers' bodies are in kernels_scalar
            with open(os.path.join(here, name), "rb") as f:
                h.update(f.read())
        _salt = "kernels_gpu=" + h.hexdigest()[:16] + (";sim" if KG.SIM else "")
    return _salt


def _header(what):
    return [f"# jitnet generated CUDA {what}, not this file", "import math", "import numpy as np",
            "from numpy import float16, float32, float64, int8, int16, int32, int64, uint8, bool_",
            "from numba import cuda",
            f"from jitnet.kernels_gpu import {', '.join(_HELPERS)}", ""]


def _cuda_expr(expr):
    for a, b in _REWRITES:
        expr = expr.replace(a, b)
    return expr


def _body(program, in_reads, out_index, rank, scalar_kinds, ind="    "):
    """Return the kernel body lines: scalar reads, the grid-stride loop, loads, ops, stores."""
    lines = []
    for i, (dt, sc) in enumerate(program.inputs):
        if sc:
            lines.append(f"{ind}x{i} = in{i}" if scalar_kinds[i] == "host" else f"{ind}x{i} = in{i}[0]")
    lines.append(f"{ind}i = cuda.grid(1)")
    lines.append(f"{ind}step = cuda.gridsize(1)")
    for k in range(1, rank):
        lines.append(f"{ind}d{k} = out0.shape[{k}]")
    lines.append(f"{ind}while i < n:")
    ind2 = ind + "    "
    if rank > 1:
        lines.append(f"{ind2}q = i")
        for k in range(rank - 1, 0, -1):
            lines.append(f"{ind2}i{k} = q % d{k}")
            lines.append(f"{ind2}q = q // d{k}")
        lines.append(f"{ind2}i0 = q")
    for i, (dt, sc) in enumerate(program.inputs):
        if not sc:
            lines.append(f"{ind2}x{i} = in{i}[{in_reads[i]}]")
    for k, (expr, dt) in enumerate(program.ops):
        lines.append(f"{ind2}t{k} = {dtype_name(dt)}({_cuda_expr(expr)})")
    for j, (name, dt) in enumerate(program.outputs):
        lines.append(f"{ind2}out{j}[{out_index}] = {name}")
    lines.append(f"{ind2}i += step")
    return lines


def _signature(program):
    args = ["n"] + [f"in{i}" for i in range(len(program.inputs))] + [f"out{j}" for j in range(len(program.outputs))]
    return ["@cuda.jit(cache=True)", f"def kernel({', '.join(args)}):"]


def elementwise_source(program, rank, scalar_kinds) -> str:
    """Return the CUDA kernel source of ``program`` over outputs of ``rank`` dims (0: flat 1-D views)."""
    r = max(rank, 1)
    idx = "i" if r == 1 else ", ".join(f"i{k}" for k in range(r))
    lines = _header("elementwise kernel: edit the program") + _signature(program)
    lines += _body(program, [idx] * len(program.inputs), idx, r, scalar_kinds)
    return "\n".join(lines) + "\n"


def indexed_source(program, out_rank, in_maps, scalar_kinds) -> str:
    """Return the CUDA kernel source of a fusion group (see ``kernelgen.indexed_source`` for ``in_maps``)."""
    r = max(out_rank, 1)
    oidx = "i" if r == 1 else ", ".join(f"i{k}" for k in range(r))
    reads = []
    for m in in_maps:
        if m == "scalar":
            reads.append(None)
        else:
            reads.append(", ".join("0" if d is None else ("i" if r == 1 else f"i{d}") for d in m))
    lines = _header("fused kernel: edit the graph") + _signature(program)
    lines += _body(program, reads, oidx, r, scalar_kinds)
    return "\n".join(lines) + "\n"


def elementwise_kernel(program, rank, scalar_kinds):
    """Return ``(kernel, source)`` for ``program`` (loaded through the kernel disk cache)."""
    src = elementwise_source(program, rank, scalar_kinds)
    return kernelgen.load_source(src, "cuda", _flags()).kernel, src


def group_kernel(program, out_rank, in_maps, scalar_kinds):
    """Return ``(kernel, source)`` for a fusion group's program."""
    src = indexed_source(program, out_rank, in_maps, scalar_kinds)
    return kernelgen.load_source(src, "cuda", _flags()).kernel, src


def launch_elementwise(kernel, n, args):
    """Launch a generated elementwise kernel over ``n`` elements (nothing for n == 0)."""
    if n:
        kernel[KG.grid(n), KG.BLOCK](n, *args)


# ==============================================================================================================
# Plans for steps traced on the GPU
# ==============================================================================================================

def _is_dev(a):
    return not isinstance(a, (np.ndarray, tuple))


class GpuPlan(Plan):
    """A compiled step whose arrays live on the GPU (a ``compiler.plan.Plan`` whose steps launch CUDA kernels)."""

    debug_note = " (launch)"     # JITNET_DEBUG times a step's launch: CUDA kernels run asynchronously


def build_gpu_plan(g, fuse_ops=True):
    """Return a GpuPlan for graph ``g`` (after DCE/CSE) whose values ``g.cuda_values`` live on the GPU."""
    from .compiler.codegen import group_program, index_maps
    from .compiler.passes import _grad_values, fuse

    on_gpu = g.cuda_values
    plan = GpuPlan()
    checking = nans.debug_nans_enabled()       # debug_nans: one checked step per primitive, nothing fused
    group_of = fuse(g) if fuse_ops and not checking else {}
    # a group runs on one device: drop groups whose members disagree (they run one node at a time)
    for grp in {id(x): x for x in group_of.values()}.values():
        devs = {m.out.id in on_gpu for m in grp.members}
        arr_in = {v.id in on_gpu for v in grp.inputs if v.size != 1}
        if len(devs | arr_in) > 1 or (devs == {False} and any(v.id in on_gpu for v in grp.inputs)):
            for m in grp.members:
                group_of.pop(m.id, None)
    units = []
    for n in g.nodes:
        if not n.alive:
            continue
        grp = group_of.get(n.id)
        if grp is None:
            units.append(n)
        elif grp.root is n:
            units.append(grp)
    slot_of = {}

    def slot(v):
        s = slot_of.get(v.id)
        if s is None:
            s = slot_of[v.id] = plan.nslots
            plan.nslots += 1
        return s

    for v in g.values:
        if v.kind == "arg":
            plan.arg_slots.append((slot(v), v.arg_index))
        elif v.kind == "state":
            plan.state_slots.append((slot(v), v.var))
        elif v.kind == "gradin":
            plan.gradin_slots.append((slot(v), v.var))
        elif v.kind == "const":
            plan.const_env.append((slot(v), v.const))

    # liveness of group outputs (views extend the life of what they alias), for buffer reuse
    alias_root = {}
    for u in units:
        if not hasattr(u, "members") and u.prim.kind == "view" and u.inputs:
            src = u.inputs[0]
            alias_root[u.out.id] = alias_root.get(src.id, src.id)
    last_use = {}
    for pos, u in enumerate(units):
        for v in u.inputs:
            last_use[alias_root.get(v.id, v.id)] = pos
    escaping = {v.id for v in g.outputs} | {v.id for v in _grad_values(g)}
    escaping = {alias_root.get(i, i) for i in escaping}
    free, release_at = {}, {}

    def buffer_for(out, pos):
        if out.id in escaping or out.id not in last_use:
            return None
        key = (out.shape or (1,), out.dtype.str)
        lst = free.get(key)
        if lst:
            buf = lst.pop()
        else:
            buf = _cuda.empty(out.shape or (1,), out.dtype)
            plan.buffer_bytes += buf.size * out.dtype.itemsize
        release_at.setdefault(last_use[out.id], []).append((key, buf))
        return buf

    for pos, u in enumerate(units):
        if hasattr(u, "members"):
            out = u.root.out
            prog = group_program(u)
            in_slots = [slot(v) for v in u.inputs]
            name = f"fused[{'+'.join(m.prim.name for m in u.members)}] -> {out.shape}"
            plan.groups.append(u)
            plan.kernel_count += 1
            if out.id in on_gpu:
                maps = index_maps(u)
                kinds = ["host" if (m == "scalar" and v.id not in on_gpu) else "device"
                         for m, v in zip(maps, u.inputs)]
                kernel, src = group_kernel(prog, len(out.shape or (1,)), maps, kinds)
                plan.sources.append(src)
                plan.steps.append(_gpu_group_step(kernel, in_slots, slot(out), out, maps, kinds,
                                                  buffer_for(out, pos)))
            else:
                from .compiler.codegen import cpu_kernels
                ks, kp, src = cpu_kernels(u)
                plan.sources.append(src)
                plan.steps.append(_cpu_group_step(kp if out.size >= kernelgen.PARALLEL_THRESHOLD else ks,
                                                  in_slots, slot(out), out))
            plan.step_names.append(name)
        else:
            n = u
            in_slots = [slot(v) for v in n.inputs]
            dev = n.out.id in on_gpu or any(v.id in on_gpu for v in n.inputs)
            impl = n.prim.impl.get("cuda") if dev else n.prim.impl["cpu"]
            if impl is None:
                raise NotImplementedError(f"jitnet.jit: {n.prim.name} has no CUDA kernel yet, so this step "
                                          f"cannot run on the GPU")
            step = _node_step(impl, in_slots, slot(n.out), n.params)
            if checking:
                step = nans.checked_step(step, n, in_slots, slot(n.out))
            plan.steps.append(step)
            plan.step_names.append(f"{n.prim.name}{' (cuda)' if dev else ''} -> {n.out.shape}")
            if n.prim.kind != "view":
                plan.kernel_count += 1
        for key, buf in release_at.pop(pos, ()):
            free.setdefault(key, []).append(buf)

    for v in g.outputs:
        plan.out_slots.append(("state", v.var) if v.kind == "state" else slot(v))
    plan.grad_writes = [(var, None if v is None else ("sparse", slot(v[1]), slot(v[2]), v[3])
                         if isinstance(v, tuple) else slot(v)) for var, v in g.grad_outputs]
    plan.var_shapes = [(var, var.shape) for _, var in plan.state_slots]
    return plan


def _gpu_group_step(kernel, in_slots, o, out, maps, kinds, buf):
    oshape, dtype, kshape = out.shape, out.dtype, out.shape or (1,)
    n = int(np.prod(kshape))
    scal = [m == "scalar" for m in maps]
    host = [k == "host" for k in kinds]
    grid, block = KG.grid(n), KG.BLOCK

    def step(env):
        args = []
        for s, sc, h in zip(in_slots, scal, host):
            a = env[s]
            if sc:
                a = a.reshape(())[()] if h else _cuda.reshape(a, (1,))
            args.append(a)
        dst = buf if buf is not None else _recycled(held, kshape, dtype)
        if n:
            kernel[grid, block](n, *args, dst)
        env[o] = dst if kshape == oshape else _cuda.reshape(dst, oshape)
    held = [None, None]
    return step


def _recycled(held, shape, dtype):
    """Return a device array for a value the step returns: one of the last two if nothing refers to it anymore.

    Every view jitnet makes of a device array refers to it (``cuda.view``), so a reference count of 3 (``held``,
    the local name and getrefcount's argument) means the caller dropped the result and no view of it is alive.
    Kernels run in launch order on one stream, so a kernel that still reads the old value finishes first.
    """
    for k in (0, 1):
        a = held[k]
        if a is not None and sys.getrefcount(a) == 3:
            return a
    a = _cuda.empty(shape, dtype)
    held[1] = held[0]
    held[0] = a
    return a


def _cpu_group_step(kernel, in_slots, o, out):
    oshape, dtype, kshape = out.shape, out.dtype, out.shape or (1,)

    def step(env):
        dst = np.empty(kshape, dtype)
        kernel(*[env[i] for i in in_slots], dst)
        env[o] = dst.reshape(oshape)
    return step


def _node_step(impl, in_slots, o, params):
    def step(env):
        env[o] = impl(*[env[i] for i in in_slots], **params)
    return step
