"""Winograd convolutions: stride-1 ``conv2d`` and its gradients in F(m x m, r x r) tiles.

A stride-1 convolution with an r x r kernel computes each m x m block of output from an (m+r-1)^2 block of
input. Winograd's minimal filtering algorithm does it with (m+r-1)^2 multiplies instead of m^2 r^2: with the
transforms A^T (m, a), G (a, r) and B^T (a, a), a = m + r - 1,

    Y = A^T [ (G g G^T) * (B^T d B) ] A                        (* elementwise)

and summed over input channels the elementwise products become a^2 independent matrix products, one per
transformed position (xi, nu): M[xi nu] (tiles*N, O) = V[xi nu] (tiles*N, C) @ U[xi nu] (C, O). For 5x5 filters
with F(4x4, 5x5) that is 64 products instead of 400 per output block: the 64 GEMMs of a (128, 64, 12, 12) conv
take a sixth of the flops of im2col's one.

The gradients stay in the Winograd domain. The input gradient of a stride-1 convolution is a stride-1
convolution of the output gradient with the flipped, transposed filters (``nn.functional`` routes it here). The
filter gradient is the adjoint of the forward map: dM = A dY A^T per output block, dU[xi nu] = V[xi nu]^T dM[xi
nu] (one long-K GEMM per position), dg = G^T dU G. It is the exact gradient of the forward computation.

Layout: the transforms vectorize over channels, so images are NHWC (``to_nhwc`` / ``from_nhwc`` transpose to
and from NCHW, with the zero padding and the cropping of the last partial tiles), and the transformed tiles
live in "planes": row t*N + n holds tile t of image n as a*a runs of channels, and the GEMMs read position
(xi, nu) of every row through a leading dimension. The transform kernels are generated for each (m, r) and
dtype with the matrices' entries as literals and zero terms dropped, written through ``kernelgen.load_source``
(so they are cached on disk like every generated kernel): each job transforms one (tile, image) block, LB
channels at a time, in two passes (rows, then columns) between scratch buffers that stay in L1. Large
batches run in chunks (``CHUNK_BYTES``).

The transforms come from the Toom-Cook construction on the points 0, 1, -1, 2, -2, 1/2, -1/2, ... and infinity
(``matrices``); B^T is solved exactly (fractions) from the defining identity. Tiles: F(4x4, 3x3) (a = 6) and
F(4x4, 5x5) (a = 8). In float32 their results match direct convolution to about 3e-6 of the output's scale
(tests/test_winograd.py checks 2e-5).
"""
from __future__ import annotations

import threading
from fractions import Fraction

import numpy as np
from numba import njit, prange

from . import kernelgen
from .blas import gemm
from .kernels_conv import workspace

__all__ = ["matrices", "supported", "conv2d", "conv2d_grad_weight", "TILE"]

#: Output tile size m for each supported (square) kernel size r.
TILE = {3: 4, 5: 4}
#: Lanes (channels) a transform job handles at a time: its scratch blocks stay in L1.
LB = 64
_POINTS = [Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(-1, 2),
           Fraction(4), Fraction(-4)]


def _solve_exact(P, E):
    """Solve P X = E exactly (P: rows x n Fractions, E: rows x k), for a consistent system of full column rank."""
    rows, n = len(P), len(P[0])
    aug = [list(P[i]) + list(E[i]) for i in range(rows)]
    piv_row = 0
    for col in range(n):
        p = next((i for i in range(piv_row, rows) if aug[i][col] != 0), None)
        if p is None:
            raise ValueError("Winograd: singular transform system")
        aug[piv_row], aug[p] = aug[p], aug[piv_row]
        pv = aug[piv_row][col]
        aug[piv_row] = [v / pv for v in aug[piv_row]]
        for i in range(rows):
            if i != piv_row and aug[i][col] != 0:
                f = aug[i][col]
                aug[i] = [a - f * b for a, b in zip(aug[i], aug[piv_row])]
        piv_row += 1
    if any(v != 0 for i in range(n, rows) for v in aug[i]):
        raise ValueError("Winograd: inconsistent transform system")
    return [row[n:] for row in aug[:n]]


