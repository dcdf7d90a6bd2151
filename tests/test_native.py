"""Native segments (jitnet/compiler/native.py): drivers compute exactly what the Python plan steps compute."""
import numpy as np
import pytest

import jitnet as jn
import jitnet.nn as nn
import jitnet.nn.functional as F
from jitnet.compiler import native


@pytest.fixture(autouse=True)
def _drivers_at_once(monkeypatch):
    monkeypatch.setattr(native, "NATIVE_AFTER", 0)


def _train_step(m, opt):
    def step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        return loss
    return m, step


def _mlp_step(optname, **kw):
    jn.random.seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    return _train_step(m, getattr(jn.optim, optname)(m.parameters(), **kw))


def _native_steps(fn, *args):
    _, plan = fn.lower(*args)
    return [n for n in plan.step_names if n.startswith("native")]


@pytest.mark.parametrize("optname,kw", [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("Adam", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("AdaGrad", dict(lr=0.1)),
    ("RMSProp", dict(lr=1e-2, momentum=0.9, centered=True)),
])
def test_training_step_is_one_native_driver_and_matches_eager(optname, kw):
    rng = np.random.default_rng(0)
    x = jn.tensor(rng.standard_normal((8, 6), dtype=np.float32))
    y = jn.tensor(np.arange(8) % 3)
    m1, s1 = _mlp_step(optname, **kw)
    m2, s2 = _mlp_step(optname, **kw)
    js = jn.jit(s2)
    for _ in range(3):
        a, b = s1(x, y).item(), js(x, y).item()
        assert a == pytest.approx(b, rel=1e-5)
    for p, q in zip(m1.parameters(), m2.parameters()):
        np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=1e-5, atol=1e-6)
    _, plan = js.lower(x, y)
    assert len(plan.steps) == 1 and plan.step_names[0].startswith("native"), plan.step_names


def test_unrolled_cell_gradients_match_python_plan(monkeypatch):
    rng = np.random.default_rng(1)
    H = 4

    def loss(xs, h, W, U):
        for t in range(xs.shape[0]):
            z = xs[t] @ W + h @ U
            h = jn.tanh(z[:, :H]) * jn.sigmoid(z[:, H:])
        return jn.sum(h * h)
    args = [jn.tensor(rng.standard_normal(s).astype(np.float32)) for s in [(5, 3, 2), (3, H), (2, 2 * H), (H, 2 * H)]]
    vg = jn.jit(jn.value_and_grad(loss, argnums=(2, 3)))
    v, g = vg(*args)
    assert _native_steps(vg, *args)
    monkeypatch.setenv("JITNET_NATIVE", "0")
    vg0 = jn.jit(jn.value_and_grad(loss, argnums=(2, 3)))
    v0, g0 = vg0(*args)
    assert not _native_steps(vg0, *args)
    assert v.item() == pytest.approx(v0.item(), rel=1e-6)
    for a, b in zip(g, g0):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_scan_body_runs_as_a_native_loop_forward_and_backward():
    rng = np.random.default_rng(2)
    W = jn.tensor(rng.standard_normal((3, 3)).astype(np.float64) * 0.5)

    def f(xs, h0):
        (h,), ys = jn.scan(lambda c, x: ((jn.tanh(c[0] @ W + x),), c[0] * 2.0), (h0,), xs)
        return jn.sum(ys) + jn.sum(h * h)
    xs = jn.tensor(rng.standard_normal((6, 2, 3)))
    h0 = jn.tensor(rng.standard_normal((2, 3)))
    jg = jn.jit(jn.value_and_grad(f, argnums=(0, 1)))
    v, (gx, gh) = jg(xs, h0)
    ev, (egx, egh) = jn.value_and_grad(f, argnums=(0, 1))(xs, h0)
    assert v.item() == pytest.approx(ev.item(), rel=1e-12)
    np.testing.assert_allclose(gx.numpy(), egx.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gh.numpy(), egh.numpy(), rtol=1e-10, atol=1e-12)
    g, _ = jg.lower(xs, h0)
    loops = [n.params["body"].native for n in g.live_nodes() if n.prim.name == "scan"]
    assert loops and all(nl is not None and not nl.failed for nl in loops)


