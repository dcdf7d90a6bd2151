"""The DNC memory step's CUDA kernel: the forward step and its gradient over a packed state (device arrays).

The same equations, in the same order, as the CPU kernel ``kernels_dnc._memory_kernel``, with every array
indexed flat (CUDA device code has no ``reshape`` and no allocation): one thread runs one batch row, walking
the rows with a grid-stride loop, and its scratch (the interface after its nonlinearities, usage and
allocation, content lookups, link weightings and the gradients of the backward pass) is its row of one
(B, F) device array laid out by :func:`scratch_layout`, plus a (B, N) int64 array for the usage sort. Its
helpers (the offsets, the nonlinearities, the content lookup and the row norms with their gradients) are the CPU
kernel's own Python bodies compiled for the device.

One thread per row keeps the step's sequential parts (the insertion sort of the usage, the allocation's
exclusive product and its reverse-order gradient) as they are on the CPU, and the step's loops are short
(N, W, R are tens): a batch of B rows is B threads. Imported only when a CUDA device is first used.
"""
from __future__ import annotations

import math

from numba import cuda

from . import kernels_dnc as KD

__all__ = ["scratch_layout", "scratch_size", "dnc_memory"]


def scratch_layout(N, W, R, I, S):
    """Offsets of one row's float scratch: iv, psi, pre, prefix, alloc, n0, sw, cw, n1, sr, cr, fw, bw, kn, tmp,
    gM, gL, gwr, gww, gu, gc, gsa, giv, gn; and the total size."""
    f_iv = 0
    f_psi = f_iv + I
    f_pre = f_psi + N
    f_prefix = f_pre + N
    f_alloc = f_prefix + N
    f_n0 = f_alloc + N
    f_sw = f_n0 + N
    f_cw = f_sw + N
    f_n1 = f_cw + N
    f_sr = f_n1 + N
    f_cr = f_sr + R * N
    f_fw = f_cr + R * N
    f_bw = f_fw + R * N
    f_kn = f_bw + R * N
    f_tmp = f_kn + R + 1
    f_gM = f_tmp + S
    f_gL = f_gM + N * W
    f_gwr = f_gL + N * N
    f_gww = f_gwr + R * N
    f_gu = f_gww + N
    f_gc = f_gu + N
    f_gsa = f_gc + N
    f_giv = f_gsa + N
    f_gn = f_giv + I
    end = f_gn + N
    return (f_iv, f_psi, f_pre, f_prefix, f_alloc, f_n0, f_sw, f_cw, f_n1, f_sr, f_cr, f_fw, f_bw, f_kn, f_tmp,
            f_gM, f_gL, f_gwr, f_gww, f_gu, f_gc, f_gsa, f_giv, f_gn, end)


def scratch_size(N, W, R, I, S):
    """Floats of scratch one row needs."""
    return scratch_layout(N, W, R, I, S)[-1]


# the packed row's and the interface's offsets, the scalar helpers, the content lookup and the row norms with
# their gradients are the CPU kernels' own Python bodies, compiled for the device
_offsets = cuda.jit(device=True)(KD._offsets_py)
_iface_offsets = cuda.jit(device=True)(KD._iface_offsets_py)
_layout = cuda.jit(device=True)(scratch_layout)
_sigm = cuda.jit(device=True)(KD._sigm.py_func)
_softplus = cuda.jit(device=True)(KD._softplus.py_func)
_row_norms = cuda.jit(device=True)(KD._row_norms.py_func)
_content_fwd = cuda.jit(device=True)(KD._content_fwd.py_func)
_content_bwd = cuda.jit(device=True)(KD._content_bwd.py_func)
_norms_bwd = cuda.jit(device=True)(KD._norms_bwd.py_func)


