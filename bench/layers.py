"""Layer benchmark: jitnet vs PyTorch CPU (same run, same thread count), forward + backward.

    JITNET_CACHE_DIR=... python bench/layers.py [--threads 2] [--repeats 15]

Cases: Conv2d on (128, 64, 12, 12) with 64 5x5 filters ("same" padding, bias), and a one-layer LSTM (batch 32,
50 steps, 256 inputs, 256 hidden, batch-first). Each case is warmed up, then timed in alternating blocks
(jitnet, PyTorch; see bench/_util.compare) and the medians compared; ratio = PyTorch time / jitnet time
(>= goal means met).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--only", choices=["conv", "lstm"], default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _util import set_blas_threads_env
    set_blas_threads_env(args.threads)

    import numpy as np
    import torch
    import jitnet as jn
    from jitnet import nn

    torch.set_num_threads(args.threads)
    jn.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    except ImportError:
        pass

    from _util import compare as timeit

    rows = []
    rs = np.random.default_rng(0)

    if args.only in (None, "conv"):
        xv = rs.normal(size=(128, 64, 12, 12)).astype(np.float32)
        conv = nn.Conv2d(64, 64, 5, padding="same")
        x = jn.tensor(xv, requires_grad=True)
        tconv = torch.nn.Conv2d(64, 64, 5, padding="same")
        with torch.no_grad():
            tconv.weight.copy_(torch.from_numpy(conv.W.numpy()))
            tconv.bias.zero_()
        tx = torch.from_numpy(xv).requires_grad_(True)
        gv = rs.normal(size=(128, 64, 12, 12)).astype(np.float32)
        g, tg = jn.tensor(gv), torch.from_numpy(gv)

        def j_conv():
            conv.zero_grad()
            x.grad = None
            conv(x).backward(g)

        def t_conv():
            tconv.zero_grad()
            tx.grad = None
            tconv(tx).backward(tg)
        j_conv(), t_conv()
        err = np.abs(x.grad.numpy() - tx.grad.numpy()).max() / np.abs(tx.grad.numpy()).max()
        assert err < 1e-4, f"conv gradients disagree with PyTorch (relative error {err:.2e})"
        tj, tt = timeit(j_conv, t_conv, args.repeats)
        rows.append(("Conv2d fwd+bwd (128,64,12,12) 64x5x5 same", tj, tt, 0.7))

        @jn.jit
        def jc(x, g):                   # the same step compiled: the output and the input gradient are returned
            conv.zero_grad()            # (returning y keeps the forward: the gradients alone do not need it)
            y = conv(x)
            y.backward(g)
            return y, x.grad
        np.testing.assert_allclose(jc(x, g)[1].numpy(), x.grad.numpy(), rtol=1e-4, atol=1e-5)
        tj, tt = timeit(lambda: jc(x, g), t_conv, args.repeats)
        rows.append(("Conv2d fwd+bwd, jitted step", tj, tt, 0.7))

    if args.only in (None, "lstm"):
        B, Tn, D, H = 32, 50, 256, 256
        xv = rs.normal(size=(B, Tn, D)).astype(np.float32)
        lstm = nn.LSTM(D, H, forget_bias=0.0)
        tl = torch.nn.LSTM(D, H, batch_first=True)
        cell = lstm.layer_0
        with torch.no_grad():   # torch keeps (4H, in) weights and two biases
            tl.weight_ih_l0.copy_(torch.from_numpy(cell.W_ih.numpy().T.copy()))
            tl.weight_hh_l0.copy_(torch.from_numpy(cell.W_hh.numpy().T.copy()))
            tl.bias_ih_l0.copy_(torch.from_numpy(cell.b.numpy()))
            tl.bias_hh_l0.zero_()
        x, tx = jn.tensor(xv), torch.from_numpy(xv)

        def j_lstm():
            lstm.zero_grad()
            out, _ = lstm(x)
            out.sum().backward()

        def t_lstm():
            tl.zero_grad()
            out, _ = tl(tx)
            out.sum().backward()
        j_lstm(), t_lstm()
        gj, gt = cell.W_hh.grad.numpy(), tl.weight_hh_l0.grad.numpy().T
        err = np.abs(gj - gt).max() / np.abs(gt).max()
        assert err < 1e-3, f"LSTM gradients disagree with PyTorch (relative error {err:.2e})"
        tj, tt = timeit(j_lstm, t_lstm, args.repeats)
        rows.append(("LSTM fwd+bwd B32 T50 256->256", tj, tt, 0.8))

        jl = jn.jit(j_lstm)             # the same step compiled (the layer's lstm_seq is one node of the plan)
        jl()
        np.testing.assert_allclose(cell.W_hh.grad.numpy(), gj, rtol=1e-3, atol=1e-5)
        tj, tt = timeit(jl, t_lstm, args.repeats)
        rows.append(("LSTM fwd+bwd, jitted step", tj, tt, 0.8))

    print(f"threads={args.threads} repeats={args.repeats} torch={torch.__version__} jitnet={jn.__version__}")
    print(f"{'case':<44} {'jitnet ms':>10} {'torch ms':>10} {'ratio':>7} {'goal':>6}  result")
    ok = True
    for name, tj, tt, goal in rows:
        ratio = tt / tj
        met = ratio >= goal
        ok &= met
        print(f"{name:<44} {tj * 1e3:10.2f} {tt * 1e3:10.2f} {ratio:7.2f} {goal:6.2f}  "
              f"{'met' if met else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
