"""The DNC memory step's CPU kernels (Numba): the forward step and its gradient over a packed state.

A packed row of one example: memory (N*W) | usage (N) | link (N*N) | precedence (N) | read weights (R*N) |
write weights (N) | read vectors (R*W). The interface stays raw (B, R*W + 3W + 5R + 3): the kernels apply its
nonlinearities themselves. The rows (``dnc_memory_step`` and its gradient) and the equations written with
jitnet ops live in :mod:`jitnet.nn.dnc_memory`; the CUDA form of these kernels is :mod:`jitnet.kernels_dnc_gpu`.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["offsets", "dnc_memory_forward", "dnc_memory_backward"]


def _offsets_py(N, W, R):
    """Start of each part of a packed row: memory, usage, link, precedence, read weights, write weights, reads."""
    oM = 0
    ou = oM + N * W
    oL = ou + N
    op = oL + N * N
    owr = op + N
    oww = owr + R * N
    orv = oww + N
    return oM, ou, oL, op, owr, oww, orv


_offsets = njit(cache=True, no_cpython_wrapper=True)(_offsets_py)


@njit(cache=True, no_cpython_wrapper=True, error_model="numpy")
def _sigm(x):
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


@njit(cache=True, no_cpython_wrapper=True, error_model="numpy")
def _softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _iface_offsets_py(R, W):
    """Start of each part of the raw interface after its R read keys (R*W): read strengths, write key, write
    strength, erase vector, write vector, free gates, allocation gate, write gate, read modes (3 per read)."""
    o_br = R * W
    o_kw = o_br + R
    o_bw = o_kw + W
    o_e = o_bw + 1
    o_v = o_e + W
    o_f = o_v + W
    o_ga = o_f + R
    o_gw = o_ga + 1
    o_pi = o_gw + 1
    return o_br, o_kw, o_bw, o_e, o_v, o_f, o_ga, o_gw, o_pi


_iface_offsets = njit(cache=True, no_cpython_wrapper=True)(_iface_offsets_py)

# The content lookup and the memory rows' norms, with their gradients: plain bodies that kernels_dnc_gpu compiles
# for the device too. Every array comes with an offset (an (N, W) memory starting at om has row n at
# mem[om + n*W:om + (n+1)*W]), as device code that slices its scratch out of one row needs; the inner loops run
# over views of one row each, so that the CPU's loops index from 0 and vectorize.


@njit(cache=True, no_cpython_wrapper=True, error_model="numpy")
def _row_norms(mem, om, N, W, eps, norms, on):
    """norms[on + n] = sqrt(sum_k mem[om + n*W + k]^2 + eps)."""
    for n in range(N):
        m = mem[om + n * W:om + (n + 1) * W]
        sq = 0.0
        for k in range(W):
            sq += m[k] * m[k]
        norms[on + n] = math.sqrt(sq + eps)


@njit(cache=True, no_cpython_wrapper=True, error_model="numpy")
def _content_fwd(mem, om, norms, on, key, ok, beta, eps, sim, osim, w, ow, N, W):
    """Cosine similarities and softmax weights of one key over an (N, W) memory with row norms ``norms``;
    return the key's norm."""
    kv = key[ok:ok + W]
    kn = 0.0
    for k in range(W):
        kn += kv[k] * kv[k]
    kn = math.sqrt(kn + eps)
    mx = -math.inf
    for n in range(N):
        m = mem[om + n * W:om + (n + 1) * W]
        dot = 0.0
        for k in range(W):
            dot += m[k] * kv[k]
        sim[osim + n] = dot / (kn * norms[on + n] + eps)
        mx = max(mx, beta * sim[osim + n])
    tot = 0.0
    for n in range(N):
        w[ow + n] = math.exp(beta * sim[osim + n] - mx)
        tot += w[ow + n]
    for n in range(N):
        w[ow + n] /= tot
    return kn


