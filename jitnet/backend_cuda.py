"""The CUDA backend: the services every row's CUDA implementation uses, and elementwise kernels from templates.

Services: allocation (``empty``, ``full``, ``zeros``, ``arange``, ``linspace``, ``eye``), views without copies
(``reshape``, ``transpose_view``, ``broadcast_view``, ``flat_view``), copies and casts (``contiguous``,
``copy``, ``copy_into``, ``cast``), launches (``launch`` over n work items, ``launch_rows`` block per row),
index checks (``index_array``, ``error_slot``: the device error record a kernel fills), row views for
last-axis kernels (``last_axis_rows``, ``restore_axis``), the optimizer updates' argument forms
(``flat_state``, ``grad_like``, ``host_value``, ``sparse_rows``) and ``run_primitive`` (another row's CUDA
implementation). Elementwise rows need no CUDA code of their own: :func:`elementwise_impl` generates a kernel
from the row's scalar template (:mod:`jitnet.kernelgen_cuda`), and :func:`install` gives every such row one.

The CUDA implementations themselves live with their rows, beside the CPU ones (``ops.py``,
``nn/functional.py``, ``nn/embedding_ops.py``, ``optim/updates.py``, ``random.py``, ``compiler/prims.py``),
and reach this module through ``jitnet.lazy.LazyModule``: it is imported only once a GPU is in use. Device
arrays are Numba device arrays; 0-d host arrays among a primitive's inputs are scalars (a Python number in
``x * 2``, a learning rate), passed to kernels by value, never copied to the device. Nothing here copies
between host and device except where a docstring says so.
"""
from __future__ import annotations

import math

import numpy as np

from . import cuda as C
from . import kernels_gpu as KG
from .autodiff import core as _ad
from .kernelgen import ElementwiseProgram, cast_template, collapse_dims, template_expr
from .kernelgen_cuda import elementwise_kernel

_bool = np.dtype(np.bool_)
_i64 = np.dtype(np.int64)
_f32 = np.dtype(np.float32)
_f64 = np.dtype(np.float64)


def launch(kernel, n, *args):
    """Launch a 1-D kernel for ``n`` work items (grid computed from n; nothing for n == 0) on the current
    stream (``cuda_runtime.launch_stream``)."""
    if n > 0:
        kernel[KG.grid(n), KG.BLOCK, C.launch_stream()](*args)


def launch_rows(kernel, m, *args):
    """Launch a block-per-row kernel over ``m`` rows."""
    if m > 0:
        kernel[max(1, min(m, KG.MAX_BLOCKS)), KG.BLOCK, C.launch_stream()](*args)


def shape_size(shape):
    n = 1
    for s in shape:
        n *= int(s)
    return n


def is_host(a):
    return isinstance(a, np.ndarray)


def error_slot(name, what="index"):
    return C.error_record(), C.error_op(name, what)


# ==============================================================================================================
# Allocation, views, copies
# ==============================================================================================================

def empty(shape, dtype):
    """Return an uninitialised device array."""
    return C.empty(shape, dtype)


def full(shape, value, dtype):
    """Return a device array of ``shape`` filled with ``value`` (a fill kernel: no transfer)."""
    dtype = np.dtype(dtype)
    out = C.empty(shape, dtype)
    n = out.size
    if n:
        v = dtype.type(value)
        if dtype == _bool:
            v = np.uint8(bool(value))
            flat = C.view(out, (n,), (1,), 0)
            launch(KG.fill, n, as_u8(flat), v)
        else:
            launch(KG.fill, n, C.reshape(out, (n,)), v)
    return out


def as_u8(d):
    """A bool device array seen as uint8 (kernels store 0/1 into it)."""
    if C.simulator_enabled():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        return FakeCUDAArray(d._ary.view(np.uint8))
    return d.view(np.uint8)


def zeros(shape, dtype):
    """Return a device array of zeros."""
    return full(shape, 0, dtype)


def arange(start, stop, step, dtype):
    """Return ``np.arange(start, stop, step)`` computed on the device."""
    dtype = np.dtype(dtype)
    n = max(0, int(math.ceil((stop - start) / step)))
    out = C.empty((n,), dtype)
    if dtype.kind in "iu":
        launch(KG.arange_fill, n, out, np.int64(start), np.int64(step))
    else:
        launch(KG.arange_fill, n, out, np.float64(start), np.float64(step))
    return out