@cuda.jit
def dnc_memory(state, xi, g, N, W, R, eps, out, grad, scratch, phis):
    """The memory step of every row of ``state`` (B, S) under the raw interface ``xi`` (B, I); ``grad`` False:
    the next packed state into ``out`` (B, S); True: [d state | d xi] into ``out`` (B, S + I) given ``g``."""
    S, I = state.shape[1], xi.shape[1]
    oM, ou, oL, op, owr, oww, orv = _offsets(N, W, R)
    (f_iv, f_psi, f_pre, f_prefix, f_alloc, f_n0, f_sw, f_cw, f_n1, f_sr, f_cr, f_fw, f_bw, f_kn, f_tmp,
     f_gM, f_gL, f_gwr, f_gww, f_gu, f_gc, f_gsa, f_giv, f_gn, _end) = _layout(N, W, R, I, S)
    o_br, o_kw, o_bw, o_e, o_v, o_f, o_ga, o_gw, o_pi = _iface_offsets(R, W)
    for b in range(cuda.grid(1), state.shape[0], cuda.gridsize(1)):
        s = state[b]
        x = xi[b]
        z = scratch[b]          # this row's scratch: z[f_iv + k] is iv[k], and so on
        phi = phis[b]
        if grad:
            o = z
            oo = f_tmp
        else:
            o = out[b]
            oo = 0
        for k in range(I):
            z[f_iv + k] = x[k]
        for i in range(R):
            z[f_iv + o_br + i] = 1.0 + _softplus(x[o_br + i])
            z[f_iv + o_f + i] = _sigm(x[o_f + i])
            mx = max(x[o_pi + 3 * i], max(x[o_pi + 3 * i + 1], x[o_pi + 3 * i + 2]))
            t = 0.0
            for m in range(3):
                z[f_iv + o_pi + 3 * i + m] = math.exp(x[o_pi + 3 * i + m] - mx)
                t += z[f_iv + o_pi + 3 * i + m]
            for m in range(3):
                z[f_iv + o_pi + 3 * i + m] /= t
        z[f_iv + o_bw] = 1.0 + _softplus(x[o_bw])
        for k in range(W):
            z[f_iv + o_e + k] = _sigm(x[o_e + k])
        z[f_iv + o_ga] = _sigm(x[o_ga])
        z[f_iv + o_gw] = _sigm(x[o_gw])
        ga = z[f_iv + o_ga]
        gw = z[f_iv + o_gw]
        # 1. usage: retention by the free gates of last step's reads, then last step's write
        for n in range(N):
            p = 1.0
            for i in range(R):
                p *= 1.0 - z[f_iv + o_f + i] * s[owr + i * N + n]
            z[f_psi + n] = p
            z[f_pre + n] = s[ou + n] + s[oww + n] - s[ou + n] * s[oww + n]
            o[oo + ou + n] = z[f_pre + n] * p
        # 2. allocation: stable ascending sort of the usage (insertion sort), exclusive product
        for n in range(N):
            j = n
            while j > 0 and o[oo + ou + phi[j - 1]] > o[oo + ou + n]:
                phi[j] = phi[j - 1]
                j -= 1
            phi[j] = n
        acc = 1.0
        for j in range(N):
            z[f_prefix + j] = acc
            z[f_alloc + phi[j]] = (1.0 - o[oo + ou + phi[j]]) * acc
            acc *= o[oo + ou + phi[j]]
        # 3-4. write weighting from the old memory
        _row_norms(s, oM, N, W, eps, z, f_n0)
        z[f_kn + R] = _content_fwd(s, oM, z, f_n0, z, f_iv + o_kw, z[f_iv + o_bw], eps, z, f_sw, z, f_cw, N, W)
        for n in range(N):
            o[oo + oww + n] = gw * (ga * z[f_alloc + n] + (1.0 - ga) * z[f_cw + n])
        # 5. erase and write
        for n in range(N):
            wn = o[oo + oww + n]
            for k in range(W):
                o[oo + oM + n * W + k] = s[oM + n * W + k] * (1.0 - wn * z[f_iv + o_e + k]) + wn * z[f_iv + o_v + k]
        # 6-7. temporal links and precedence
        tot = 0.0
        for n in range(N):
            tot += o[oo + oww + n]
        for i in range(N):
            for j in range(N):
                if i == j:
                    o[oo + oL + i * N + j] = 0.0
                else:
                    o[oo + oL + i * N + j] = ((1.0 - o[oo + oww + i] - o[oo + oww + j]) * s[oL + i * N + j]
                                              + o[oo + oww + i] * s[op + j])
        for n in range(N):
            o[oo + op + n] = (1.0 - tot) * s[op + n] + o[oo + oww + n]
        # 8-10. read weightings: backward, content, forward
        _row_norms(o, oo + oM, N, W, eps, z, f_n1)
        for r in range(R):
            z[f_kn + r] = _content_fwd(o, oo + oM, z, f_n1, z, f_iv + r * W, z[f_iv + o_br + r], eps, z,
                                       f_sr + r * N, z, f_cr + r * N, N, W)
            for i in range(N):
                fsum = 0.0
                bsum = 0.0
                for j in range(N):
                    fsum += o[oo + oL + i * N + j] * s[owr + r * N + j]
                    bsum += s[owr + r * N + j] * o[oo + oL + j * N + i]
                z[f_fw + r * N + i] = fsum
                z[f_bw + r * N + i] = bsum
            for n in range(N):
                o[oo + owr + r * N + n] = (z[f_iv + o_pi + 3 * r] * z[f_bw + r * N + n]
                                           + z[f_iv + o_pi + 3 * r + 1] * z[f_cr + r * N + n]
                                           + z[f_iv + o_pi + 3 * r + 2] * z[f_fw + r * N + n])
        # 11. read vectors
        for r in range(R):
            for k in range(W):
                t = 0.0
                for n in range(N):
                    t += o[oo + owr + r * N + n] * o[oo + oM + n * W + k]
                o[oo + orv + r * W + k] = t
        if not grad:
            continue
        gb = g[b]
        gs = out[b]             # gs[:S] is d state, gs[S:] d xi
        for k in range(S):
            gs[k] = 0.0
        for k in range(I):
            z[f_giv + k] = 0.0
        for n in range(N):
            for k in range(W):
                z[f_gM + n * W + k] = gb[oM + n * W + k]
            for j in range(N):
                z[f_gL + n * N + j] = gb[oL + n * N + j]
            z[f_gww + n] = gb[oww + n]
            z[f_gu + n] = gb[ou + n]
        for r in range(R):
            for n in range(N):
                z[f_gwr + r * N + n] = gb[owr + r * N + n]
        # 11. read vectors r = wr M
        for r in range(R):
            for n in range(N):
                t = 0.0
                for k in range(W):
                    gr = gb[orv + r * W + k]
                    t += gr * o[oo + oM + n * W + k]
                    z[f_gM + n * W + k] += o[oo + owr + r * N + n] * gr
                z[f_gwr + r * N + n] += t
        # 10-8. read modes, content lookups, forward/backward weightings
        for n in range(N):
            z[f_gn + n] = 0.0
        for r in range(R):
            p0 = z[f_iv + o_pi + 3 * r]
            p1 = z[f_iv + o_pi + 3 * r + 1]
            p2 = z[f_iv + o_pi + 3 * r + 2]
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            for n in range(N):
                gwrn = z[f_gwr + r * N + n]
                a0 += gwrn * z[f_bw + r * N + n]
                a1 += gwrn * z[f_cr + r * N + n]
                a2 += gwrn * z[f_fw + r * N + n]
                z[f_gc + n] = p1 * gwrn
            z[f_giv + o_pi + 3 * r] += a0
            z[f_giv + o_pi + 3 * r + 1] += a1
            z[f_giv + o_pi + 3 * r + 2] += a2
            z[f_giv + o_br + r] += _content_bwd(o, oo + oM, z, f_n1, z, f_iv + r * W, z[f_iv + o_br + r], eps,
                                                z[f_kn + r], z, f_sr + r * N, z, f_cr + r * N, z, f_gc, z, f_gM,
                                                z, f_gn, z, f_giv + r * W, N, W)
            # f_i = sum_j L_ij wr0_j ; b_j = sum_i wr0_i L_ij
            for i in range(N):
                gf = p2 * z[f_gwr + r * N + i]
                gbk = p0 * z[f_gwr + r * N + i]
                for j in range(N):
                    z[f_gL + i * N + j] += gf * s[owr + r * N + j]
                    gs[owr + r * N + j] += gf * o[oo + oL + i * N + j]
                    z[f_gL + j * N + i] += s[owr + r * N + j] * gbk
                    gs[owr + r * N + j] += gbk * o[oo + oL + j * N + i]
        _norms_bwd(o, oo + oM, z, f_n1, z, f_gn, z, f_gM, N, W)
        # 7. precedence p = (1 - sum ww) p0 + ww
        tot = 0.0
        gtot = 0.0
        for n in range(N):
            tot += o[oo + oww + n]
        for n in range(N):
            gp = gb[op + n]
            gs[op + n] = (1.0 - tot) * gp
            gtot -= gp * s[op + n]
            z[f_gww + n] += gp
        for n in range(N):
            z[f_gww + n] += gtot
        # 6. links L_ij = (1 - ww_i - ww_j) L0_ij + ww_i p0_j, i != j
        for i in range(N):
            for j in range(N):
                if i == j:
                    gs[oL + i * N + j] = 0.0
                    continue
                gl = z[f_gL + i * N + j]
                l0 = s[oL + i * N + j]
                gs[oL + i * N + j] = (1.0 - o[oo + oww + i] - o[oo + oww + j]) * gl
                z[f_gww + i] += gl * (s[op + j] - l0)
                z[f_gww + j] -= gl * l0
                gs[op + j] += gl * o[oo + oww + i]
        # 5. memory M = M0 (1 - ww e) + ww v
        for n in range(N):
            wn = o[oo + oww + n]
            for k in range(W):
                gm = z[f_gM + n * W + k]
                e = z[f_iv + o_e + k]
                m0 = s[oM + n * W + k]
                gs[oM + n * W + k] += gm * (1.0 - wn * e)
                z[f_gww + n] += gm * (z[f_iv + o_v + k] - m0 * e)
                z[f_giv + o_e + k] -= gm * m0 * wn
                z[f_giv + o_v + k] += gm * wn
        # 4. ww = gw (ga a + (1 - ga) cw)
        ga = z[f_iv + o_ga]
        gwt = z[f_iv + o_gw]
        for n in range(N):
            gwwn = z[f_gww + n]
            z[f_giv + o_gw] += gwwn * (ga * z[f_alloc + n] + (1.0 - ga) * z[f_cw + n])
            z[f_giv + o_ga] += gwwn * gwt * (z[f_alloc + n] - z[f_cw + n])
            z[f_gc + n] = gwwn * gwt * (1.0 - ga)
            z[f_gsa + n] = gwwn * gwt * ga
        # 3. write content lookup on the old memory
        for n in range(N):
            z[f_gn + n] = 0.0
        z[f_giv + o_bw] += _content_bwd(s, oM, z, f_n0, z, f_iv + o_kw, z[f_iv + o_bw], eps, z[f_kn + R], z, f_sw,
                                        z, f_cw, z, f_gc, gs, oM, z, f_gn, z, f_giv + o_kw, N, W)
        _norms_bwd(s, oM, z, f_n0, z, f_gn, gs, oM, N, W)
        # 2. allocation (see the CPU kernel): d/d su_j = P_j (Q_j - gsa_j), Q_j = c_{j+1} + su_{j+1} Q_{j+1}
        q = 0.0
        for jj in range(N):
            j = N - 1 - jj
            n = phi[j]
            su = o[oo + ou + n]
            z[f_gu + n] += z[f_prefix + j] * (q - z[f_gsa + n])
            q = z[f_gsa + n] * (1.0 - su) + su * q
        # 1. usage u = pre * psi, pre = u0 + ww0 - u0 ww0, psi = prod_i (1 - f_i wr0_i)
        for n in range(N):
            gpre = z[f_gu + n] * z[f_psi + n]
            gpsi = z[f_gu + n] * z[f_pre + n]
            gs[ou + n] = gpre * (1.0 - s[oww + n])
            gs[oww + n] = gpre * (1.0 - s[ou + n])
            for i in range(R):
                rest = 1.0
                for m in range(R):
                    if m != i:
                        rest *= 1.0 - z[f_iv + o_f + m] * s[owr + m * N + n]
                gq = gpsi * rest
                z[f_giv + o_f + i] -= gq * s[owr + i * N + n]
                gs[owr + i * N + n] -= gq * z[f_iv + o_f + i]
        # the interface's nonlinearities
        for k in range(I):
            gs[S + k] = z[f_giv + k]
        for i in range(R):
            gs[S + o_br + i] = z[f_giv + o_br + i] * _sigm(x[o_br + i])
            fi = z[f_iv + o_f + i]
            gs[S + o_f + i] = z[f_giv + o_f + i] * fi * (1.0 - fi)
            t = 0.0
            for m in range(3):
                t += z[f_iv + o_pi + 3 * i + m] * z[f_giv + o_pi + 3 * i + m]
            for m in range(3):
                gs[S + o_pi + 3 * i + m] = z[f_iv + o_pi + 3 * i + m] * (z[f_giv + o_pi + 3 * i + m] - t)
        gs[S + o_bw] = z[f_giv + o_bw] * _sigm(x[o_bw])
        for k in range(W):
            e = z[f_iv + o_e + k]
            gs[S + o_e + k] = z[f_giv + o_e + k] * e * (1.0 - e)
        gs[S + o_ga] = z[f_giv + o_ga] * ga * (1.0 - ga)
        gs[S + o_gw] = z[f_giv + o_gw] * gwt * (1.0 - gwt)
