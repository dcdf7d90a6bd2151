"""Mixed precision on the GPU: float16 matmuls read their operands as stored and sum in float32; an MLP step under
``jn.autocast(jn.float16)`` matches the CPU's within float16 tolerance with no transfer inside the step; and
GradScaler's overflow check reads back one boolean per step, never the gradients."""
import numpy as np
import pytest

import jitnet as jn
import jitnet.backend_cuda as G
import jitnet.nn as nn
import jitnet.nn.functional as F

RNG = np.random.default_rng(9)
X = RNG.normal(size=(6, 5)).astype(np.float32)
Y = RNG.integers(0, 3, 6)
F16 = np.dtype(np.float16)


def mlp(dev):
    jn.random.seed(3)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(dev)


def test_float16_matmul_reads_float16_and_rounds_once(monkeypatch):
    a = RNG.normal(size=(5, 6)).astype(np.float16)
    b = RNG.normal(size=(6, 4)).astype(np.float16)
    casts = []
    real = G.cast

    def counting(x, dt):
        casts.append((np.dtype(x.dtype), np.dtype(dt)))
        return real(x, dt)
    monkeypatch.setattr(G, "cast", counting)
    y = jn.tensor(a).to("cuda") @ jn.tensor(b).to("cuda")
    assert y.dtype == F16
    assert casts == [(np.dtype(np.float32), F16)]        # only the float32 product is rounded: no input copies
    ref = (a.astype(np.float32) @ b.astype(np.float32)).astype(np.float16)
    np.testing.assert_allclose(y.cpu().numpy().astype(np.float32), ref.astype(np.float32), rtol=1e-3, atol=1e-3)


def _train(dev, steps, jit, scaler=None):
    m = mlp(dev)
    opt = jn.optim.Adam(m.parameters(), lr=0.05)

    def step(xb, yb):
        opt.zero_grad()
        with jn.autocast(jn.float16):
            out = m(xb)
            loss = F.cross_entropy(out, yb)
        loss.backward()
        opt.step()
        return loss, out

    if jit:
        step = jn.jit(step)
    xb, yb = jn.tensor(X).to(dev), jn.tensor(Y).to(dev)
    losses, stats = [], []
    for _ in range(steps):
        if dev == "cuda":
            jn.cuda.reset_transfer_stats()
        loss, out = step(xb, yb)
        if dev == "cuda":
            stats.append(jn.cuda.transfer_stats())
        losses.append(loss.item())
    return m, losses, stats, out


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_autocast_mlp_step_matches_cpu_without_transfers(jit):
    mc, lc, _, oc = _train("cpu", 3, jit)
    mg, lg, stats, og = _train("cuda", 3, jit)
    assert og.dtype == oc.dtype == F16 and og.is_cuda
    np.testing.assert_allclose(lg, lc, rtol=5e-3, atol=5e-3)
    assert lg[-1] < lg[0]
    for pc, pg in zip(mc.parameters(), mg.parameters()):
        assert pg.is_cuda and pg.dtype == np.float32
        np.testing.assert_allclose(pg.numpy(), pc.numpy(), rtol=2e-2, atol=2e-3)
    for st in stats:
        assert st["h2d"] == 0 and st["d2h"] == 0, st


@pytest.mark.parametrize("poison", [False, True], ids=["finite", "inf"])
def test_grad_scaler_check_reads_back_one_scalar(poison):
    m = mlp("cuda")
    opt = jn.optim.SGD(m.parameters(), lr=0.1)
    sc = jn.optim.GradScaler(init_scale=512.0)
    xb, yb = jn.tensor(X).to("cuda"), jn.tensor(Y).to("cuda")
    before = [p.numpy().copy() for p in m.parameters()]
    with jn.autocast(jn.float16):
        loss = F.cross_entropy(m(xb), yb)
    p = jn.tensor(np.float32(np.inf if poison else 1.0))
    sc.scale(loss * p).backward()
    jn.cuda.reset_transfer_stats()
    sc.step(opt)
    sc.update()
    st = jn.cuda.transfer_stats()
    assert st["d2h"] == 1 and st["d2h_bytes"] <= 8 and st["h2d"] == 0, st
    after = [q.numpy() for q in m.parameters()]
    assert sc.get_scale() == (256.0 if poison else 512.0)
    changed = [not np.array_equal(a, b) for a, b in zip(before, after)]
    assert (not any(changed)) if poison else all(changed)


def test_bfloat16_autocast_refuses_gpu_tensors_clearly():
    pytest.importorskip("ml_dtypes")
    a = jn.tensor(np.ones((2, 2), np.float32)).to("cuda")
    with jn.autocast(jn.bfloat16):
        with pytest.raises(TypeError, match=r"no bfloat16 path; use jn.autocast\(jn.float16\)"):
            a @ a


def test_jitted_grad_scaler_step_skips_on_the_gpu_with_one_scalar_read():
    m = mlp("cuda")
    opt = jn.optim.Adam(m.parameters(), lr=0.05)
    sc = jn.optim.GradScaler(init_scale=512.0, growth_interval=1)

    @jn.jit
    def step(xb, yb, poison):
        opt.zero_grad()
        with jn.autocast(jn.float16):
            loss = F.cross_entropy(m(xb), yb)
        sc.scale(loss * poison).backward()
        sc.step(opt)
        sc.update()
        return loss

    xb, yb = jn.tensor(X).to("cuda"), jn.tensor(Y).to("cuda")
    scales, snaps, stats = [], [], []
    for i in range(4):
        poison = jn.tensor(np.float32(np.inf if i == 2 else 1.0))
        jn.cuda.reset_transfer_stats()
        step(xb, yb, poison)
        stats.append(jn.cuda.transfer_stats())
        scales.append(sc.get_scale())
        snaps.append([p.numpy().copy() for p in m.parameters()])
    assert scales == [1024.0, 2048.0, 1024.0, 2048.0]
    assert all(np.array_equal(a, b) for a, b in zip(snaps[1], snaps[2]))
    assert not any(np.array_equal(a, b) for a, b in zip(snaps[2], snaps[3]))
    assert int(opt.global_step.numpy()) == 3
    for st in stats[1:]:                        # compiled runs: the overflow flag is the only read-back
        assert st["d2h"] <= 1 and st["d2h_bytes"] <= 8, st


def test_conv_batchnorm_block_matches_cpu_under_autocast():
    # Its own generator (the module's RNG state depends on which tests ran before), and no conv bias: batch
    # norm removes it, so its gradient is float16 rounding noise (+-0.008 on either device), not a result.
    x = np.random.default_rng(12).normal(size=(2, 2, 4, 4)).astype(np.float32)
    out = {}
    for dev in ("cpu", "cuda"):
        jn.random.seed(4)
        m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU()).to(dev)
        with jn.autocast(jn.float16):
            c = m[0](jn.tensor(x).to(dev))
            y = m(jn.tensor(x).to(dev))
            loss = jn.sum(y * y)
        loss.backward()
        assert c.dtype == F16 and y.dtype == np.float32
        out[dev] = [loss.item()] + [p.grad.numpy() for p in m.parameters()]
    for a, b in zip(out["cpu"], out["cuda"]):
        np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-2)
