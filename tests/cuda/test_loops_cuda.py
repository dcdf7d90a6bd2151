"""jn.scan and jn.while_loop under jit on CUDA: the loop node runs its body's GPU plan per step (a host loop over
the body's launches), forward and reverse, residual-storing and checkpointed; values and gradients equal the
CPU's. Tiny shapes: the simulator is slow."""
import numpy as np
import pytest

import jitnet as jn

RNG = np.random.default_rng(7)


def _data():
    return (RNG.standard_normal((3, 3)).astype(np.float32) * 0.5, RNG.standard_normal((2, 3)).astype(np.float32),
            RNG.standard_normal((4, 2, 3)).astype(np.float32))


def _run(dev, w, h0, xs, reverse, checkpoint):
    def loss(h0, xs, W):
        def body(c, x):
            h, s = c
            h = jn.tanh(h @ W + x)
            return (h, s + jn.sum(h)), h * 2.0
        (h, s), ys = jn.scan(body, (h0, jn.zeros((), device=dev)), xs, reverse=reverse, checkpoint=checkpoint)
        return jn.sum(ys * ys) + s + jn.sum(h)

    f = jn.jit(jn.value_and_grad(loss, argnums=(0, 1, 2)))
    for _ in range(2):
        val, grads = f(*[jn.tensor(a).to(dev) for a in (h0, xs, w)])
    for t in (val,) + tuple(grads):
        assert t.is_cuda == (dev == "cuda")
    return [t.numpy() for t in (val,) + tuple(grads)], list(f._cache.values())[0].plan


@pytest.mark.parametrize("reverse,checkpoint", [(False, False), (True, True)], ids=["stored", "reverse-ckpt"])
def test_jitted_scan_on_cuda_matches_cpu_values_and_gradients(reverse, checkpoint):
    w, h0, xs = _data()
    ref, _ = _run("cpu", w, h0, xs, reverse, checkpoint)
    got, plan = _run("cuda", w, h0, xs, reverse, checkpoint)
    assert "cuda" in plan.devices
    assert any(n.startswith("scan (cuda)") for n in plan.step_names), plan.step_names
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-5)


def test_jitted_while_loop_on_cuda():
    def run(dev):
        x = jn.tensor(np.array([1.0, 2.0], np.float32)).to(dev)

        @jn.jit
        def f(x):
            return jn.while_loop(lambda c: c[1] < 5, lambda c: (c[0] * 1.5, c[1] + 1), (x, jn.zeros((), "int64",
                                                                                               device=dev)))
        y, n = f(x)
        assert y.is_cuda == (dev == "cuda")
        return y.numpy(), n.numpy()
    (a, na), (b, nb) = run("cpu"), run("cuda")
    np.testing.assert_allclose(b, a, rtol=1e-6)
    assert na == nb == 5


def test_eager_scan_gradient_on_cuda_matches_cpu():
    """Eagerly a scan is a Python loop on the tape; the gradient of each step's x[t] stays on the device."""
    w, h0, xs = _data()

    def loss(h0, xs, W):
        def body(c, x):
            h, s = c
            h = jn.tanh(h @ W + x)
            return (h, s + jn.sum(h)), h * 2.0
        (h, s), ys = jn.scan(body, (h0, jn.zeros((), device=h0.device)), xs)
        return jn.sum(ys * ys) + s + jn.sum(h)

    res = {}
    for dev in ("cpu", "cuda"):
        v, g = jn.value_and_grad(loss, argnums=(0, 1, 2))(*[jn.tensor(a).to(dev) for a in (h0, xs, w)])
        assert all(t.is_cuda == (dev == "cuda") for t in (v,) + tuple(g))
        res[dev] = [v.numpy()] + [t.numpy() for t in g]
    for a, b in zip(res["cpu"], res["cuda"]):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-5)