def linspace(start, stop, num, dtype):
    """Return ``np.linspace(start, stop, num)`` computed on the device."""
    step = (stop - start) / (num - 1) if num > 1 else 0.0
    out = C.empty((num,), dtype)
    launch(KG.arange_fill, num, out, np.float64(start), np.float64(step))
    if num > 1:
        copy_into(C.view(out, (1,), (out.dtype.itemsize,), (num - 1) * out.dtype.itemsize),
                  np.array(stop, dtype))
    return out


def eye(n, m, dtype, k=0):
    """Return an n x m identity matrix (ones on diagonal k) on the device."""
    out = C.empty((n, m), dtype)
    launch(KG.eye_fill, n * m, out, np.int64(k))
    return out


def transpose_view(d, axes):
    """Return a view of ``d`` with axes permuted (no copy)."""
    return C.view(d, [d.shape[a] for a in axes], [d.strides[a] for a in axes], 0)


def broadcast_view(d, shape):
    """Return a read-only style view of ``d`` broadcast to ``shape`` (zero strides; no copy)."""
    shape = tuple(int(s) for s in shape)
    if tuple(d.shape) == shape:
        return d
    pad = len(shape) - d.ndim
    strides = [0] * pad + [0 if s == 1 and t != 1 else st for s, t, st in zip(d.shape, shape[pad:], d.strides)]
    return C.view(d, shape, strides, 0)


def contiguous(d):
    """Return ``d`` if it is C-contiguous, else a contiguous copy (a copy kernel)."""
    return d if C.is_contiguous(d) else copy(d)


def reshape(d, shape):
    """Return ``d`` with a new shape (a view when contiguous, else a copy first)."""
    return C.reshape(contiguous(d), shape)


def flat_view(d):
    return C.reshape(d, (d.size,))


# ==============================================================================================================
# Elementwise programs: one generated kernel per (expression, dtypes, layout)
# ==============================================================================================================

class _EwPlan:
    __slots__ = ("oshape", "size", "kinds", "flat", "cshape", "cstrides", "ostrides", "kernel", "odtype")


_PLANS: dict = {}


def _sig(a):
    if is_host(a):
        return ("h", a.dtype.str, a.shape)
    return ("d", a.dtype.str, tuple(a.shape), tuple(a.strides))


def _build(arrays, expr, odtype, out, name):
    shapes = [tuple(a.shape) for a in arrays]
    try:
        oshape = np.broadcast_shapes(*shapes) if shapes else ()
        if out is not None:
            if np.broadcast_shapes(oshape, tuple(out.shape)) != tuple(out.shape):
                raise ValueError
            oshape = tuple(out.shape)
    except ValueError:
        extra = [] if out is None else [tuple(out.shape)]
        raise ValueError(f"{name}: operands could not be broadcast together with shapes "
                         + " and ".join(str(s) for s in shapes + extra)) from None
    p = _EwPlan()
    p.oshape, p.odtype = oshape, np.dtype(odtype)
    p.size = size = shape_size(oshape)
    kinds, prog_in = [], []
    for a in arrays:
        if is_host(a):
            if a.size != 1:
                raise RuntimeError(f"{name}: a host array of shape {a.shape} cannot be an operand of a CUDA op; "
                                   f"move it with .to('cuda')")
            kinds.append("host")
            prog_in.append((a.dtype, True))
        elif a.size == 1 and size != 1:
            kinds.append("device")
            prog_in.append((a.dtype, True))
        else:
            kinds.append("array")
            prog_in.append((a.dtype, False))
    p.kinds = kinds
    out_contig = out is None or C.is_contiguous(out)
    p.flat = out_contig and all(k != "array" or (tuple(a.shape) == oshape and C.is_contiguous(a))
                                for a, k in zip(arrays, kinds))
    if p.flat:
        rank = 0
    else:
        strides = []
        for a, k in zip(arrays, kinds):
            if k != "array":
                strides.append((0,) * len(oshape))
                continue
            pad = len(oshape) - a.ndim
            strides.append(tuple([0] * pad + [0 if d == 1 else s for d, s in zip(a.shape, a.strides)]))
        ost = tuple(out.strides) if out is not None else C.c_strides(oshape, p.odtype.itemsize)
        cshape, cst = collapse_dims(oshape, strides + [ost])
        p.cshape, p.cstrides, p.ostrides = cshape, cst[:-1], cst[-1]
        rank = len(cshape)
    prog = ElementwiseProgram(prog_in, [(expr, p.odtype)], [("t0", p.odtype)])
    p.kernel, _ = elementwise_kernel(prog, rank, ["host" if k == "host" else "device" for k in kinds])
    return p


