"""Optimizers against their textbook update rules in NumPy, sparse (embedding) gradients, schedules, clipping,
minimize(), checkpoints of optimizer state."""
from __future__ import annotations

import numpy as np
import pytest

import jitnet as jn
from jitnet.autodiff import REGISTRY
from jitnet.autodiff.sparse import IndexedSlices, unique_sum
from jitnet.nn.embedding_ops import embedding
from jitnet.optim import updates as U

STEPS = 5


def _grads(shape, steps=STEPS, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for _ in range(steps)]


def _run(opt_factory, p0, grads):
    """Return (parameter values after each step, optimizer) for gradients set by hand each step."""
    p = jn.Variable(p0.copy())
    opt = opt_factory([p])
    out = []
    for g in grads:
        opt.zero_grad()
        p.grad = jn.Tensor(g)
        opt.step()
        out.append(p.numpy().copy())
    return out, opt, p


# -- NumPy references (textbook rules) ----------------------------------------------------------------------------

def ref_sgd(p, grads, lr, momentum=0.0, dampening=0.0, nesterov=False, wd=0.0):
    p = p.copy()
    buf = np.zeros_like(p)
    out = []
    for t, g in enumerate(grads):
        g = g + wd * p
        if momentum:
            buf = momentum * buf + (1 - dampening) * g if t else g.copy() if dampening == 0 else \
                momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
        out.append(p.copy())
    return out


def ref_adagrad(p, grads, lr, init=0.1, eps=1e-7, wd=0.0):
    p = p.copy()
    acc = np.full_like(p, init)
    out = []
    for g in grads:
        g = g + wd * p
        acc = acc + g * g
        p = p - lr * g / (np.sqrt(acc) + eps)
        out.append(p.copy())
    return out


def ref_rmsprop(p, grads, lr, decay=0.9, momentum=0.0, eps=1e-10, centered=False, wd=0.0):
    p = p.copy()
    ms = np.zeros_like(p)
    mg = np.zeros_like(p)
    mom = np.zeros_like(p)
    out = []
    for g in grads:
        g = g + wd * p
        ms = decay * ms + (1 - decay) * g * g
        denom = ms
        if centered:
            mg = decay * mg + (1 - decay) * g
            denom = ms - mg * mg
        step = lr * g / np.sqrt(denom + eps)
        if momentum:
            mom = momentum * mom + step
            step = mom
        p = p - step
        out.append(p.copy())
    return out


def ref_adam(p, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    p = p.copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1 ** t)
        vhat = v / (1 - b2 ** t)
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
        out.append(p.copy())
    return out


def _check(got, want, rtol=1e-10, atol=1e-12):
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"after step {k + 1}")


SHAPES = [(7,), (3, 4), (300, 300)]        # the last one runs the parallel kernels


# -- dense updates -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                 dict(momentum=0.5, dampening=0.3), dict(weight_decay=0.1),
                                 dict(momentum=0.9, nesterov=True, weight_decay=0.01)])
def test_sgd_matches_textbook(shape, cfg):
    p0 = np.random.default_rng(1).standard_normal(shape)
    gs = _grads(shape)
    got, opt, _ = _run(lambda ps: jn.optim.SGD(ps, lr=0.1, **cfg), p0, gs)
    want = ref_sgd(p0, gs, 0.1, cfg.get("momentum", 0.0), cfg.get("dampening", 0.0), cfg.get("nesterov", False),
                   cfg.get("weight_decay", 0.0))
    _check(got, want)
    assert int(opt.global_step) == STEPS and opt.global_step.dtype == np.int64


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", [dict(), dict(weight_decay=0.05), dict(initial_accumulator_value=1.0, eps=0.0)])
def test_adagrad_matches_textbook(shape, cfg):
    p0 = np.random.default_rng(2).standard_normal(shape)
    gs = _grads(shape, seed=3)
    got, _, _ = _run(lambda ps: jn.optim.AdaGrad(ps, lr=0.5, **cfg), p0, gs)
    want = ref_adagrad(p0, gs, 0.5, cfg.get("initial_accumulator_value", 0.1), cfg.get("eps", 1e-7),
                       cfg.get("weight_decay", 0.0))
    _check(got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", [dict(), dict(momentum=0.9), dict(centered=True),
                                 dict(centered=True, momentum=0.8), dict(weight_decay=0.1, decay=0.5)])
