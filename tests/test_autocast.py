"""Mixed precision on the CPU: ``jn.autocast`` (GEMM-like ops in float16/bfloat16, sensitive ops in float32, casts
recorded for gradients and jit) and ``jn.optim.GradScaler`` (loss scaling, skipped overflow steps, scale
schedule), eagerly and under ``jn.jit``."""
import numpy as np
import pytest

import jitnet as jn
import jitnet.nn as nn
import jitnet.nn.functional as F

RNG = np.random.default_rng(5)
X = RNG.normal(size=(12, 5)).astype(np.float32)
Y = RNG.integers(0, 3, 12)
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)


def mlp():
    jn.random.seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


# -- the policy -------------------------------------------------------------------------------------------------

def test_matmul_under_autocast_returns_float16_close_to_float32():
    a, b = RNG.normal(size=(4, 6)).astype(np.float32), RNG.normal(size=(6, 3)).astype(np.float32)
    with jn.autocast(jn.float16):
        y = jn.tensor(a) @ jn.tensor(b)
    assert y.dtype == F16
    ref = a.astype(np.float16).astype(np.float32) @ b.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(y.numpy().astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(y.numpy().astype(np.float32), a @ b, rtol=2e-2, atol=2e-2)
    assert (jn.tensor(a) @ jn.tensor(b)).dtype == F32            # off again after the block


def test_linear_conv2d_and_layers_return_the_low_dtype():
    x = jn.tensor(RNG.normal(size=(2, 3, 5, 5)).astype(np.float32))
    conv = nn.Conv2d(3, 4, 3, padding=1)
    lin = nn.Linear(5, 2)
    with jn.autocast(jn.float16):
        c = conv(x)
        l1 = lin(jn.tensor(X))
        l2 = F.linear(jn.tensor(X), lin.W, lin.b)
    assert c.dtype == F16 and l1.dtype == F16 and l2.dtype == F16
    np.testing.assert_allclose(c.numpy().astype(np.float32), conv(x).numpy(), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(l1.numpy().astype(np.float32), lin(jn.tensor(X)).numpy(), rtol=2e-2, atol=2e-2)


def test_sensitive_ops_run_in_float32_and_elementwise_follows_the_storage_rule():
    h = jn.tensor(RNG.normal(size=(3, 4)).astype(np.float16))
    f = jn.tensor(RNG.normal(size=(3, 4)).astype(np.float32))
    with jn.autocast(jn.float16):
        y = jn.tensor(X) @ jn.tensor(np.ones((5, 4), np.float32))
        assert y.dtype == F16
        for out in (jn.softmax(y), jn.log_softmax(h), jn.sum(h), jn.mean(h, axis=0), jn.exp(h), jn.log(jn.abs(h)),
                    F.cross_entropy(y, jn.tensor(Y % 4)), F.mse_loss(h, h * 2)):
            assert out.dtype == F32, out
        assert jn.max(h).dtype == F16                 # max/min round nothing: they keep the dtype
        assert (h + h).dtype == F16 and (h * f).dtype == F32 and jn.relu(h).dtype == F16
        s = jn.softmax(y)
    np.testing.assert_allclose(s.numpy().sum(-1), 1.0, rtol=1e-6)


def test_float64_is_left_alone_and_integers_are_not_cast():
    a = jn.tensor(RNG.normal(size=(3, 3)))
    with jn.autocast(jn.float16):
        assert (a @ a).dtype == np.float64
        i = jn.tensor(np.arange(6).reshape(2, 3))
        assert (i @ jn.tensor(np.ones((3, 2), np.int64))).dtype == np.int64


def test_gradients_flow_back_to_float32_parameters():
    m = mlp()
    with jn.autocast(jn.float16):
        out = m(jn.tensor(X))
        loss = F.cross_entropy(out, jn.tensor(Y))
    assert out.dtype == F16 and loss.dtype == F32
    loss.backward()
    grads16 = [p.grad.numpy() for p in m.parameters()]
    assert all(p.grad.dtype == p.dtype == F32 for p in m.parameters())
    for p in m.parameters():
        p.grad = None
    F.cross_entropy(m(jn.tensor(X)), jn.tensor(Y)).backward()
    for g16, p in zip(grads16, m.parameters()):
        np.testing.assert_allclose(g16, p.grad.numpy(), rtol=5e-2, atol=5e-3)


def test_enabled_false_nesting_decorator_and_queries():
    a = jn.tensor(np.ones((2, 2), np.float32))
    from jitnet.autocast import get_autocast_dtype, is_autocast_enabled
    ac = jn.autocast(jn.float16)
    with ac:
        assert is_autocast_enabled() and get_autocast_dtype() == F16
        with jn.autocast(enabled=False):
            assert (a @ a).dtype == F32 and not is_autocast_enabled()
        assert (a @ a).dtype == F16
        with ac:                                     # the same object re-entered
            assert (a @ a).dtype == F16
        assert is_autocast_enabled()
    assert not is_autocast_enabled() and get_autocast_dtype() is None

    @jn.autocast(jn.float16)
    def f(x):
        return x @ x
    assert f(a).dtype == F16 and (a @ a).dtype == F32


def test_bad_dtypes_are_clear_errors():
    with pytest.raises(TypeError, match="takes a dtype, not a device"):
        jn.autocast("cuda")
    with pytest.raises(TypeError, match="float16 or jn.bfloat16, got float32"):
        jn.autocast(jn.float32)
    with pytest.raises(TypeError, match="float16 or jn.bfloat16"):
        jn.autocast(object())


def test_bfloat16_autocast_on_the_cpu():
    pytest.importorskip("ml_dtypes")
    a, b = RNG.normal(size=(3, 4)).astype(np.float32), RNG.normal(size=(4, 2)).astype(np.float32)
    with jn.autocast(jn.bfloat16):
        y = jn.tensor(a) @ jn.tensor(b)
        s = jn.softmax(y)
    assert y.dtype == jn.bfloat16 and s.dtype == F32
    np.testing.assert_allclose(y.numpy().astype(np.float32), a @ b, rtol=3e-2, atol=3e-2)


# -- under jit ----------------------------------------------------------------------------------------------------

def _train_step(m, opt, scaler=None):
    def step(x, y):
        opt.zero_grad()
        out = m(x)
        loss = F.cross_entropy(out, y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return loss, out
    return step


def test_jitted_step_under_autocast_trains_and_is_not_reused_outside():
    m = mlp()
    opt = jn.optim.Adam(m.parameters(), lr=0.05)
    step = jn.jit(_train_step(m, opt))
    x, y = jn.tensor(X), jn.tensor(Y)
    losses = []
    for _ in range(8):
        with jn.autocast(jn.float16):
            loss, out = step(x, y)
        losses.append(loss.item())
    assert out.dtype == F16 and loss.dtype == F32
    assert losses[-1] < losses[0] - 0.1
    assert len(step._cache) == 1
    assert all(p.dtype == F32 for p in m.parameters())
    loss, out = step(x, y)                             # outside: a new trace in float32
    assert out.dtype == F32 and len(step._cache) == 2
    with jn.autocast(jn.float16):
        loss, out = step(x, y)                         # inside again: the first plan
    assert out.dtype == F16 and len(step._cache) == 2


def test_step_traced_outside_autocast_is_not_reused_inside():
    m = mlp()
    opt = jn.optim.SGD(m.parameters(), lr=0.1)
    step = jn.jit(_train_step(m, opt))
    x, y = jn.tensor(X), jn.tensor(Y)
    t0 = jn.compiler.stats()["traces"]
    _, out = step(x, y)
    assert out.dtype == F32
    with jn.autocast(jn.float16):
        _, out = step(x, y)
    assert out.dtype == F16 and jn.compiler.stats()["traces"] == t0 + 2
    graph, _ = jn.jit(lambda a, b: m(a)).lower(x, y)     # traced outside: no casts
    assert not any(n.prim.name in ("cast", "convert") for n in graph.nodes)


def test_jitted_autocast_matches_eager_autocast():
    ma, mb = mlp(), mlp()
    oa, ob = jn.optim.SGD(ma.parameters(), lr=0.1), jn.optim.SGD(mb.parameters(), lr=0.1)
    sa, sb = _train_step(ma, oa), jn.jit(_train_step(mb, ob))
    x, y = jn.tensor(X), jn.tensor(Y)
    for _ in range(3):
        with jn.autocast(jn.float16):
            la, _ = sa(x, y)
            lb, _ = sb(x, y)
        np.testing.assert_allclose(lb.item(), la.item(), rtol=1e-5)
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        np.testing.assert_allclose(pb.numpy(), pa.numpy(), rtol=1e-4, atol=1e-5)


# -- GradScaler ---------------------------------------------------------------------------------------------------

def _scaled_run(steps, poison_at=(), jit=False, autocast=False, scaler_kw=None, use_scaler=True):
    m = mlp()
    opt = jn.optim.Adam(m.parameters(), lr=0.02)
    sc = jn.optim.GradScaler(**(scaler_kw or {})) if use_scaler else None

    def step(x, y, poison):
        opt.zero_grad()
        with jn.autocast(jn.float16, enabled=autocast):
            loss = F.cross_entropy(m(x), y)
        if sc is None:
            loss.backward()
            opt.step()
        else:
            sc.scale(loss * poison).backward()
            sc.step(opt)
            sc.update()
        return loss

    if jit:
        step = jn.jit(step)
    x, y = jn.tensor(X), jn.tensor(Y)
    losses, scales, snaps = [], [], []
    for i in range(steps):
        p = jn.tensor(np.float32(np.inf if i in poison_at else 1.0))
        with np.errstate(invalid="ignore", over="ignore"):
            losses.append(step(x, y, p).item())
        scales.append(sc.get_scale() if sc is not None else None)
        snaps.append([q.numpy().copy() for q in m.parameters()] + [v.numpy().copy() for st in opt.state.values()
                                                                     for v in st.values()])
    return losses, scales, snaps, opt, sc


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_grad_scaler_skips_an_inf_step_and_halves_the_scale(jit):
    losses, scales, snaps, opt, sc = _scaled_run(4, poison_at=(1,), jit=jit, scaler_kw={"init_scale": 256.0})
    assert scales == [256.0, 128.0, 128.0, 128.0]
    for a, b in zip(snaps[0], snaps[1]):             # the skipped step changed no parameter nor moment
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(snaps[1], snaps[2]))
    assert int(opt.global_step.numpy()) == 3
    assert all(np.isfinite(s).all() for s in snaps[-1])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_grad_scaler_grows_after_growth_interval_good_steps(jit):
    _, scales, _, _, sc = _scaled_run(7, poison_at=(4,), jit=jit,
                                      scaler_kw={"init_scale": 8.0, "growth_interval": 2, "growth_factor": 4.0,
                                                 "backoff_factor": 0.25})
    assert scales == [8.0, 32.0, 32.0, 128.0, 32.0, 32.0, 128.0]
    assert sc.state_dict()["_growth_tracker"] == 0


def test_scaled_training_matches_unscaled_float32_training():
    ref, _, ref_snaps, _, _ = _scaled_run(5, use_scaler=False)
    scaled, scales, snaps, _, _ = _scaled_run(5)
    np.testing.assert_allclose(scaled, ref, rtol=1e-6)             # power-of-two scales are exact in float32
    for a, b in zip(snaps[-1], ref_snaps[-1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    mixed, _, msnaps, _, _ = _scaled_run(5, autocast=True)
    np.testing.assert_allclose(mixed, ref, rtol=2e-2, atol=2e-2)
    assert mixed[-1] < mixed[0]
    for a, b in zip(msnaps[-1], ref_snaps[-1]):
        np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-3)


def test_grad_scaler_state_dict_round_trip_and_errors():
    sc = jn.optim.GradScaler(init_scale=64.0, growth_interval=3)
    m = mlp()
    opt = jn.optim.SGD(m.parameters(), lr=0.1)
    sc.scale(F.cross_entropy(m(jn.tensor(X)), jn.tensor(Y))).backward()
    sc.unscale_(opt)
    with pytest.raises(RuntimeError, match="already called"):
        sc.unscale_(opt)
    sc.step(opt)
    with pytest.raises(RuntimeError, match="already called"):
        sc.step(opt)
    sc.update()
    with pytest.raises(RuntimeError, match="no optimizer was stepped"):
        sc.update()
    st = sc.state_dict()
    assert st == {"scale": 64.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3,
                  "_growth_tracker": 1}
    other = jn.optim.GradScaler()
    other.load_state_dict(st)
    assert other.state_dict() == st and other.get_scale() == 64.0
    with pytest.raises(RuntimeError, match="empty"):
        other.load_state_dict({})
    with pytest.raises(ValueError, match="growth_factor"):
        jn.optim.GradScaler(growth_factor=1.0)
    with pytest.raises(ValueError, match="backoff_factor"):
        jn.optim.GradScaler(backoff_factor=1.5)
    with pytest.raises(ValueError, match="growth_interval"):
        jn.optim.GradScaler(growth_interval=0)
    with pytest.raises(TypeError, match="floating tensor"):
        sc.scale(jn.tensor(np.arange(3)))
    off = jn.optim.GradScaler(enabled=False)
    loss = jn.tensor(np.float32(2.0))
    assert off.scale(loss) is loss and off.get_scale() == 1.0 and off.state_dict() == {}


def test_unscale_before_clipping_sees_true_gradients():
    m = mlp()
    opt = jn.optim.SGD(m.parameters(), lr=0.1)
    F.cross_entropy(m(jn.tensor(X)), jn.tensor(Y)).backward()
    ref = [p.grad.numpy().copy() for p in m.parameters()]
    opt.zero_grad()
    sc = jn.optim.GradScaler(init_scale=1024.0)
    sc.scale(F.cross_entropy(m(jn.tensor(X)), jn.tensor(Y))).backward()
    np.testing.assert_allclose(list(m.parameters())[0].grad.numpy(), ref[0] * 1024.0, rtol=1e-5, atol=1e-6)
    sc.unscale_(opt)
    for r, p in zip(ref, m.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), r, rtol=1e-6, atol=1e-9)


def _sparse_run(jit):
    jn.random.seed(1)
    emb, lin = nn.Embedding(9, 4), nn.Linear(4, 3)
    params = list(emb.parameters()) + list(lin.parameters())
    opt = jn.optim.Adam(params, lr=0.05)
    sc = jn.optim.GradScaler(init_scale=128.0)
    ids, y = jn.tensor(np.array([[1, 1, 4], [0, 8, 4]])), jn.tensor(np.array([0, 2]))

    def step(ids, y, poison):
        opt.zero_grad()
        loss = F.cross_entropy(lin(emb(ids).mean(axis=1)), y)
        sc.scale(loss * poison).backward()
        sc.step(opt)
        sc.update()
        return loss

    if jit:
        step = jn.jit(step)
    rows = []
    for i in range(3):
        before = params[0].numpy().copy()
        with np.errstate(invalid="ignore", over="ignore"):
            step(ids, y, jn.tensor(np.float32(np.inf if i == 1 else 1.0)))
        rows.append((sc.get_scale(), np.array_equal(before, params[0].numpy())))
    return rows, [p.numpy() for p in params], type(params[0].grad).__name__


def test_grad_scaler_with_sparse_embedding_gradients_eager_and_jitted():
    eager, pe, kind = _sparse_run(False)
    jitted, pj, _ = _sparse_run(True)
    assert kind == "IndexedSlices"
    assert eager == jitted == [(128.0, False), (64.0, True), (64.0, False)]
    for a, b in zip(pe, pj):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_conv_batchnorm_block_under_autocast():
    jn.random.seed(4)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
    x = jn.tensor(RNG.normal(size=(2, 2, 4, 4)).astype(np.float32))
    ref = m(x).numpy()
    with jn.autocast(jn.float16):
        c = m[0](x)
        y = m(x)
        loss = jn.sum(y * y)
    assert c.dtype == F16 and y.dtype == F32 and loss.dtype == F32
    np.testing.assert_allclose(y.numpy(), ref, rtol=2e-2, atol=2e-2)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == F32 for p in m.parameters())