def run_program(arrays, expr, odtype, out=None, name="elementwise"):
    """Compute ``expr`` (a scalar expression over x0, x1, ...) elementwise over broadcast ``arrays``.

    Returns a new contiguous device array of dtype ``odtype``, or writes into device array ``out`` (any
    non-negative strides) and returns it.
    """
    key = (expr, np.dtype(odtype).str, tuple(_sig(a) for a in arrays),
           None if out is None else (tuple(out.shape), tuple(out.strides)))
    p = _PLANS.get(key)
    if p is None:
        p = _build(arrays, expr, odtype, out, name)
        if len(_PLANS) > 8192:
            _PLANS.clear()
        _PLANS[key] = p
    o = out if out is not None else C.empty(p.oshape, p.odtype)
    size = p.size
    if size == 0:
        return o
    args = []
    if p.flat:
        for a, k in zip(arrays, p.kinds):
            if k == "host":
                args.append(a.reshape(-1)[0])
            elif k == "device":
                args.append(C.reshape(a, (1,)))
            else:
                args.append(C.reshape(a, (size,)))
        ov = C.reshape(o, (size,))
    else:
        for a, k, st in zip(arrays, p.kinds, p.cstrides):
            if k == "host":
                args.append(a.reshape(-1)[0])
            elif k == "device":
                args.append(C.view(a, (1,), (a.dtype.itemsize,), 0))
            else:
                args.append(C.view(a, p.cshape, st, 0))
        ov = C.view(o, p.cshape, p.ostrides, 0)
    p.kernel[KG.grid(size), KG.BLOCK, C.launch_stream()](size, *args, ov)
    return o


_EXPRS: dict = {}


def elementwise_impl(prim):
    """Return the CUDA impl of elementwise primitive ``prim`` (a kernel generated from its template)."""
    def impl(*arrays, **params):
        dts = tuple(a.dtype for a in arrays)
        key = (prim.name, dts, tuple(params.items()) if params else ())
        e = _EXPRS.get(key)
        if e is None:
            cdt, odt = prim.dtype_rule(dts, params)
            tpl = prim.template(params) if callable(prim.template) else prim.template
            e = _EXPRS[key] = (template_expr(tpl, dts, cdt, odt), np.dtype(odt))
        return run_program(arrays, e[0], e[1], name=prim.name)
    return impl


def run_primitive(prim_name, /, *arrays, **params):
    """Run the CUDA implementation of registry row ``prim_name`` (the rows' own, or a generated elementwise one)."""
    return impl_of(_ad.REGISTRY[prim_name])(*arrays, **params)


def cast(d, dtype):
    """Return ``d`` converted to ``dtype`` (a new array; ``d`` itself when the dtype is already right)."""
    dtype = np.dtype(dtype)
    if d.dtype == dtype:
        return d
    return run_primitive("cast", d, dtype=dtype)


def copy(d):
    """Return a new C-contiguous copy of device array ``d``."""
    return run_primitive("copy", d)


def copy_into(dst, src):
    """Copy ``src`` (device, or host: one counted transfer) broadcast and cast into device array ``dst``."""
    if dst.size == 0:
        return dst
    if is_host(src) and src.size != 1:
        src = C.to_device(np.ascontiguousarray(src))
    tpl = cast_template({"dtype": dst.dtype})
    expr = template_expr(tpl, (src.dtype,), src.dtype, dst.dtype) if src.dtype != dst.dtype else "x0"
    run_program([src], expr, dst.dtype, out=dst, name="copy")
    return dst


# ==============================================================================================================
# Views and shape ops
# ==============================================================================================================

# ==============================================================================================================
# Reductions
# ==============================================================================================================

def last_axis_rows(x, axis):
    """Return (contiguous 2-D rows with ``axis`` last, moved shape)."""
    nd = x.ndim
    if nd == 0:
        return C.reshape(contiguous(x), (1, 1)), (1,)
    if axis != nd - 1:
        x = transpose_view(x, [i for i in range(nd) if i != axis] + [axis])
    xc = contiguous(x)
    mshape = tuple(x.shape)
    return C.reshape(xc, (shape_size(mshape[:-1]), mshape[-1])), mshape


def restore_axis(arr, moved_shape, axis, nd):
    arr = C.reshape(arr, moved_shape)
    if axis != nd - 1:
        perm = list(range(nd - 1))
        perm.insert(axis, nd - 1)
        arr = transpose_view(arr, perm)
    return arr