def test_rmsprop_matches_textbook(shape, cfg):
    p0 = np.random.default_rng(4).standard_normal(shape)
    gs = _grads(shape, seed=5)
    got, opt, p = _run(lambda ps: jn.optim.RMSProp(ps, lr=0.01, **cfg), p0, gs)
    want = ref_rmsprop(p0, gs, 0.01, cfg.get("decay", 0.9), cfg.get("momentum", 0.0), 1e-10,
                       cfg.get("centered", False), cfg.get("weight_decay", 0.0))
    _check(got, want, rtol=1e-9)
    slots = set(opt.state[id(p)])
    assert slots == {"ms"} | ({"mg"} if cfg.get("centered") else set()) | \
        ({"momentum"} if cfg.get("momentum") else set())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", [dict(), dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6), dict(weight_decay=0.1)])
def test_adam_matches_textbook(shape, cfg):
    p0 = np.random.default_rng(6).standard_normal(shape)
    gs = _grads(shape, seed=7)
    got, _, _ = _run(lambda ps: jn.optim.Adam(ps, **cfg), p0, gs)
    b1, b2 = cfg.get("betas", (0.9, 0.999))
    want = ref_adam(p0, gs, cfg.get("lr", 1e-3), b1, b2, cfg.get("eps", 1e-8), cfg.get("weight_decay", 0.0))
    _check(got, want, rtol=1e-9)


def test_float32_parameters_and_defaults():
    p0 = np.random.default_rng(8).standard_normal((5, 6)).astype(np.float32)
    gs = _grads((5, 6), seed=9, dtype=np.float32)
    got, opt, p = _run(lambda ps: jn.optim.Adam(ps), p0, gs)
    want = ref_adam(p0.astype(np.float64), [g.astype(np.float64) for g in gs])
    assert p.dtype == np.float32 and opt.state[id(p)]["m"].dtype == np.float32
    _check(got, want, rtol=1e-5, atol=1e-6)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"]) == (1e-3, (0.9, 0.999), 1e-8)
    r = jn.optim.RMSProp([jn.Variable(np.zeros(2))]).param_groups[0]
    assert (r["decay"], r["eps"], r["momentum"], r["centered"]) == (0.9, 1e-10, 0.0, False)
    a = jn.optim.AdaGrad([jn.Variable(np.zeros(2))])
    assert a.param_groups[0]["initial_accumulator_value"] == 0.1
    assert np.all(next(iter(a.state.values()))["accumulator"].numpy() == 0.1)


def test_params_without_grad_are_skipped_and_groups_have_their_own_lr():
    a = jn.Variable(np.ones(3))
    b = jn.Variable(np.ones(3))
    c = jn.Variable(np.ones(3))
    opt = jn.optim.SGD([{"params": [a, b]}, {"params": [c], "lr": 1.0}], lr=0.1)
    a.grad = jn.Tensor(np.ones(3))
    c.grad = jn.Tensor(np.ones(3))
    opt.step()
    np.testing.assert_allclose(a.numpy(), 0.9)
    np.testing.assert_allclose(b.numpy(), 1.0)
    np.testing.assert_allclose(c.numpy(), 0.0)
    opt.zero_grad()
    assert a.grad is None and c.grad is None