def test_driver_that_fails_to_compile_falls_back_to_python_steps(monkeypatch):
    def bad(n, a, o, kernels):
        return [f"{o} = {a[0]}.no_such_method()"]
    monkeypatch.setitem(jn.ops.TRANSPOSE.extra, "native", bad)      # the row's own emitter, broken
    rng = np.random.default_rng(3)
    a = jn.tensor(rng.standard_normal((3, 4)).astype(np.float32))
    b = jn.tensor(rng.standard_normal((3, 5)).astype(np.float32))

    def f(a, b):
        return jn.sum(jn.tanh(a.T @ b) * 2.0 + 1.0)
    jf = jn.jit(f)
    assert jf(a, b).item() == pytest.approx(f(a, b).item(), rel=1e-5)
    assert jf(a, b).item() == pytest.approx(f(a, b).item(), rel=1e-5)
    (comp,) = jf._cache.values()
    segs = getattr(comp.plan, "segments", [])
    assert segs and getattr(segs[0], "error", None) is not None


def test_segment_with_only_in_place_effects():
    v = jn.Variable(np.zeros((4,), np.float32))

    @jn.jit
    def bump(x):
        v.assign(v + jn.tanh(x) * 2.0 + 1.0)

    x = jn.tensor(np.ones(4, np.float32))
    bump(x)
    bump(x)
    np.testing.assert_allclose(v.numpy(), 2 * (np.tanh(1.0) * 2 + 1), rtol=1e-6)


def test_while_loop_runs_natively_with_a_data_dependent_trip_count():
    W = jn.tensor(np.array([[0.5, 0.1], [0.0, 0.5]]))

    def f(x, limit):
        def cond(c):
            return jn.sum(c[0] * c[0]) > limit

        def body(c):
            return (jn.tanh(c[0] @ W) * 0.9, c[1] + 1.0)
        return jn.while_loop(cond, body, (x, jn.zeros((), jn.float64)))
    x = jn.tensor(np.array([[3.0, -2.0]]))
    jf = jn.jit(f)
    for limit in (1e-3, 1e-6):
        ex, en = f(x, jn.tensor(limit))
        jx, jnum = jf(x, jn.tensor(limit))
        np.testing.assert_allclose(jx.numpy(), ex.numpy(), rtol=1e-12)
        assert jnum.item() == en.item() > 3
    g, _ = jf.lower(x, jn.tensor(1e-3))
    (node,) = [n for n in g.live_nodes() if n.prim.name == "while_loop"]
    nw = node.params["body"].native_while
    assert nw is not None
    (comp,) = jf._cache.values()
    (live,) = [n for n in comp.graph.live_nodes() if n.prim.name == "while_loop"]
    nw = live.params["body"].native_while
    assert nw._fn is not None and not nw.failed


def test_compiled_step_reads_operands_of_another_layout_correctly(monkeypatch):
    # a loop body's carry is contiguous on the first step and a strided view afterwards: a kernel caller that
    # kept the first call's compiled entry point read the views as if they were contiguous (wrong values)
    monkeypatch.setattr(native, "NATIVE_AFTER", 10**9)          # the Python plan steps: fused-kernel callers

    def body(c, x):
        z = jn.tanh(c * 0.5 + x)
        w = jn.concatenate([z, z * 2.0], axis=1)
        return w[:, :3], jn.sum(c)

    def f(c0, xs):
        return jn.scan(body, c0, xs)
    c0 = jn.tensor(np.ones((2, 3)))
    xs = jn.tensor(np.arange(30.0).reshape(5, 2, 3) / 30)
    (ec, ey), (jc, jy) = f(c0, xs), jn.jit(f)(c0, xs)
    np.testing.assert_allclose(jc.numpy(), ec.numpy(), rtol=1e-12)
    np.testing.assert_allclose(jy.numpy(), ey.numpy(), rtol=1e-12)


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4), (2, 2, 3, 2)])
def test_copy_into_writes_strided_views_of_every_rank(shape):
    from jitnet import kernels_cpu as K
    rng = np.random.default_rng(0)
    dst = np.zeros(tuple(s + 2 for s in shape), np.float32)
    view = dst[tuple(slice(1, s + 1) for s in shape)]
    src = rng.standard_normal(tuple(reversed(shape))).astype(np.float32).T       # a transposed source
    K.copy_into(view, src)
    expect = np.zeros_like(dst)
    expect[tuple(slice(1, s + 1) for s in shape)] = src
    np.testing.assert_array_equal(dst, expect)


def _driver_kernels(seg):
    """The Numba dispatchers a driver's source calls (its generated kernels k<i> and kernels_cpu's K.<name>)."""
    import re
    from jitnet import kernels_cpu as K
    g = seg.function().py_func.__globals__
    found = [g[n] for n in re.findall(r"\b(k\d+)\(", seg.source)] + \
        [getattr(K, n) for n in re.findall(r"\bK\.(\w+)\(", seg.source)]
    out = []
    for d in found:
        for x in (d, getattr(d, "serial", None), getattr(d, "parallel", None)):
            if hasattr(x, "signatures"):
                out.append(x)
    return out