def matrices(m, r):
    """Return exact (A^T (m, a), G (a, r), B^T (a, a)) of F(m, r), a = m + r - 1, as lists of Fractions.

    Toom-Cook on the first a - 1 of 0, 1, -1, 2, -2, 1/2, -1/2, 4, -4 plus the point at infinity; B^T is the
    unique solution of sum_j A^T[i, j] G[j, k] B^T[j, l] = [l == i + k] (the 1-D correlation identity).
    """
    a = m + r - 1
    if a - 1 > len(_POINTS):
        raise ValueError(f"Winograd: F({m}, {r}) needs more interpolation points than are defined")
    pts = _POINTS[:a - 1]
    AT = [[Fraction(0)] * a for _ in range(m)]
    G = [[Fraction(0)] * r for _ in range(a)]
    for j, p in enumerate(pts):
        nj = Fraction(1)
        for q in pts:
            if q != p:
                nj *= p - q
        for i in range(m):
            AT[i][j] = p ** i
        for i in range(r):
            G[j][i] = p ** i / nj
    AT[m - 1][a - 1] = Fraction(1)
    G[a - 1][r - 1] = Fraction(1)
    P = [[AT[i][j] * G[j][k] for j in range(a)] for i in range(m) for k in range(r)]
    E = [[Fraction(int(l == i + k)) for l in range(a)] for i in range(m) for k in range(r)]
    BT = _solve_exact(P, E)
    return AT, G, BT


#: Fewest input and output channels for which Winograd tiles beat im2col (measured fwd+bwd on 2 cores, batch 64
#: of 16x16: 5x5 filters pay from 16 channels, 1.4x; 3x3 from 24-32, 1.05-1.24x; below, the a*a GEMMs with
#: K = C are too small).
MIN_CHANNELS = {3: 32, 5: 16}


def supported(x_shape, w_shape, stride, dilation, dtype):
    """True where a conv2d of these shapes runs (and pays) in Winograd tiles.

    Only on the main thread: the transform kernels are always parallel, and Numba's workqueue layer takes
    parallel launches from one thread at a time (elsewhere the im2col path runs its serial kernels).
    """
    o, c, kh, kw = w_shape
    return (stride == (1, 1) and dilation == (1, 1) and kh == kw and kh in TILE
            and min(c, o) >= MIN_CHANNELS[kh] and np.dtype(dtype) in (np.float32, np.float64)
            and threading.current_thread() is threading.main_thread())


# --------------------------------------------------------------------------------------------------------------
# Generated transform kernels
# --------------------------------------------------------------------------------------------------------------

def _lin(coefs, names, tname):
    """Source of sum(c * name) over the nonzero coefficients, with literals cast to the kernel's dtype."""
    terms = []
    for c, n in zip(coefs, names):
        if c == 0:
            continue
        if c == 1:
            terms.append(f"+ {n}")
        elif c == -1:
            terms.append(f"- {n}")
        else:
            s = "-" if c < 0 else "+"
            terms.append(f"{s} {tname}({float(abs(c))!r}) * {n}")
    if not terms:
        return f"{tname}(0.0)"
    src = " ".join(terms)
    return src[2:] if src.startswith("+ ") else "-" + src[2:]