def test_update_primitives_are_inplace_effects():
    for name, prim in U.UPDATES.items():
        assert REGISTRY[name] is prim
        assert prim.kind == "update" and prim.nondiff
        assert prim.extra["inplace"][0] == 0 and len(prim.extra["inplace"]) >= 1
    assert U.ADAM_UPDATE.extra["inplace"] == (0, 2, 3)
    assert U.ADAM_SPARSE_UPDATE.extra["inplace"] == (0, 3, 4)
    p = jn.Variable(np.ones(4))
    m = jn.Variable(np.zeros(4), trainable=False)
    v = jn.Variable(np.zeros(4), trainable=False)
    arr = p.numpy()
    out = U.adam_update(p, jn.Tensor(np.ones(4)), m, v, jn.tensor(0.1, dtype=jn.float64),
                        jn.tensor(1.0, dtype=jn.float64))
    assert p.numpy() is arr and out.numpy() is arr            # updated in place, param array returned
    np.testing.assert_allclose(p.numpy(), 0.9, rtol=1e-7)
    np.testing.assert_allclose(m.numpy(), 0.1)


def test_update_errors():
    with pytest.raises(ValueError, match="empty"):
        jn.optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        jn.optim.SGD([jn.Variable(np.ones(2))], lr=-1.0)
    with pytest.raises(ValueError, match="Nesterov"):
        jn.optim.SGD([jn.Variable(np.ones(2))], lr=0.1, nesterov=True)
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        jn.optim.Adam([{"params": [jn.Variable(np.ones(2))], "momentum": 0.9}])
    p = jn.Variable(np.ones(2))
    with pytest.raises(ValueError, match="twice"):
        jn.optim.SGD([p, p], lr=0.1)
    with pytest.raises(ValueError, match="more than one group"):
        jn.optim.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    opt = jn.optim.SGD([p], lr=0.1)
    p.grad = jn.Tensor(np.ones(3))
    with pytest.raises(ValueError, match=r"gradient of shape \(3,\)"):
        opt.step()


# -- sparse (embedding) gradients -----------------------------------------------------------------------------------

def _embedding_grad(table, ids, seed=0):
    """Return the IndexedSlices gradient of sum(embedding(table, ids) * r) for a random r."""
    r = np.random.default_rng(seed).standard_normal(np.shape(ids) + (table.shape[1],))
    table.grad = None
    (embedding(table, ids) * jn.Tensor(r.astype(table.dtype))).sum().backward()
    return table.grad


def test_embedding_forward_and_dense_gradient():
    w0 = np.random.default_rng(0).standard_normal((10, 4))
    ids = np.array([[1, 3, 3], [9, 0, 1]])
    w = jn.Variable(w0)
    y = embedding(w, ids)
    assert y.shape == (2, 3, 4)
    np.testing.assert_array_equal(y.numpy(), w0[ids])
    r = np.random.default_rng(1).standard_normal((2, 3, 4))
    (y * jn.Tensor(r)).sum().backward()
    g = w.grad
    assert isinstance(g, IndexedSlices)
    assert g.shape == (10, 4) and g.dtype == np.float64 and g.indices.dtype == np.int64
    np.testing.assert_array_equal(g.indices.numpy(), ids.reshape(-1))
    np.testing.assert_allclose(g.values.numpy(), r.reshape(-1, 4))
    dense = np.zeros((10, 4))
    np.add.at(dense, ids.reshape(-1), r.reshape(-1, 4))
    np.testing.assert_allclose(g.to_dense().numpy(), dense)
    # same as the gradient of the dense gather
    w2 = jn.Variable(w0)
    (jn.take(w2, jn.tensor(ids), axis=0) * jn.Tensor(r)).sum().backward()
    np.testing.assert_allclose(g.to_dense().numpy(), w2.grad.numpy())