def test_drivers_reuse_the_kernels_of_the_python_steps():
    # A driver that passes a bare constant (a reduction code, an optimizer or mask flag) makes Numba compile a
    # Literal[...] specialization of the kernel beside the one the Python steps use (seconds for the fused LSTM
    # kernels); a slice written with an array setitem compiles Numba's shape-error formatting (3 s a process).
    from numba.core import event, types
    compiled = []

    class Listener(event.Listener):
        def on_start(self, ev):
            compiled.append(getattr(getattr(ev.data.get("dispatcher"), "py_func", None), "__qualname__", ""))

        def on_end(self, ev):
            pass
    rng = np.random.default_rng(4)
    H = 3
    x = jn.tensor(rng.standard_normal((4, 6), dtype=np.float32))
    y = jn.tensor(np.arange(4) % 3)
    w_ih = jn.Parameter(rng.standard_normal((6, 4 * H)).astype(np.float32) * 0.3)
    w_hh = jn.Parameter(rng.standard_normal((H, 4 * H)).astype(np.float32) * 0.3)
    b = jn.Parameter(np.zeros(4 * H, np.float32))
    head = jn.Parameter(rng.standard_normal((H, 3)).astype(np.float32))
    params = [w_ih, w_hh, b, head]
    opt = jn.optim.RMSProp(params, lr=1e-2, momentum=0.9, centered=True)
    mask = jn.tensor(np.array([1, 1, 0, 1], np.uint8))

    def step(x, y):
        opt.zero_grad()
        s = F.lstm_step(x @ w_ih, jn.zeros((4, 6 * H)), w_hh, b, mask)
        logits = s[:, :H] @ head                        # a slice: its gradient is written into a zero array
        loss = F.cross_entropy(logits, y) + jn.sum(jn.softmax(logits, -1)[:, 0])
        loss.backward()
        opt.step()
        return loss
    js = jn.jit(step)
    lst = Listener()
    event.register("numba:compile", lst)
    try:
        losses = [js(x, y).item() for _ in range(3)]
    finally:
        event.unregister("numba:compile", lst)
    assert all(np.isfinite(losses))
    (comp,) = js._cache.values()
    segs = getattr(comp.plan, "segments", [])
    assert segs and all(getattr(s, "error", None) is None for s in segs)
    kernels = [d for s in segs for d in _driver_kernels(s)]
    names = {d.py_func.__name__ for d in kernels}
    assert {"nn_lstm_step", "rmsprop_update"} <= names, names
    for d in kernels:
        for sig in d.signatures:
            assert not any(isinstance(t, types.Literal) for t in sig), (d.py_func.__qualname__, sig)
    assert not [c for c in compiled if "raise_with_shape_context" in c], compiled


@pytest.mark.parametrize("conv", [False, True])
def test_batch_norm_training_step_is_native_and_matches_eager(conv):
    """Batch norm's rows (moments, the per-channel affine map, its gradient sums) have native forms, and the
    moments' rows are taken by slices (dense gradients), so a BN training step has no Python step left; its
    losses and parameters match the eager run (float64)."""
    rng = np.random.default_rng(3)

    def make():
        jn.random.seed(0)
        if conv:
            m = nn.Sequential(nn.Conv2d(2, 3, 3, padding="same", bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                              nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
        else:
            m = nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.Sigmoid(), nn.Linear(5, 3))
        m = m.to(dtype=jn.float64)
        return _train_step(m, jn.optim.Adam(m.parameters(), lr=1e-2))
    shape = (8, 2, 4, 4) if conv else (8, 6)
    x = jn.tensor(rng.standard_normal(shape), dtype=jn.float64)
    y = jn.tensor(np.arange(8) % 3)
    m1, s1 = make()
    m2, s2 = make()
    js = jn.jit(s2)
    for _ in range(3):
        assert s1(x, y).item() == pytest.approx(js(x, y).item(), rel=1e-12)
    for p, q in zip(m1.parameters(), m2.parameters()):
        np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=1e-10, atol=1e-12)
    _, plan = js.lower(x, y)
    names = " ".join(plan.step_names)        # (conv2d has no native form: its rows stay Python steps)
    assert all(n.startswith(("native", "conv2d")) for n in plan.step_names), plan.step_names
    assert "bn_moments" in " ".join(plan.sources) and "channel_affine_sums" in " ".join(plan.sources), names
