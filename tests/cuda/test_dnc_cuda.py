"""The DNC memory step on CUDA (``dnc_memory_step`` and its gradient row, kernels_dnc_gpu) against its CPU form:
values and gradients, float64 and float32, eagerly and under ``jn.jit``; and the training steps of the copy and
bAbI models, eager and jitted, on the GPU against the CPU, with no host<->device transfer inside a step. Tiny
shapes: the simulator runs every GPU thread as Python."""
import numpy as np
import pytest

import jitnet as jn
from jitnet.models import dnc as D
from jitnet.nn import dnc_memory as M

N, W, R, B = 4, 3, 2, 2
S, I = M.packed_size(N, W, R), M.interface_size(R, W)
RNG = np.random.default_rng(5)


def _inputs(dtype):
    p = (RNG.random((B, S)) * 0.3).astype(dtype)
    xi = RNG.standard_normal((B, I)).astype(dtype)
    wts = RNG.standard_normal((B, S)).astype(dtype)
    return p, xi, wts


def _run(dev, p, xi, wts, jit):
    w = jn.tensor(wts).to(dev)

    def f(pp, xx):
        return jn.sum(M.dnc_memory_step(pp, xx, N, W, R) * w)

    def both(pp, xx):
        return (M.dnc_memory_step(pp, xx, N, W, R),) + tuple(jn.value_and_grad(f, argnums=(0, 1))(pp, xx)[1])
    g = jn.jit(both) if jit else both
    a, b = jn.tensor(p).to(dev), jn.tensor(xi).to(dev)
    for _ in range(2 if jit else 1):        # a jitted function's second call runs its compiled plan
        outs = g(a, b)
    assert all(t.is_cuda == (dev == "cuda") for t in outs)
    return [t.numpy() for t in outs]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_memory_step_and_its_gradient_match_the_cpu(dtype, jit, monkeypatch):
    calls = []
    for prim in (M._MEM_STEP, M._MEM_BWD):
        impl = prim.impl["cuda"]
        monkeypatch.setitem(prim.impl, "cuda", lambda *a, _i=impl, _n=prim.name, **k: calls.append(_n) or _i(*a, **k))
    p, xi, wts = _inputs(dtype)
    ref = _run("cpu", p, xi, wts, jit)
    got = _run("cuda", p, xi, wts, jit)
    assert {"dnc_memory_step", "dnc_memory_step_grad"} <= set(calls)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)
    for a, b in zip(ref, got):
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_allclose(b, a, **tol)
    assert np.abs(got[2]).max() > 0          # the interface gradient is not trivially zero


def test_memory_module_runs_on_cuda_fused_and_composed():
    p, xi, _ = _inputs(np.float64)
    fused = jn.nn.DNCMemory(N, W, R)
    composed = jn.nn.DNCMemory(N, W, R, fused=False)
    out = fused(jn.tensor(p).to("cuda"), jn.tensor(xi).to("cuda"))
    st = composed(fused.unpack(jn.tensor(p).to("cuda")), jn.tensor(xi).to("cuda"))
    assert out.is_cuda and st.memory.is_cuda
    np.testing.assert_allclose(out.numpy(), M.pack_state(st).numpy(), rtol=1e-10, atol=1e-12)


def _babi_batch(rng, vocab=5, T=3):
    """One tiny bAbI-shaped batch: one-hot tokens (1, T, vocab), answer ids and an answer slot at the end."""
    x = np.eye(vocab, dtype=np.float32)[rng.integers(0, vocab, (1, T))]
    y = rng.integers(0, vocab, (1, T))
    mask = np.zeros((1, T), np.float32)
    mask[0, -1] = 1
    return x, y, mask


TASKS = {   # the two commands' models, with a 2-unit controller and a 3x2 memory
    "copy": (lambda jit: D.CopyModel(bits=2, hidden_size=2, memory_size=3, word_size=2, num_reads=1, jit=jit),
             lambda m, rng: m.batch(rng, 2, 1, 1)),
    "babi": (lambda jit: D.BabiModel(5, hidden_size=2, memory_size=3, word_size=2, num_reads=1, jit=jit),
             lambda m, rng: _babi_batch(rng)),
}


def _losses(task, dev, jit, steps=2):
    jn.random.seed(0)
    rng = np.random.default_rng(0)
    make, batch = TASKS[task]
    m = make(jit)
    m.to(dev)
    losses, stats = [], []
    for _ in range(steps):
        x, y, mask = (m._tensor(a) for a in batch(m, rng))   # the batch moves before the step
        jn.cuda.reset_transfer_stats()
        loss = m.train_step(x, y, mask)
        stats.append(jn.cuda.transfer_stats())
        losses.append(float(loss.numpy()))   # the one scalar read, after the counted step
    return m, losses, stats


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_training_step_matches_the_cpu_without_transfers(task, jit):
    _, ref, _ = _losses(task, "cpu", jit)
    m, got, stats = _losses(task, "cuda", jit)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)
    assert ref[0] != ref[1]                  # the first step changed the parameters
    assert all(p.is_cuda for p in m.net.parameters())
    # the first step uploads once (a jitted one its plan's constants, an eager one the optimizer's slots) and
    # reads nothing back; the next one moves nothing
    assert all(st["d2h"] == 0 for st in stats) and stats[1]["h2d"] == 0, stats
