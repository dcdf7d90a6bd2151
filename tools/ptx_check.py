"""Compile CUDA kernels of kernels_gpu.py to PTX for sm_90 without a GPU (the simulator does not type kernels).

Covers the kernels built from bodies shared with the CPU (optimizer updates, the scalar helpers), the two
matmul kernels compiled from one body, and the fused nn rows' kernels (LSTM step and its gradients, the
per-channel batch-norm reductions and affine map, the reduced cross entropy's one-block passes), the row/column
reductions, the DNC memory step and skip-gram's
training kernel, for float32 and float64 (and the matmuls on float16 operands with a float32 product); prints the
PTX size and whether a kernel spills to local memory. Needs NVVM/NVRTC: ``pip install -e ".[cuda]"``; no driver
or device.

    python tools/ptx_check.py
"""
import argparse
import time

argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="Exits non-zero when a kernel fails to compile.").parse_args()
from numba import float32, float64, int64, int8, boolean, uint8, uint32
from numba.cuda import compile_ptx
import jitnet.kernels_gpu as KG
import types as _t
import sys as _s; _d = _s.modules[__import__("numba.cuda").cuda.compile_ptx.__module__.rsplit(".", 1)[0] + ".dispatcher"]
_d.get_current_device = lambda: _t.SimpleNamespace(compute_capability=(9, 0))   # device functions ask the driver for the target; there is none: sm_90

ok = 0
for T in (float32, float64):
    a1, a2, a3 = T[:], T[:, :], T[:, :, :]
    sigs = {
        "sgd_update": (a1, a1, a1, T, T, T, T, boolean, boolean),
        "adagrad_update": (a1, a1, a1, T, T, T),
        "rmsprop_update": (a1, a1, a1, a1, a1, T, T, T, T, T, T, boolean, boolean),
        "adam_update": (a1, a1, a1, a1) + (T,) * 8,
        "adamw_update": (a1, a1, a1, a1) + (T,) * 8,
        "sgd_rows_update": (a2, a2, a2, uint8[:], T, T, T, T, boolean, boolean),
        "adagrad_rows_update": (a2, a2, a2, uint8[:], T, T, T),
        "adam_rows_update": (a2, a2, a2, a2, uint8[:]) + (T,) * 8,
        "matmul_tiled": (a3, a3, a3, T),
        "matmul_tiled_big": (a3, a3, a3, T),
        "channel_partials": (a3, a3, float64[:, :, :], int64, int64),
        "channel_finish": (float64[:, :, :], a3, a2, int64, float64),
        "channel_affine": (a3, a1, a1, a3),
        "lstm_gates": (a2, a2, a1, a2, a1, a2, boolean, T),
        "lstm_step_dz": (a2, a2, a2, a1, a2, boolean, T),
        "lstm_step_dprev": (a2, a2, a2, a1, a2, a2, boolean, boolean, T),
        "lstm_prev_h": (a3, a2, a2),
        "labelled_rows_reduce": (a1, int64[:], boolean, a1),
        "labelled_rows_scale": (int64[:], a1, boolean, a1),
    }
    for name, sig in sigs.items():
        t0 = time.time()
        ptx, _ = compile_ptx(getattr(KG, name).py_func, sig, cc=(9, 0))
        local = ".local" in ptx
        print(f"{name:22s} {T}: {len(ptx):6d} chars of PTX, local memory: {local}, {time.time()-t0:.1f}s")
        ok += 1
# float16 operands (jn.autocast): the matmul kernels read them as stored and sum in float32
from numba.core.types import float16
for name in ("matmul_tiled", "matmul_tiled_big"):
    t0 = time.time()
    h3 = float16[:, :, :]
    ptx, _ = compile_ptx(getattr(KG, name).py_func, (h3, h3, float32[:, :, :], float32), cc=(9, 0))
    assert "cvt.f32.f16" in ptx, f"{name}: float16 operands are not widened in the kernel"
    print(f"{name:22s} float16->float32: {len(ptx):6d} chars of PTX, local memory: {'.local' in ptx}, "
          f"{time.time()-t0:.1f}s")
    ok += 1
# the DNC memory step (one thread per batch row; its scalar helpers are the CPU kernel's bodies)
import jitnet.kernels_dnc_gpu as KDG
for T in (float32, float64):
    a2 = T[:, :]
    t0 = time.time()
    ptx, _ = compile_ptx(KDG.dnc_memory.py_func, (a2, a2, a2, int64, int64, int64, float64, a2, boolean, a2,
                                                  int64[:, :]), cc=(9, 0))
    print(f"{'dnc_memory':22s} {T}: {len(ptx):6d} chars of PTX, local memory: {'.local' in ptx}, "
          f"{time.time()-t0:.1f}s")
    ok += 1
# the reductions' combine step (kernels_scalar.combine_s) and skip-gram's walk (kernels_skipgram's CPU bodies with
# the device's atomic add and generator: the simulator runs another generator, so only this compiles the GPU's)
import jitnet.kernels_skipgram_gpu as KSG
from numba import int32, uint64
for T in (float32, float64):
    for name in ("reduce_rows", "reduce_cols"):
        ptx, _ = compile_ptx(getattr(KG, name).py_func, (T[:, :], T[:, :], int64, T, int64), cc=(9, 0)); ok += 1
        print(f"{name:22s} {T}: {len(ptx):6d} chars of PTX, local memory: {'.local' in ptx}")
t0 = time.time()
c2 = float32[:, ::1]                 # (the device arrays the model passes are C-contiguous)
ptx, _ = compile_ptx(KSG.train_chunk_kernel.py_func, (int32[::1], int64[::1], int64, int64, c2, c2, int64[::1],
                     int64[::1], uint32[::1], int64, int64, float64, float64, int64, int64, uint64[::1], int64[::1],
                     int64[::1], int32[:, ::1], c2), cc=(9, 0))
assert "atom.global.add.f32" in ptx and "atom.global.add.u64" in ptx, "skip-gram: row or counter updates not atomic"
print(f"{'skipgram train_chunk':22s} float32: {len(ptx):6d} chars of PTX, local memory: {'.local' in ptx}, "
      f"{time.time()-t0:.1f}s")
ok += 1
# the shared scalar helpers inside a kernel, as the generated elementwise kernels call them
from numba import cuda
def helpers(x, y, out):
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[i] = (KG.sigmoid_s(x[i], 1.0) + KG.softplus_s(x[i], 0.0) + KG.sign_s(x[i], 0.0) + KG.maximum_s(x[i], y[i])
                  + KG.minimum_s(x[i], y[i]) + KG.floordiv_s(x[i], y[i]) + KG.fmod_s(x[i], y[i]))
for T in (float32, float64):
    ptx, _ = compile_ptx(helpers, (T[:], T[:], T[:]), cc=(9, 0)); ok += 1
    print("helpers", T, len(ptx))
def ihelpers(x, y, out):
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[i] = KG.ifloordiv_s(x[i], y[i]) + KG.imod_s(x[i], y[i])
ptx, _ = compile_ptx(ihelpers, (int64[:], int64[:], int64[:]), cc=(9, 0)); ok += 1
print("compiled", ok, "kernels")