@njit(cache=True, no_cpython_wrapper=True, error_model="numpy")
def _content_bwd(mem, om, norms, on, key, ok, beta, eps, kn, sim, osim, w, ow, gw, ogw, gmem, ogm, gnorms, ogn,
                 gkey, ogk, N, W):
    """Accumulate the gradients of the content weights ``w`` (given ``gw``) into gmem, gnorms (the row norms'
    gradient, applied to gmem by :func:`_norms_bwd`) and gkey; return gbeta."""
    kv = key[ok:ok + W]
    gk = gkey[ogk:ogk + W]
    s = 0.0
    for n in range(N):
        s += gw[ogw + n] * w[ow + n]
    gbeta = 0.0
    gkn = 0.0
    for n in range(N):
        gz = w[ow + n] * (gw[ogw + n] - s)
        gbeta += gz * sim[osim + n]
        gsim = gz * beta
        den = kn * norms[on + n] + eps
        gdot = gsim / den
        gden = -gsim * sim[osim + n] / den
        gkn += gden * norms[on + n]
        gnorms[ogn + n] += gden * kn
        m = mem[om + n * W:om + (n + 1) * W]
        gm = gmem[ogm + n * W:ogm + (n + 1) * W]
        for k in range(W):
            gk[k] += gdot * m[k]
            gm[k] += gdot * kv[k]
    for k in range(W):
        gk[k] += gkn * kv[k] / kn
    return gbeta


@njit(cache=True, no_cpython_wrapper=True, error_model="numpy")
def _norms_bwd(mem, om, norms, on, gnorms, ogn, gmem, ogm, N, W):
    """Add the row norms' gradient ``gnorms`` to gmem (d norm_n / d mem[n, k] = mem[n, k] / norm_n)."""
    for n in range(N):
        c = gnorms[ogn + n] / norms[on + n]
        m = mem[om + n * W:om + (n + 1) * W]
        gm = gmem[ogm + n * W:ogm + (n + 1) * W]
        for k in range(W):
            gm[k] += c * m[k]