def test_embedding_gradient_accumulates_and_mixes_with_dense():
    w = jn.Variable(np.ones((5, 2)))
    embedding(w, [1, 2]).sum().backward()
    embedding(w, [2]).sum().backward()                # IndexedSlices + IndexedSlices: concatenated
    assert isinstance(w.grad, IndexedSlices) and w.grad.indices.numpy().tolist() == [1, 2, 2]
    np.testing.assert_allclose(w.grad.to_dense().numpy()[:, 0], [0, 1, 2, 0, 0])
    (w * 1.0).sum().backward()                        # + dense: dense
    assert isinstance(w.grad, jn.Tensor)
    np.testing.assert_allclose(w.grad.numpy()[:, 0], [1, 2, 3, 1, 1])
    # one loss using the table both ways
    w.grad = None
    (embedding(w, [0, 0]).sum() + (w * 2.0).sum()).backward()
    np.testing.assert_allclose(w.grad.numpy()[:, 0], [4, 2, 2, 2, 2])
    # a table computed from a leaf: the sparse gradient is densified on its way through
    gw = jn.gradients(embedding(w * 3.0, [4]).sum(), [w])[0]
    np.testing.assert_allclose(gw.numpy()[:, 1], [0, 0, 0, 0, 3])
    # Tensor + IndexedSlices and IndexedSlices + Tensor
    s = IndexedSlices(jn.tensor(np.ones((1, 2))), [3], (5, 2))
    d = jn.tensor(np.zeros((5, 2)))
    np.testing.assert_allclose((s + d).numpy(), (d + s.to_dense()).numpy())
    np.testing.assert_allclose(s.__radd__(d).numpy(), s.to_dense().numpy())


def test_embedding_errors():
    w = jn.Variable(np.zeros((4, 3)))
    with pytest.raises(IndexError, match=r"index 4 is out of bounds .* 4 rows"):
        embedding(w, [0, 4])
    with pytest.raises(IndexError, match=r"index -1 is out of bounds"):
        embedding(w, [-1])
    with pytest.raises(TypeError, match="integers"):
        embedding(w, np.array([0.5]))
    with pytest.raises(ValueError, match="2-D"):
        embedding(jn.Variable(np.zeros(4)), [0])


def test_unique_sum_and_deduplicate():
    idx = np.array([5, 1, 5, 3, 1, 5])
    vals = np.arange(12.0).reshape(6, 2)
    u, s = unique_sum(idx, vals)
    assert u.tolist() == [1, 3, 5]
    want = np.zeros((6, 2))
    np.add.at(want, idx, vals)
    np.testing.assert_allclose(s, want[[1, 3, 5]])
    sl = IndexedSlices(jn.tensor(vals), idx, (6, 2)).deduplicate()
    np.testing.assert_allclose(sl.to_dense().numpy(), want)


@pytest.mark.parametrize("make", [lambda ps: jn.optim.SGD(ps, lr=0.3),
                                  lambda ps: jn.optim.SGD(ps, lr=0.3, weight_decay=0.0),
                                  lambda ps: jn.optim.AdaGrad(ps, lr=0.3)])
def test_sparse_update_equals_dense_on_touched_rows(make):
    w0 = np.random.default_rng(3).standard_normal((12, 3))
    ws, wd = jn.Variable(w0), jn.Variable(w0)
    opt_s, opt_d = make([ws]), make([wd])
    touched = set()
    for step, ids in enumerate([[2, 5, 5, 7], [0, 2, 2, 2], [11, 5]]):        # duplicates included
        g = _embedding_grad(ws, ids, seed=step)
        assert isinstance(g, IndexedSlices)
        wd.grad = g.to_dense()
        opt_s.step()
        opt_d.step()
        touched |= set(ids)
        np.testing.assert_allclose(ws.numpy(), wd.numpy(), rtol=1e-12, atol=1e-14)
        untouched = sorted(set(range(12)) - touched)
        np.testing.assert_array_equal(ws.numpy()[untouched], w0[untouched])
        for name, slot in opt_s.state[id(ws)].items():
            np.testing.assert_allclose(slot.numpy(), opt_d.state[id(wd)][name].numpy(), rtol=1e-12)