# ==============================================================================================================
# Matmul
# ==============================================================================================================

# ==============================================================================================================
# Gathers and scatters
# ==============================================================================================================

def index_array(idx, bound, name, axis):
    """Return a device index array; a host scalar index is checked now and placed by a fill kernel."""
    if is_host(idx):
        if idx.dtype.kind not in "iu":
            raise TypeError(f"{name}: indices must be integers, got dtype {idx.dtype}")
        if idx.size != 1:
            raise RuntimeError(f"{name}: the index array is on the CPU and the tensor on cuda:0; move it with "
                               f".to('cuda')")
        v = int(idx.reshape(-1)[0])
        if not -bound <= v < bound:
            raise IndexError(f"{name}: index {v} is out of bounds for axis {axis} with size {bound}")
        return full(idx.shape, v % bound, _i64)
    if idx.dtype.kind not in "iu":
        if idx.dtype == _bool:
            raise TypeError(f"{name}: boolean index where an integer index was expected")
        raise TypeError(f"{name}: indices must be integers, got dtype {idx.dtype}")
    return idx


ATOMIC = {np.dtype(t) for t in (np.float32, np.float64, np.int32, np.int64, np.uint32, np.uint64)}


# ==============================================================================================================
# Softmax cross entropy
# ==============================================================================================================

# ==============================================================================================================
# Random numbers
# ==============================================================================================================



# ==============================================================================================================
# Services of the optimizer updates' CUDA implementations (those live with their rows in optim/updates.py)
# ==============================================================================================================

def host_value(a):
    """Return the Python value of a 0-d array (a counted transfer when it is on the device)."""
    if is_host(a):
        return a.reshape(-1)[0].item()
    return C.to_host(a).reshape(-1)[0].item()


def flat_state(a, what):
    if not C.is_contiguous(a):
        raise ValueError(f"optimizer update: the {what} array must be C-contiguous")
    return flat_view(a)


def grad_like(g, p):
    if tuple(g.shape) != tuple(p.shape):
        g = broadcast_view(g, p.shape) if not is_host(g) else full(p.shape, g.reshape(-1)[0], p.dtype)
    return flat_view(contiguous(cast(g, p.dtype)))


def sparse_rows(p, values, indices, name):
    """Return (2-D p view, dense summed gradient rows, row flags) for a sparse update (no transfer)."""
    if p.ndim == 0:
        raise ValueError("sparse update of a 0-d parameter")
    rows = p.shape[0]
    d = p.size // rows if rows else 0
    p2 = C.reshape(p, (rows, d))
    idx = flat_view(contiguous(index_array(indices, rows, name, 0)))
    vals = C.reshape(contiguous(cast(values, p.dtype)), (1, idx.size, d))
    gd = zeros((1, rows, d), p.dtype)
    flags = zeros((rows,), np.int32)
    err, opid = error_slot(f"{name} (sparse update)")
    launch(KG.scatter_add_axis, vals.size, gd, idx, vals, False, err, opid)
    launch(KG.rows_touched, idx.size, idx, flags, err, opid)
    return p2, C.reshape(gd, (rows, d)), flags


# ==============================================================================================================
# Convolution and pooling (NCHW)
# ==============================================================================================================

# ==============================================================================================================
# Installation
# ==============================================================================================================




def impl_of(prim):
    """Return ``prim``'s CUDA implementation: the row's own, or a generated kernel from its elementwise template
    (made on first use and kept on the row); raise NotImplementedError naming the op otherwise."""
    f = prim.impl.get("cuda")
    if f is None and prim.kind == "elementwise" and prim.template is not None:
        f = prim.impl["cuda"] = elementwise_impl(prim)
    if f is None:
        why = prim.extra.get("no_cuda")
        raise NotImplementedError(f"{prim.name}: this op has no CUDA kernel{f' ({why})' if why else ' yet'}; run "
                                  f"it on the CPU (.cpu()) and move the result back with .to('cuda')")
    return f


def install():
    """Give every elementwise row a generated CUDA kernel (called once by ``cuda.require``); rows registered later
    get theirs on first use (``impl_of``). Every other row holds its own ``impl["cuda"]`` (or says why it has
    none: ``extra["no_cuda"]``)."""
    for prim in list(_ad.REGISTRY.values()):
        if "cuda" not in prim.impl and prim.kind == "elementwise" and prim.template is not None:
            prim.impl["cuda"] = elementwise_impl(prim)
