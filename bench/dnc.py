"""DNC benchmark: jitnet vs the same DNC written in PyTorch (CPU, same run, same sizes, batch and threads).

    JITNET_CACHE_DIR=... python bench/dnc.py [--threads 2] [--repeats 15] [--composed]
                                             [--train-steps 3000]     # also train copy and report bit error

Both models are the DNC of ``jitnet/models/dnc.py``: an LSTM controller (gates i, f, g, o), one write head and
R read heads, the interface layout R*W + 3W + 5R + 3, allocation by sorting usage with an exclusive cumprod,
the temporal link matrix with a zero diagonal, and outputs from [h_t, r_t]. The PyTorch model starts from
jitnet's weights and its logits are checked against jitnet's before anything is timed.

Timed (median of ``--repeats`` runs in alternating blocks after warm-up, see ``bench/_util.compare``; per
batch and per sequence):

* fwd+bwd: forward over the padded copy-task sequence, masked sigmoid cross-entropy, backward (gradients of
  every parameter). jitnet: one ``jitnet.jit`` function (the time loop a ``jn.scan``, the memory step the fused
  kernel); PyTorch: eager autograd. ratio = PyTorch time / jitnet time (goal >= 2).
* train step: the same plus global-norm clipping and an Adam update (jitnet's whole step is one jitted function).
* jitnet eager fwd+bwd, and with ``--composed`` the jitted step with the memory step as separate jitnet ops
  (a slow first compile), for the record.

With ``--train-steps N`` the jitnet copy model is trained for N steps on lengths 1..max_len and its bit error
is reported per length (goal < 1% within the training range).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def torch_dnc(torch, net):
    """Return a PyTorch module computing the same function as jitnet DNC ``net``, with a copy of its weights."""
    F = torch.nn.functional
    X, H = net.input_size, net.hidden_size
    N, W, R = net.memory_size, net.word_size, net.num_reads
    eps = 1e-6

    def param(t):
        return torch.nn.Parameter(torch.tensor(t.numpy().copy()))

    class DNC(torch.nn.Module):
        def __init__(self):
            super().__init__()
            c = net.controller
            self.W_ih, self.W_hh, self.b = param(c.W_ih), param(c.W_hh), param(c.b)
            self.W_xi, self.b_xi = param(net.interface.W), param(net.interface.b)
            self.W_y, self.b_y = param(net.output.W), param(net.output.b)
            self.register_buffer("off_diag", 1.0 - torch.eye(N))

        @staticmethod
        def content(mem, keys, beta):
            dot = keys @ mem.transpose(1, 2)
            mn = torch.sqrt((mem * mem).sum(-1) + eps)
            kn = torch.sqrt((keys * keys).sum(-1) + eps)
            return torch.softmax(dot / (kn[:, :, None] * mn[:, None, :] + eps) * beta[:, :, None], dim=-1)

        def forward(self, x):
            B, T, _ = x.shape
            z = x.new_zeros
            h, c = z(B, H), z(B, H)
            M, u, L, p, wr, ww, r = z(B, N, W), z(B, N), z(B, N, N), z(B, N), z(B, R, N), z(B, N), z(B, R * W)
            xw = x @ self.W_ih[:X]
            w_read = self.W_ih[X:]
            ones = z(B, 1) + 1.0
            outs = []
            for t in range(T):
                g = xw[:, t] + r @ w_read + h @ self.W_hh + self.b
                i_, f_, g_, o_ = g.chunk(4, 1)
                c = torch.sigmoid(f_) * c + torch.sigmoid(i_) * torch.tanh(g_)
                h = torch.sigmoid(o_) * torch.tanh(c)
                xi = h @ self.W_xi + self.b_xi
                kr, br, kw, bw, e, v, fg, ga, gw, pi = torch.split(xi, [R * W, R, W, 1, W, W, R, 1, 1, 3 * R], 1)
                kr, br = kr.reshape(B, R, W), 1 + F.softplus(br)
                kw, bw = kw.reshape(B, 1, W), 1 + F.softplus(bw)
                e, fg, ga, gw = torch.sigmoid(e), torch.sigmoid(fg), torch.sigmoid(ga), torch.sigmoid(gw)
                pi = torch.softmax(pi.reshape(B, R, 3), -1)
                u = (u + ww - u * ww) * torch.prod(1 - fg[:, :, None] * wr, 1)
                su, phi = torch.sort(u, dim=-1, stable=True)
                sa = (1 - su) * torch.cumprod(torch.cat([ones, su[:, :-1]], 1), 1)
                a = torch.zeros_like(sa).scatter(1, phi, sa)
                cw = self.content(M, kw, bw)[:, 0]
                ww = gw * (ga * a + (1 - ga) * cw)
                M = M * (1 - ww[:, :, None] * e[:, None, :]) + ww[:, :, None] * v[:, None, :]
                L = ((1 - ww[:, :, None] - ww[:, None, :]) * L + ww[:, :, None] * p[:, None, :]) * self.off_diag
                p = (1 - ww.sum(1, keepdim=True)) * p + ww
                fwd, bwd = wr @ L.transpose(1, 2), wr @ L
                wr = pi[:, :, 0:1] * bwd + pi[:, :, 1:2] * self.content(M, kr, br) + pi[:, :, 2:3] * fwd
                r = (wr @ M).reshape(B, R * W)
                outs.append(torch.cat([h, r], 1))
            return torch.stack(outs, 1) @ self.W_y + self.b_y

    return DNC()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--memory-size", type=int, default=16)
    ap.add_argument("--word-size", type=int, default=16)
    ap.add_argument("--reads", type=int, default=4)
    ap.add_argument("--bits", type=int, default=6)
    ap.add_argument("--max-len", type=int, default=10, help="copy lengths 1..max_len, padded to 2*max_len+1 steps")
    ap.add_argument("--composed", action="store_true", help="also time the jitted step with the composed memory step")
    ap.add_argument("--train-steps", type=int, default=0, help="then train copy for N steps and report bit error")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    from _util import set_blas_threads_env
    set_blas_threads_env(args.threads)

    import numpy as np
    import torch

    import jitnet as jn
    from jitnet.models import dnc as D
    from _util import dump, set_threads, table

    set_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    except ImportError:
        pass

    from _util import compare as alternate

    B, T = args.batch, 2 * args.max_len + 1
    sizes = f"B{B} T{T} H{args.hidden} N{args.memory_size} W{args.word_size} R{args.reads}"
    rng = np.random.default_rng(0)
    jn.random.seed(0)
    model = D.CopyModel(args.bits, args.hidden, args.memory_size, args.word_size, args.reads, lr=1e-3)
    net = model.net
    x, y, mask = D.copy_batch(rng, B, 1, args.max_len, args.bits)
    xj, yj, mj = jn.tensor(x), jn.tensor(y), jn.tensor(mask)
    xt, yt, mt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)

    tnet = torch_dnc(torch, net)
    with torch.no_grad(), jn.no_grad():
        diff = float(np.abs(tnet(xt).numpy() - net(xj).numpy()).max())
    print(f"PyTorch peer vs jitnet logits: max abs difference {diff:.2e} ({sizes})", flush=True)
    if diff > 1e-3:
        raise SystemExit("the PyTorch peer does not compute the same function")

    def t_loss():
        logits = tnet(xt)
        per = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="none")
        return (per * mt[..., None]).sum() / (mt.sum() * yt.shape[-1])

    def t_fwd_bwd():
        tnet.zero_grad(set_to_none=True)
        t_loss().backward()

    topt = torch.optim.Adam(tnet.parameters(), lr=1e-3)

    def t_step():
        topt.zero_grad(set_to_none=True)
        t_loss().backward()
        torch.nn.utils.clip_grad_norm_(tnet.parameters(), 10.0)
        topt.step()

    params = net.parameters()

    def j_fwd_bwd_fn(x, y, mask):
        for p in params:
            p.grad = None
        loss = model.loss(x, y, mask)
        loss.backward()
        return loss

    j_fwd_bwd = jn.jit(j_fwd_bwd_fn)
    rows = []

    def row(name, tj, tt):
        rows.append({"case": name, "sizes": sizes, "jitnet_ms": tj * 1e3, "torch_ms": tt * 1e3,
                     "jitnet_ms_per_seq": tj * 1e3 / B, "torch_ms_per_seq": tt * 1e3 / B, "ratio": tt / tj})

    t0 = time.perf_counter()
    j_fwd_bwd(xj, yj, mj)
    print(f"jitnet fwd+bwd: first call (trace + compile or cache load) {time.perf_counter() - t0:.1f} s", flush=True)
    tj, tt = alternate(lambda: j_fwd_bwd(xj, yj, mj), t_fwd_bwd, args.repeats)
    row("fwd+bwd, jitted (fused memory step)", tj, tt)
    t0 = time.perf_counter()
    model.train_step(xj, yj, mj)
    print(f"jitnet train step: first call {time.perf_counter() - t0:.1f} s", flush=True)
    tj, tt = alternate(lambda: model.train_step(xj, yj, mj), t_step, args.repeats)
    row("train step (+clip, Adam), jitted", tj, tt)
    tj, tt = alternate(lambda: j_fwd_bwd_fn(xj, yj, mj), t_fwd_bwd, max(3, args.repeats // 3))
    row("fwd+bwd, eager (fused memory step)", tj, tt)
    if args.composed:
        jn.random.seed(0)
        cm = D.CopyModel(args.bits, args.hidden, args.memory_size, args.word_size, args.reads, fused=False)
        cparams = cm.net.parameters()

        def c_fn(x, y, mask):
            for p in cparams:
                p.grad = None
            loss = cm.loss(x, y, mask)
            loss.backward()
            return loss
        cj = jn.jit(c_fn)
        t0 = time.perf_counter()
        cj(xj, yj, mj)
        print(f"jitnet composed fwd+bwd: first call {time.perf_counter() - t0:.1f} s", flush=True)
        tj, tt = alternate(lambda: cj(xj, yj, mj), t_fwd_bwd, args.repeats)
        row("fwd+bwd, jitted (composed memory step)", tj, tt)
    table(rows, title=f"DNC forward+backward, jitnet vs PyTorch CPU ({args.threads} threads; ratio = torch/jitnet)")

    if args.train_steps:
        trng = np.random.default_rng(1)
        jn.random.seed(1)
        cm = D.CopyModel(args.bits, args.hidden, args.memory_size, args.word_size, args.reads, lr=1e-3)
        t0 = time.perf_counter()
        losses = []
        for s in range(args.train_steps):
            losses.append(float(cm.train_step(*cm.batch(trng, B, 1, args.max_len, length=T)).item()))
            if (s + 1) % 500 == 0:
                print(f"copy step {s + 1}: loss {np.mean(losses[-100:]):.4f} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
        errs = cm.evaluate(np.random.default_rng(2), range(1, args.max_len + 1), B, 8, length=T)
        worst = max(errs.values())
        print("copy bit error by length: " + ", ".join(f"{L}: {e:.2%}" for L, e in errs.items()))
        print(f"RESULT copy: {args.train_steps} steps in {time.perf_counter() - t0:.0f} s, mean bit error "
              f"{np.mean(list(errs.values())):.3%}, worst {worst:.3%} over lengths 1-{args.max_len} "
              f"(goal < 1%: {'met' if worst < 0.01 else 'NOT met'})", flush=True)
        rows.append({"case": "copy bit error", "steps": args.train_steps, "worst": worst,
                     "by_length": {int(k): v for k, v in errs.items()}})
    dump(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
