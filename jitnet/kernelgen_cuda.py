"""Generated CUDA kernels for elementwise programs: the CUDA source emitter of ``jitnet.backends.CUDA``.

The same :class:`jitnet.kernelgen.ElementwiseProgram` that becomes ``@njit`` kernels on the CPU (one op
eagerly, a whole fusion group under ``jitnet.jit``) becomes one ``@cuda.jit`` kernel here: the scalar
templates of the primitives are spliced unchanged into a grid-stride loop over the output's elements. The
source goes through the same disk cache (:func:`jitnet.kernelgen.load_source`, target ``"cuda"``).

Layouts: in *flat* mode every array operand is a contiguous 1-D view of the output's size; in *strided*
mode the flat index is split into the output's (collapsed) multi-index and each operand is indexed with its
own strides (zero for broadcast dims); *indexed* mode (fused groups) maps each operand's dims onto the
output's loop indices as ``kernelgen.indexed_source`` does. A scalar operand is read once before the loop:
from a 1-element device array, or passed by value when it is a 0-d host array (a Python number).

A step traced with CUDA tensors is planned by ``compiler.plan.build_plan`` like any other: its fusion groups
(``compiler.codegen.group_program`` and ``index_maps``, views read in place included) come here through the CUDA
backend's ``group_kernel``.
"""
from __future__ import annotations

import hashlib
import os

from . import kernelgen
from . import kernels_gpu as KG
from .cuda_runtime import launch_stream
from .kernelgen import dtype_name

__all__ = ["elementwise_kernel", "group_kernel", "launch_elementwise"]

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
    if rank == 1 and any(r is not None and "i0" in r for r in in_reads):
        lines.append(f"{ind2}i0 = i")                    # a view's index expression names the loop index i0
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
            reads.append(", ".join("0" if d is None else d if isinstance(d, str)    # a view: an expression
                                   else ("i" if r == 1 else f"i{d}") for d in m))
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
        kernel[KG.grid(n), KG.BLOCK, launch_stream()](n, *args)