def _separable(name, doc, p1, p2, rin, cin, src_image, tname):
    """Source of a kernel that maps each (rin, cin) block b of its input to P2 b P1^T, per tile and lane.

    One side is an image (N, rows, columns, lanes) whose block for tile t of image n starts at (y0, x0); the
    other is a planes matrix whose row t*N + n holds the block's positions one after the other, each a run of
    lanes. A job handles one (tile, image) pair, LB lanes at a time: it gathers the block into a scratch buffer,
    runs the two passes between scratch buffers at compile-time offsets (LLVM vectorizes them behind a single
    alias check) and writes the result out in contiguous runs.
    """
    n1, n2 = len(p1), len(p2)
    fm = "{'reassoc', 'nsz', 'arcp', 'contract'}"
    img, pl = ("src", "dst") if src_image else ("dst", "src")
    L = [f"@njit(cache=True, nogil=True, fastmath={fm}, error_model='numpy')",
         f"def _{name}_job(src, dst, t, n, tx_n, bi, bt):",
         "    ty = t // tx_n", "    y0 = ty * M", "    x0 = (t - ty * tx_n) * M",
         f"    nc = {img}.shape[3]", f"    row = t * {img}.shape[0] + n",
         "    for c0 in range(0, nc, LB):", "        nl = min(LB, nc - c0)",
         f"        for i in range({rin}):", f"            for j in range({cin}):",
         f"                o = (i * {cin} + j) * LB"]
    if src_image:
        L += ["                for k in range(nl):",
              "                    bi[o + k] = src[n, y0 + i, x0 + j, u64(c0 + k)]"]
    else:
        L += [f"                s0 = (i * {cin} + j) * nc + c0", "                for k in range(nl):",
              "                    bi[o + k] = src[row, u64(s0 + k)]"]
    L += [f"        for i in range({rin}):", f"            b0 = i * {cin * LB}", f"            b1 = i * {n1 * LB}",
          "            for k in range(LB):"]
    L += [f"                v{j} = bi[b0 + {j * LB} + k]" for j in range(cin)]
    L += [f"                bt[b1 + {nu * LB} + k] = {_lin(p1[nu], [f'v{j}' for j in range(cin)], tname)}"
          for nu in range(n1)]
    L += [f"        for nu in range({n1}):", "            b0 = nu * LB", "            for k in range(LB):"]
    L += [f"                w{i} = bt[b0 + {i * n1 * LB} + k]" for i in range(rin)]
    L += [f"                bi[b0 + {xi * n1 * LB} + k] = {_lin(p2[xi], [f'w{i}' for i in range(rin)], tname)}"
          for xi in range(n2)]
    L += [f"        for i in range({n2}):", f"            for j in range({n1}):",
          f"                o = (i * {n1} + j) * LB"]
    if src_image:
        L += [f"                d0 = (i * {n1} + j) * nc + c0", "                for k in range(nl):",
              "                    dst[row, u64(d0 + k)] = bi[o + k]"]
    else:
        L += ["                for k in range(nl):",
              "                    dst[n, y0 + i, x0 + j, u64(c0 + k)] = bi[o + k]"]
    L += ["", "", "@njit(parallel=True, cache=True, nogil=True, error_model='numpy')",
          f"def {name}(src, dst, tx_n, n_tiles):", f'    """{doc}"""', f"    nn = {img}.shape[0]",
          "    for job in prange(nn * n_tiles):", "        n = job // n_tiles",
          f"        bi = np.empty({max(rin * cin, n1 * n2) * LB}, src.dtype)",
          f"        bt = np.empty({rin * n1 * LB}, src.dtype)",
          f"        _{name}_job(src, dst, job - n * n_tiles, n, tx_n, bi, bt)", "", ""]
    return L


def _source(m, r, tname):
    AT, _, BT = matrices(m, r)
    a = m + r - 1
    A = [[AT[j][i] for j in range(m)] for i in range(a)]           # A = (A^T)^T, (a, m)
    L = kernelgen._header(f"Winograd F({m}x{m}, {r}x{r}) transforms for {tname}")
    L += ["from numpy import uint64 as u64", f"M = {m}", f"LB = {LB}", "", ""]
    L += _separable("input_transform", "V[t*N + n, (xi*a + nu)*C + c] = (B^T d B)[xi, nu] for the a x a block d "
                    "of tile t of xp[n] (N, Hp, Wp, C).", BT, BT, a, a, True, tname)
    L += _separable("output_transform", "Y[n, y0 + i, x0 + j, o] = (A^T Mx A)[i, j] for each tile t of each image "
                    "n, Mx (T*N, a*a*O + pad), Y (N, TY*m, TX*m, O).", AT, AT, a, a, False, tname)
    L += _separable("output_transform_adjoint", "dM[t*N + n, (xi*a + nu)*O + o] = (A dy A^T)[xi, nu] for the m x m "
                    "block dy of tile t of dY[n] (N, TY*m, TX*m, O).", A, A, m, m, True, tname)
    return "\n".join(L)