@njit(cache=True, error_model="numpy")
def _memory_kernel(state, xi, g, N, W, R, eps, out, grad):
    """The memory step of every row of ``state`` (B, S) under the raw interface ``xi`` (B, I).

    ``grad`` False: write the next packed state into ``out`` (B, S). ``grad`` True: recompute the step and write
    [d(loss)/d(state) | d(loss)/d(xi)] into ``out`` (B, S + I) given ``g`` = d(loss)/d(next state). One function
    does both so that the step's code is compiled once.
    """
    dt = state.dtype
    S, I = state.shape[1], xi.shape[1]
    oM, ou, oL, op, owr, oww, orv = _offsets(N, W, R)
    o_br, o_kw, o_bw, o_e, o_v, o_f, o_ga, o_gw, o_pi = _iface_offsets(R, W)
    # scratch: the interface after its nonlinearities, usage and allocation, content lookups, link weightings
    iv = np.empty(I, dt)
    psi, pre, prefix, alloc = np.empty(N, dt), np.empty(N, dt), np.empty(N, dt), np.empty(N, dt)
    phi = np.empty(N, np.int64)
    n0, sw, cw = np.empty(N, dt), np.empty(N, dt), np.empty(N, dt)
    n1, sr, cr = np.empty(N, dt), np.empty((R, N), dt), np.empty((R, N), dt)
    fw, bw = np.empty((R, N), dt), np.empty((R, N), dt)
    kn = np.empty(R + 1, dt)
    tmp = np.empty(S, dt)
    # gradients of the new memory, links, read weights, write weights, usage; of content and allocation weights
    gM = np.empty((N, W), dt)
    gMf = gM.reshape(N * W)  # (the same, flat: the content lookup's gradient takes flat arrays)
    gL = np.empty((N, N), dt)
    gwr = np.empty((R, N), dt)
    gww = np.empty(N, dt)
    gu = np.empty(N, dt)
    gc = np.empty(N, dt)
    gsa = np.empty(N, dt)
    giv = np.empty(I, dt)    # gradient of the interface after its nonlinearities
    gn = np.empty(N, dt)     # gradient of the memory rows' norms
    for b in range(state.shape[0]):
        s = state[b]
        x = xi[b]
        o = tmp if grad else out[b]
        for k in range(x.shape[0]):
            iv[k] = x[k]
        for i in range(R):
            iv[o_br + i] = 1.0 + _softplus(x[o_br + i])
            iv[o_f + i] = _sigm(x[o_f + i])
            mx = max(x[o_pi + 3 * i], max(x[o_pi + 3 * i + 1], x[o_pi + 3 * i + 2]))
            t = 0.0
            for m in range(3):
                iv[o_pi + 3 * i + m] = math.exp(x[o_pi + 3 * i + m] - mx)
                t += iv[o_pi + 3 * i + m]
            for m in range(3):
                iv[o_pi + 3 * i + m] /= t
        iv[o_bw] = 1.0 + _softplus(x[o_bw])
        for k in range(W):
            iv[o_e + k] = _sigm(x[o_e + k])
        ga = iv[o_ga] = _sigm(x[o_ga])
        gw = iv[o_gw] = _sigm(x[o_gw])
        M0 = s[oM:ou].reshape((N, W))
        M = o[oM:ou].reshape((N, W))
        L0 = s[oL:op].reshape((N, N))
        L = o[oL:op].reshape((N, N))
        wr0 = s[owr:oww].reshape((R, N))
        wr = o[owr:oww].reshape((R, N))
        u = o[ou:oL]
        ww = o[oww:orv]
        # 1. usage: retention by the free gates of last step's reads, then last step's write
        for n in range(N):
            p = 1.0
            for i in range(R):
                p *= 1.0 - iv[o_f + i] * wr0[i, n]
            psi[n] = p
            pre[n] = s[ou + n] + s[oww + n] - s[ou + n] * s[oww + n]
            u[n] = pre[n] * p
        # 2. allocation: stable ascending sort of the usage (insertion sort), exclusive product
        for n in range(N):
            j = n
            while j > 0 and u[phi[j - 1]] > u[n]:
                phi[j] = phi[j - 1]
                j -= 1
            phi[j] = n
        acc = 1.0
        for j in range(N):
            prefix[j] = acc
            alloc[phi[j]] = (1.0 - u[phi[j]]) * acc
            acc *= u[phi[j]]
        # 3-4. write weighting from the old memory
        _row_norms(s, oM, N, W, eps, n0, 0)
        kn[R] = _content_fwd(s, oM, n0, 0, iv, o_kw, iv[o_bw], eps, sw, 0, cw, 0, N, W)
        for n in range(N):
            ww[n] = gw * (ga * alloc[n] + (1.0 - ga) * cw[n])
        # 5. erase and write
        for n in range(N):
            for k in range(W):
                M[n, k] = M0[n, k] * (1.0 - ww[n] * iv[o_e + k]) + ww[n] * iv[o_v + k]
        # 6-7. temporal links and precedence
        tot = 0.0
        for n in range(N):
            tot += ww[n]
        for i in range(N):
            for j in range(N):
                L[i, j] = 0.0 if i == j else (1.0 - ww[i] - ww[j]) * L0[i, j] + ww[i] * s[op + j]
        for n in range(N):
            o[op + n] = (1.0 - tot) * s[op + n] + ww[n]
        # 8-10. read weightings: backward, content, forward
        _row_norms(o, oM, N, W, eps, n1, 0)
        for r in range(R):
            kn[r] = _content_fwd(o, oM, n1, 0, iv, r * W, iv[o_br + r], eps, sr[r], 0, cr[r], 0, N, W)
            for i in range(N):
                fsum = 0.0
                bsum = 0.0
                for j in range(N):
                    fsum += L[i, j] * wr0[r, j]
                    bsum += wr0[r, j] * L[j, i]
                fw[r, i] = fsum
                bw[r, i] = bsum
            for n in range(N):
                wr[r, n] = (iv[o_pi + 3 * r] * bw[r, n] + iv[o_pi + 3 * r + 1] * cr[r, n]
                            + iv[o_pi + 3 * r + 2] * fw[r, n])
        # 11. read vectors
        for r in range(R):
            for k in range(W):
                t = 0.0
                for n in range(N):
                    t += wr[r, n] * M[n, k]
                o[orv + r * W + k] = t
        if not grad:
            continue
        gb = g[b]
        gs = out[b, :S]
        gs[:] = 0.0
        giv[:] = 0.0
        gM0 = gs[oM:ou].reshape((N, W))
        gL0 = gs[oL:op].reshape((N, N))
        gwr0 = gs[owr:oww].reshape((R, N))
        for n in range(N):
            for k in range(W):
                gM[n, k] = gb[oM + n * W + k]
            for j in range(N):
                gL[n, j] = gb[oL + n * N + j]
            gww[n] = gb[oww + n]
            gu[n] = gb[ou + n]
        for r in range(R):
            for n in range(N):
                gwr[r, n] = gb[owr + r * N + n]
        # 11. read vectors r = wr M
        for r in range(R):
            for n in range(N):
                t = 0.0
                for k in range(W):
                    gr = gb[orv + r * W + k]
                    t += gr * M[n, k]
                    gM[n, k] += wr[r, n] * gr
                gwr[r, n] += t
        # 10-8. read modes, content lookups, forward/backward weightings
        gn[:] = 0.0
        for r in range(R):
            p0, p1, p2 = iv[o_pi + 3 * r], iv[o_pi + 3 * r + 1], iv[o_pi + 3 * r + 2]
            a0 = a1 = a2 = 0.0
            for n in range(N):
                a0 += gwr[r, n] * bw[r, n]
                a1 += gwr[r, n] * cr[r, n]
                a2 += gwr[r, n] * fw[r, n]
                gc[n] = p1 * gwr[r, n]
            giv[o_pi + 3 * r] += a0
            giv[o_pi + 3 * r + 1] += a1
            giv[o_pi + 3 * r + 2] += a2
            giv[o_br + r] += _content_bwd(o, oM, n1, 0, iv, r * W, iv[o_br + r], eps, kn[r], sr[r], 0, cr[r], 0, gc,
                                          0, gMf, 0, gn, 0, giv, r * W, N, W)
            # f_i = sum_j L_ij wr0_j ; b_j = sum_i wr0_i L_ij
            for i in range(N):
                gf = p2 * gwr[r, i]
                gbk = p0 * gwr[r, i]
                for j in range(N):
                    gL[i, j] += gf * wr0[r, j]
                    gwr0[r, j] += gf * L[i, j]
                    gL[j, i] += wr0[r, j] * gbk
                    gwr0[r, j] += gbk * L[j, i]
        _norms_bwd(o, oM, n1, 0, gn, 0, gMf, 0, N, W)
        # 7. precedence p = (1 - sum ww) p0 + ww
        tot = 0.0
        gtot = 0.0
        for n in range(N):
            tot += ww[n]
        for n in range(N):
            gp = gb[op + n]
            gs[op + n] = (1.0 - tot) * gp
            gtot -= gp * s[op + n]
            gww[n] += gp
        for n in range(N):
            gww[n] += gtot
        # 6. links L_ij = (1 - ww_i - ww_j) L0_ij + ww_i p0_j, i != j
        for i in range(N):
            for j in range(N):
                if i == j:
                    gL0[i, j] = 0.0
                    continue
                gl = gL[i, j]
                gL0[i, j] = (1.0 - ww[i] - ww[j]) * gl
                gww[i] += gl * (s[op + j] - L0[i, j])
                gww[j] -= gl * L0[i, j]
                gs[op + j] += gl * ww[i]
        # 5. memory M = M0 (1 - ww e) + ww v
        for n in range(N):
            for k in range(W):
                gm = gM[n, k]
                e = iv[o_e + k]
                gM0[n, k] += gm * (1.0 - ww[n] * e)
                gww[n] += gm * (iv[o_v + k] - M0[n, k] * e)
                giv[o_e + k] -= gm * M0[n, k] * ww[n]
                giv[o_v + k] += gm * ww[n]
        # 4. ww = gw (ga a + (1 - ga) cw)
        ga, gwt = iv[o_ga], iv[o_gw]
        for n in range(N):
            giv[o_gw] += gww[n] * (ga * alloc[n] + (1.0 - ga) * cw[n])
            giv[o_ga] += gww[n] * gwt * (alloc[n] - cw[n])
            gc[n] = gww[n] * gwt * (1.0 - ga)
            gsa[n] = gww[n] * gwt * ga              # gradient of the allocation weighting, by row for now
        # 3. write content lookup on the old memory
        gn[:] = 0.0
        giv[o_bw] += _content_bwd(s, oM, n0, 0, iv, o_kw, iv[o_bw], eps, kn[R], sw, 0, cw, 0, gc, 0, gs, oM, gn, 0,
                                  giv, o_kw, N, W)
        _norms_bwd(s, oM, n0, 0, gn, 0, gs, oM, N, W)
        # 2. allocation: sa_j = (1 - su_j) P_j with P_j = prod_{k<j} su_k; with c_m = gsa_m (1 - su_m) and
        # Q_j = sum_{m>j} c_m prod_{j<k<m} su_k (Q_j = c_{j+1} + su_{j+1} Q_{j+1}): d/d su_j = P_j (Q_j - gsa_j)
        q = 0.0
        for j in range(N - 1, -1, -1):
            n = phi[j]
            su = o[ou + n]
            gu[n] += prefix[j] * (q - gsa[n])
            q = gsa[n] * (1.0 - su) + su * q
        # 1. usage u = pre * psi, pre = u0 + ww0 - u0 ww0, psi = prod_i (1 - f_i wr0_i)
        for n in range(N):
            gpre = gu[n] * psi[n]
            gpsi = gu[n] * pre[n]
            gs[ou + n] = gpre * (1.0 - s[oww + n])
            gs[oww + n] = gpre * (1.0 - s[ou + n])
            for i in range(R):
                rest = 1.0
                for m in range(R):
                    if m != i:
                        rest *= 1.0 - iv[o_f + m] * wr0[m, n]
                gq = gpsi * rest
                giv[o_f + i] -= gq * wr0[i, n]
                gwr0[i, n] -= gq * iv[o_f + i]
        # the interface's nonlinearities
        gx = out[b, S:]
        for k in range(xi.shape[1]):
            gx[k] = giv[k]
        x = xi[b]
        for i in range(R):
            gx[o_br + i] = giv[o_br + i] * _sigm(x[o_br + i])
            fi = iv[o_f + i]
            gx[o_f + i] = giv[o_f + i] * fi * (1.0 - fi)
            t = 0.0
            for m in range(3):
                t += iv[o_pi + 3 * i + m] * giv[o_pi + 3 * i + m]
            for m in range(3):
                gx[o_pi + 3 * i + m] = iv[o_pi + 3 * i + m] * (giv[o_pi + 3 * i + m] - t)
        gx[o_bw] = giv[o_bw] * _sigm(x[o_bw])
        for k in range(W):
            e = iv[o_e + k]
            gx[o_e + k] = giv[o_e + k] * e * (1.0 - e)
        gx[o_ga] = giv[o_ga] * ga * (1.0 - ga)
        gx[o_gw] = giv[o_gw] * gwt * (1.0 - gwt)


def dnc_memory_forward(state, xi, N, W, R, eps, out):
    """Write the next packed memory state of every row of ``state`` (B, S) under the raw interface ``xi`` into
    ``out`` (B, S) (C-contiguous arrays of one float dtype)."""
    _memory_kernel(state, xi, state, N, W, R, eps, out, False)


def dnc_memory_backward(state, xi, g, N, W, R, eps, out):
    """Write [d(loss)/d(state) | d(loss)/d(xi)] into ``out`` (B, S + I) given ``g`` = d(loss)/d(next state),
    recomputing the forward step (nothing but the step's inputs is kept between the passes)."""
    _memory_kernel(state, xi, g, N, W, R, eps, out, True)


offsets = _offsets_py