def test_sparse_momentum_and_lazy_adam_touch_only_looked_up_rows():
    w0 = np.random.default_rng(4).standard_normal((8, 2))
    for make in (lambda ps: jn.optim.SGD(ps, lr=0.1, momentum=0.9), lambda ps: jn.optim.Adam(ps, lr=0.1)):
        w = jn.Variable(w0)
        opt = make([w])
        _embedding_grad(w, [1, 1, 4], seed=0)
        opt.step()
        slots_after_1 = {k: v.numpy().copy() for k, v in opt.state[id(w)].items()}
        _embedding_grad(w, [4], seed=1)
        opt.step()
        # row 1 was not looked up in step 2: its value and slots did not move
        np.testing.assert_array_equal(w.numpy()[[0, 2, 3, 5, 6, 7]], w0[[0, 2, 3, 5, 6, 7]])
        for k, v in opt.state[id(w)].items():
            np.testing.assert_array_equal(v.numpy()[1], slots_after_1[k][1])
    # lazy Adam on the touched rows equals Adam with the global step count
    w = jn.Variable(w0)
    opt = jn.optim.Adam([w], lr=0.1)
    g1 = _embedding_grad(w, [1, 1, 4], seed=0).to_dense().numpy()
    opt.step()
    g2 = _embedding_grad(w, [4], seed=1).to_dense().numpy()
    opt.step()
    want4 = ref_adam(w0[4], [g1[4], g2[4]], lr=0.1)[-1]
    want1 = ref_adam(w0[1], [g1[1]], lr=0.1)[-1]
    np.testing.assert_allclose(w.numpy()[4], want4, rtol=1e-10)
    np.testing.assert_allclose(w.numpy()[1], want1, rtol=1e-10)


def test_sparse_rmsprop_densifies_and_bad_indices_raise():
    w0 = np.random.default_rng(5).standard_normal((6, 2))
    w = jn.Variable(w0)
    opt = jn.optim.RMSProp([w], lr=0.01)
    g = _embedding_grad(w, [0, 3])
    dense = g.to_dense().numpy()
    opt.step()
    np.testing.assert_allclose(w.numpy(), ref_rmsprop(w0, [dense], 0.01)[-1], rtol=1e-10)
    w.grad = IndexedSlices(jn.tensor(np.ones((1, 2))), [6], (6, 2))
    with pytest.raises(IndexError, match="index 6 is out of bounds"):
        jn.optim.SGD([w], lr=0.1).step()


# -- schedules -------------------------------------------------------------------------------------------------------

def test_schedules_values():
    s = jn.optim.exponential_decay(0.1, decay_steps=10, decay_rate=0.5)
    assert s(0) == pytest.approx(0.1) and s(10) == pytest.approx(0.05) and s(5) == pytest.approx(0.1 * 0.5 ** 0.5)
    st = jn.optim.exponential_decay(0.1, 10, 0.5, staircase=True)
    assert st(9) == pytest.approx(0.1) and st(10) == pytest.approx(0.05) and st(25) == pytest.approx(0.025)
    sd = jn.optim.step_decay(1.0, step_size=3, gamma=0.1)
    assert [round(sd(k), 6) for k in range(7)] == [1, 1, 1, 0.1, 0.1, 0.1, 0.01]
    pc = jn.optim.piecewise_constant([2, 5], [1.0, 0.5, 0.1])
    assert [pc(k) for k in (0, 2, 3, 5, 6)] == [1.0, 1.0, 0.5, 0.5, 0.1]
    for sch in (s, st, sd, pc):                       # tensor steps give the same values as numbers
        for k in (0, 3, 7, 12):
            v = sch(jn.tensor(k))
            assert isinstance(v, jn.Tensor) and v.shape == ()
            assert float(v) == pytest.approx(sch(k), rel=1e-12)


def test_optimizer_follows_schedule_with_global_step():
    sched = jn.optim.exponential_decay(1.0, decay_steps=1, decay_rate=0.5, staircase=True)
    p = jn.Variable(np.zeros(1))
    opt = jn.optim.SGD([p], lr=sched)
    for _ in range(4):
        p.grad = jn.Tensor(np.ones(1))
        opt.step()
    np.testing.assert_allclose(p.numpy(), -(1 + 0.5 + 0.25 + 0.125))
    assert int(opt.global_step) == 4