_KERNELS = {}


def _kernels(m, r, dtype):
    key = (m, r, np.dtype(dtype))
    mod = _KERNELS.get(key)
    if mod is None:
        mod = _KERNELS[key] = kernelgen.load_source(_source(m, r, kernelgen.dtype_name(dtype)))
    return mod


_FLOAT = {}


def _float_mats(m, r):
    v = _FLOAT.get((m, r))
    if v is None:
        v = _FLOAT[(m, r)] = tuple(np.array([[float(e) for e in row] for row in M]) for M in matrices(m, r))
    return v


# --------------------------------------------------------------------------------------------------------------
# Layout kernels
# --------------------------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True, nogil=True)
def to_nhwc(x, xp, ph, pw):
    """xp[n, h + ph, w + pw, c] = x[n, c, h, w], zero elsewhere, for x (N, C, H, W) and xp (N, Hp, Wp, C)."""
    n_, c_, h_, w_ = x.shape
    hp, wp = xp.shape[1], xp.shape[2]
    for n in prange(n_):
        xn = x[n]
        for i in range(hp):
            ih = i - ph
            for j in range(wp):
                iw = j - pw
                dst = xp[n, i, j]
                if 0 <= ih < h_ and 0 <= iw < w_:
                    for c in range(c_):
                        dst[c] = xn[c, ih, iw]
                else:
                    dst[:] = 0


@njit(cache=True, parallel=True, nogil=True)
def from_nhwc(y, out, bias, has_bias):
    """out[n, o, i, j] = y[n, i, j, o] (+ bias[o]) for y (N, >= OH, >= OW, O) and out (N, O, OH, OW)."""
    n_, o_, oh, ow = out.shape
    for n in prange(n_):
        yn = y[n]
        for o in range(o_):
            b = bias[o] if has_bias else yn[0, 0, 0] * 0
            dst = out[n, o]
            for i in range(oh):
                for j in range(ow):
                    dst[i, j] = yn[i, j, o] + b


@njit(cache=True, nogil=True)
def _gemms(a, b, out):
    """out[i] = a[i] @ b[i] for each i (NumPy's BLAS, its own threads)."""
    for i in range(a.shape[0]):
        gemm(a[i], b[i], out[i])


@njit(cache=True, nogil=True)
def _gemms_tn(a, b, out):
    """out[i] = a[i].T @ b[i] for each i."""
    for i in range(a.shape[0]):
        gemm(a[i].T, b[i], out[i])


# --------------------------------------------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------------------------------------------