# -- clipping ----------------------------------------------------------------------------------------------------

def test_clip_functions_against_numpy():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal(5)
    np.testing.assert_allclose(jn.optim.clip_by_value(jn.tensor(a), -0.5, 0.5).numpy(), np.clip(a, -0.5, 0.5))
    lst = jn.optim.clip_by_value([jn.tensor(a), None], -0.1, 0.2)
    assert lst[1] is None and np.allclose(lst[0].numpy(), np.clip(a, -0.1, 0.2))
    n = np.linalg.norm(a)
    np.testing.assert_allclose(jn.optim.clip_by_norm(jn.tensor(a), 1.0).numpy(), a / n, rtol=1e-6)
    np.testing.assert_allclose(jn.optim.clip_by_norm(jn.tensor(a), 100.0).numpy(), a, rtol=1e-6)
    rown = np.linalg.norm(a, axis=1, keepdims=True)
    np.testing.assert_allclose(jn.optim.clip_by_norm(jn.tensor(a), 1.0, axes=1).numpy(),
                               a / np.maximum(rown, 1.0), rtol=1e-6)
    gn = np.sqrt((a ** 2).sum() + (b ** 2).sum())
    out, norm = jn.optim.clip_by_global_norm([jn.tensor(a), None, jn.tensor(b)], 1.0)
    assert float(norm) == pytest.approx(gn, rel=1e-6) and out[1] is None
    np.testing.assert_allclose(out[0].numpy(), a / gn, rtol=1e-6)
    np.testing.assert_allclose(out[2].numpy(), b / gn, rtol=1e-6)
    out, _ = jn.optim.clip_by_global_norm([jn.tensor(a)], 1e3)
    np.testing.assert_allclose(out[0].numpy(), a, rtol=1e-6)


def test_clip_by_global_norm_with_indexed_slices():
    vals = np.array([[3.0, 0.0], [0.0, 4.0], [1.0, 1.0]])
    s = IndexedSlices(jn.tensor(vals), [2, 0, 2], (4, 2))      # duplicates: row 2 = [4, 1]
    d = jn.tensor(np.array([2.0]))
    dense = s.to_dense().numpy()
    want = np.sqrt((dense ** 2).sum() + 4.0)
    out, norm = jn.optim.clip_by_global_norm([s, d], 1.0)
    assert float(norm) == pytest.approx(want, rel=1e-6)
    assert isinstance(out[0], IndexedSlices)
    np.testing.assert_allclose(out[0].to_dense().numpy(), dense / want, rtol=1e-6)
    np.testing.assert_allclose(out[1].numpy(), [2.0 / want], rtol=1e-6)
    c = jn.optim.clip_by_norm(s, 1.0)
    np.testing.assert_allclose(c.to_dense().numpy(), dense / np.linalg.norm(dense), rtol=1e-6)


def test_optimizer_clip_grad_norm():
    a, b = jn.Variable(np.ones(4)), jn.Variable(np.ones((2, 2)))
    opt = jn.optim.SGD([a, b], lr=1.0)
    a.grad = jn.Tensor(np.full(4, 3.0))
    b.grad = jn.Tensor(np.full((2, 2), 4.0))
    norm = opt.clip_grad_norm(1.0)
    assert float(norm) == pytest.approx(10.0)
    total = np.sqrt((a.grad.numpy() ** 2).sum() + (b.grad.numpy() ** 2).sum())
    assert total == pytest.approx(1.0, rel=1e-6)
    opt.step()
    np.testing.assert_allclose(a.numpy(), 1 - 0.3, rtol=1e-6)


# -- minimize, a training run, checkpoints ----------------------------------------------------------------------

def test_minimize():
    w = jn.Variable(np.array([1.0, -2.0]))
    frozen = jn.Variable(np.array([5.0]))
    opt = jn.optim.SGD([w, frozen], lr=0.1)
    loss = opt.minimize(lambda: (w * w).sum() + (frozen * w).sum(), var_list=[w])
    assert float(loss) == pytest.approx(5.0 + 5.0 * -1.0)
    np.testing.assert_allclose(w.numpy(), [1.0 - 0.1 * (2 + 5), -2.0 - 0.1 * (-4 + 5)])
    np.testing.assert_allclose(frozen.numpy(), [5.0])
    assert int(opt.global_step) == 1
    # a variable the optimizer did not know gets slots on the fly
    extra = jn.Variable(np.array([2.0]))
    adam = jn.optim.Adam([w], lr=0.1)
    adam.minimize(lambda: (extra * extra).sum(), var_list=[extra])
    np.testing.assert_allclose(extra.numpy(), [1.9], rtol=1e-6)


def test_minimize_with_embedding_updates_rows_sparsely():
    table = jn.Variable(np.ones((6, 2)))
    opt = jn.optim.SGD([table], lr=0.5)
    opt.minimize(lambda: embedding(table, [1, 1, 3]).sum())
    want = np.ones((6, 2))
    want[1] -= 1.0
    want[3] -= 0.5
    np.testing.assert_allclose(table.numpy(), want)


@pytest.mark.parametrize("make", [lambda ps: jn.optim.SGD(ps, lr=0.05, momentum=0.9),
                                  lambda ps: jn.optim.Adam(ps, lr=0.05),
                                  lambda ps: jn.optim.RMSProp(ps, lr=0.01, centered=True),
                                  lambda ps: jn.optim.AdaGrad(ps, lr=0.3)])
def test_regression_loss_falls(make):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype(np.float32)
    y = (x @ np.array([[1.5], [-2.0], [0.5]]) + 0.3).astype(np.float32)
    w = jn.Variable(np.zeros((3, 1), np.float32), name="w")
    b = jn.Variable(np.zeros((1,), np.float32), name="b")
    opt = make([w, b])
    X, Y = jn.tensor(x), jn.tensor(y)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = ((jn.matmul(X, w) + b - Y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.05 * losses[0]


@pytest.mark.parametrize("make", [lambda ps: jn.optim.Adam(ps, lr=0.1),
                                  lambda ps: jn.optim.RMSProp(ps, lr=0.1, momentum=0.5, centered=True),
                                  lambda ps: jn.optim.SGD(ps, lr=0.1, momentum=0.9)])
def test_state_dict_round_trip(make, tmp_path):
    gs = _grads((3, 2), steps=6, seed=11)
    p0 = np.random.default_rng(12).standard_normal((3, 2))

    def train(opt, p, grads):
        for g in grads:
            p.grad = jn.Tensor(g)
            opt.step()

    p = jn.Variable(p0)
    opt = make([p])
    train(opt, p, gs[:3])
    sd = opt.state_dict()
    assert isinstance(sd["global_step"], jn.Tensor) and int(sd["global_step"]) == 3
    assert all(isinstance(v, jn.Tensor) for slots in sd["state"].values() for v in slots.values())
    path = jn.save(sd, str(tmp_path / "opt.safetensors"))
    saved_p = p.numpy().copy()
    train(opt, p, gs[3:])
    want = p.numpy().copy()

    p2 = jn.Variable(saved_p)
    opt2 = make([p2])
    opt2.param_groups[0]["lr"] = 123.0                    # restored from the checkpoint
    opt2.load_state_dict(jn.load(path))
    assert int(opt2.global_step) == 3 and opt2.param_groups[0]["lr"] == pytest.approx(0.1)
    train(opt2, p2, gs[3:])
    np.testing.assert_allclose(p2.numpy(), want, rtol=1e-12)
    # the nested form works too, and a shape mismatch is reported
    opt3 = make([jn.Variable(saved_p)])
    opt3.load_state_dict(sd)
    bad = make([jn.Variable(np.zeros((2, 2)))])
    with pytest.raises(ValueError, match="shape"):
        bad.load_state_dict(sd)