def _geometry(h, w, r, pads, m):
    oh = h + pads[0][0] + pads[0][1] - r + 1
    ow = w + pads[1][0] + pads[1][1] - r + 1
    ty, tx = -(-oh // m), -(-ow // m)
    return oh, ow, ty, tx


def _work(tag, shape, dtype):
    """A reusable scratch array of ``shape`` (``kernels_conv.workspace``, one per tag and dtype)."""
    return workspace(int(np.prod(shape)), dtype, "winograd-" + tag).reshape(shape)


def _planes(tag, rows, p, lanes, dtype):
    """A (rows, p*lanes + pad) scratch buffer and its (p, rows, lanes) view; the row length is kept off
    multiples of 4 KiB, so the p runs of one row do not all fall in the same cache sets."""
    rl = p * lanes
    rl += (-rl) % 16 + 16 if (rl * np.dtype(dtype).itemsize) % 4096 == 0 else 0
    buf = _work(tag, (rows, rl), dtype)
    return buf, buf[:, :p * lanes].reshape(rows, p, lanes).transpose(1, 0, 2)


def _input_tiles(x, r, pads, m, ty, tx, mod):
    """Return the planes buffer and (a*a, ty*tx*N, C) view of the transformed input tiles of x (N, C, H, W)."""
    n, c = x.shape[:2]
    a = m + r - 1
    xp = _work("xp", (n, ty * m + r - 1, tx * m + r - 1, c), x.dtype)
    to_nhwc(np.ascontiguousarray(x), xp, pads[0][0], pads[1][0])
    buf, v = _planes("v", ty * tx * n, a * a, c, x.dtype)
    mod.input_transform(xp, buf, tx, ty * tx)
    return v


#: Scratch budget per batch chunk: the transformed tiles of the input (and of the output) take about
#: (a/m)^2 times the input (4x for F(4x4, 5x5)), so large batches run in chunks of images whose planes fit.
CHUNK_BYTES = 64 << 20


def _batch_chunks(n, ty, tx, a, lanes, itemsize):
    per_image = ty * tx * a * a * max(lanes) * itemsize
    nb = max(1, min(n, CHUNK_BYTES // max(per_image, 1)))
    return [(i, min(n, i + nb)) for i in range(0, n, nb)]


def conv2d(x, w, b, pads):
    """Stride-1 cross-correlation of x (N, C, H, W) with w (O, C, r, r) (+ b) in Winograd tiles."""
    n, c, h, wd = x.shape
    o, r = w.shape[0], w.shape[2]
    m = TILE[r]
    a = m + r - 1
    oh, ow, ty, tx = _geometry(h, wd, r, pads, m)
    mod = _kernels(m, r, x.dtype)
    _, G, _ = _float_mats(m, r)
    # U[xi*a+nu] (C, O) = (G g G^T)[xi, nu] for each filter g = w[o, c]
    u = np.einsum("ir,ocrs,js->ijco", G, w.astype(np.float64), G, optimize=True)
    u = np.ascontiguousarray(u.reshape(a * a, c, o), dtype=x.dtype)
    out = np.empty((n, o, oh, ow), x.dtype)
    bias = b if b is not None else np.zeros(1, x.dtype)
    for n0, n1 in _batch_chunks(n, ty, tx, a, (c, o), x.itemsize):
        k = n1 - n0
        v = _input_tiles(x[n0:n1], r, pads, m, ty, tx, mod)
        mbuf, mx = _planes("m", ty * tx * k, a * a, o, x.dtype)
        _gemms(v, u, mx)
        y = _work("y", (k, ty * m, tx * m, o), x.dtype)
        mod.output_transform(mbuf, y, tx, ty * tx)
        from_nhwc(y, out[n0:n1], bias, b is not None)
    return out


def conv2d_grad_weight(x, g, w_shape, pads):
    """Gradient of ``conv2d`` with respect to its filters: x (N, C, H, W), g (N, O, OH, OW) -> (O, C, r, r)."""
    n, c, h, wd = x.shape
    o, r = w_shape[0], w_shape[2]
    m = TILE[r]
    a = m + r - 1
    oh, ow, ty, tx = _geometry(h, wd, r, pads, m)
    mod = _kernels(m, r, x.dtype)
    du = np.empty((a * a, c, o), x.dtype)
    part = None
    for n0, n1 in _batch_chunks(n, ty, tx, a, (c, o), x.itemsize):
        k = n1 - n0
        v = _input_tiles(x[n0:n1], r, pads, m, ty, tx, mod)
        gp = _work("y", (k, ty * m, tx * m, o), x.dtype)
        to_nhwc(np.ascontiguousarray(g[n0:n1]), gp, 0, 0)
        dbuf, dm = _planes("m", ty * tx * k, a * a, o, x.dtype)
        mod.output_transform_adjoint(gp, dbuf, tx, ty * tx)
        if n0 == 0:
            _gemms_tn(v, dm, du)
        else:                                   # later chunks add their products
            part = np.empty_like(du) if part is None else part
            _gemms_tn(v, dm, part)
            du += part
    _, G, _ = _float_mats(m, r)
    dw = np.einsum("ir,ijco,js->ocrs", G, du.reshape(a, a, c, o).astype(np.float64), G, optimize=True)
    return np.ascontiguousarray(dw, dtype=x.dtype)
