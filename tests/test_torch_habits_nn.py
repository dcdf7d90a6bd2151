"""PyTorch habits in nn and optim: AdamW, lr_scheduler, loss modules, register_buffer/apply, nn.utils clipping.

References are hand-written NumPy / the formulas PyTorch documents (torch itself is not a test dependency here).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import jitnet as jn
from jitnet.optim import lr_scheduler as S


def ref_adamw(p, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.01):
    p = p.copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        out.append(p.copy())
    return out


@pytest.mark.parametrize("shape", [(3, 4), pytest.param((300, 300), marks=pytest.mark.slow)])   # parallel kernel
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_numpy_eager(shape, wd):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(shape)
    gs = [rng.standard_normal(shape) for _ in range(3)]
    p = jn.Variable(p0.copy())
    opt = jn.optim.AdamW([p], lr=0.05, weight_decay=wd)
    got = []
    for g in gs:
        p.grad = jn.Tensor(g)
        opt.step()
        got.append(p.numpy().copy())
    for k, (a, b) in enumerate(zip(got, ref_adamw(p0, gs, lr=0.05, wd=wd))):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"after step {k + 1}")
    # decoupled decay differs from Adam's L2 term
    if wd:
        q = jn.Variable(p0.copy())
        adam = jn.optim.Adam([q], lr=0.05, weight_decay=wd)
        for g in gs:
            q.grad = jn.Tensor(g)
            adam.step()
        assert not np.allclose(q.numpy(), got[-1])


def _mlp(seed):
    rng = np.random.default_rng(seed)
    w = jn.Variable(rng.standard_normal((4, 3)).astype(np.float32))
    b = jn.Variable(np.zeros(3, np.float32))
    return w, b


def test_adamw_jitted_step_matches_numpy_and_follows_a_scheduler():
    rng = np.random.default_rng(1)
    x = jn.Tensor(rng.standard_normal((5, 4)).astype(np.float32))
    w, b = _mlp(2)
    opt = jn.optim.AdamW([w, b], lr=0.1, weight_decay=0.5)
    sched = S.StepLR(opt, step_size=1, gamma=0.5)

    @jn.jit
    def step(x):
        opt.zero_grad()
        loss = jn.sum((x @ w + b) ** 2)
        loss.backward()
        opt.step()
        return loss

    # reference: gradient of sum((xw+b)^2) in NumPy, AdamW by hand, lr halved after each step
    xn = x.numpy().astype(np.float64)
    wn, bn = w.numpy().astype(np.float64), b.numpy().astype(np.float64)
    m = [np.zeros_like(wn), np.zeros_like(bn)]
    v = [np.zeros_like(wn), np.zeros_like(bn)]
    for t in range(1, 4):
        lr = 0.1 * 0.5 ** (t - 1)
        assert sched.get_last_lr() == [pytest.approx(lr)]
        step(x)
        sched.step()
        r = 2 * (xn @ wn + bn)
        ps = [wn, bn]
        for i, g in enumerate([xn.T @ r, r.sum(0)]):
            ps[i] = ps[i] * (1 - lr * 0.5)
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            ps[i] = ps[i] - lr * (m[i] / (1 - 0.9 ** t)) / (np.sqrt(v[i] / (1 - 0.999 ** t)) + 1e-8)
        wn, bn = ps
        np.testing.assert_allclose(w.numpy(), wn, rtol=2e-4, atol=1e-5, err_msg=f"step {t}")
        np.testing.assert_allclose(b.numpy(), bn, rtol=2e-4, atol=1e-5, err_msg=f"step {t}")
    assert int(opt.global_step) == 3


def _lrs(make, n, base=1.0, groups=1):
    p = [jn.Variable(np.zeros(1)) for _ in range(groups)]
    opt = jn.optim.SGD([{"params": [q], "lr": base * (j + 1)} for j, q in enumerate(p)])
    s = make(opt)
    out = [s.get_last_lr()]
    for _ in range(n):
        opt.step()
        s.step()
        out.append(s.get_last_lr())
    return out, opt, s


def test_step_lambda_cosine_schedulers_follow_the_documented_formulas():
    got, opt, _ = _lrs(lambda o: S.StepLR(o, step_size=3, gamma=0.1), 7, base=0.5)
    np.testing.assert_allclose([g[0] for g in got], [0.5 * 0.1 ** (e // 3) for e in range(8)])
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(got[-1][0])
    got, _, _ = _lrs(lambda o: S.LambdaLR(o, [lambda e: 0.9 ** e, lambda e: 1.0 / (e + 1)]), 5, groups=2)
    np.testing.assert_allclose([g[0] for g in got], [0.9 ** e for e in range(6)])
    np.testing.assert_allclose([g[1] for g in got], [2.0 / (e + 1) for e in range(6)])
    got, _, _ = _lrs(lambda o: S.CosineAnnealingLR(o, T_max=4, eta_min=0.1), 4)
    np.testing.assert_allclose([g[0] for g in got],
                               [0.1 + 0.9 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(5)])
    assert got[-1][0] == pytest.approx(0.1)


def test_one_cycle_lr_phases():
    T, mx = 10, 1.0
    got, opt, _ = _lrs(lambda o: S.OneCycleLR(o, max_lr=mx, total_steps=T, pct_start=0.3), T - 1)
    init, low = mx / 25, mx / 25 / 1e4
    up = 0.3 * T - 1

    def want(s):
        if s <= up:
            pct, a, b = s / up, init, mx
        else:
            pct, a, b = (s - up) / (T - 1 - up), mx, low
        return b + (a - b) / 2 * (math.cos(math.pi * pct) + 1)
    np.testing.assert_allclose([g[0] for g in got], [want(s) for s in range(T)], rtol=1e-12)
    assert got[0][0] == pytest.approx(init) and got[2][0] == pytest.approx(mx) and got[-1][0] == pytest.approx(low)
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(init)
    lin, _, _ = _lrs(lambda o: S.OneCycleLR(o, max_lr=mx, epochs=2, steps_per_epoch=5, anneal_strategy="linear",
                                            three_phase=True), 9)
    # three phases: up to step 2, down to the initial rate at step 4, then to the minimum at step 9
    np.testing.assert_allclose([lin[s][0] for s in (0, 1, 2, 3, 4, 9)],
                               [init, (init + mx) / 2, mx, (init + mx) / 2, init, low], rtol=1e-12)
    with pytest.raises(ValueError, match="cycle_momentum"):
        S.OneCycleLR(jn.optim.SGD([jn.Variable(np.zeros(1))], lr=0.1), max_lr=1.0, total_steps=5,
                     cycle_momentum=True)
    with pytest.raises(ValueError, match="total_steps"):
        S.OneCycleLR(jn.optim.SGD([jn.Variable(np.zeros(1))], lr=0.1), max_lr=1.0)


def test_reduce_lr_on_plateau():
    p = jn.Variable(np.zeros(1))
    opt = jn.optim.SGD([p], lr=1.0)
    s = S.ReduceLROnPlateau(opt, factor=0.5, patience=1, cooldown=1, min_lr=0.2)
    lrs = []
    for metric in [5, 4, 4, 4, 4, 4, 4, 4, 3.0]:
        s.step(jn.Tensor(np.float64(metric)))
        lrs.append(s.get_last_lr()[0])
    # improve, improve; bad 1; bad 2 > patience -> 0.5 (cooldown 1); cooldown; bad 1; bad 2 -> 0.25; cooldown;
    # improvement
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    for _ in range(5):
        s.step(10.0)
    assert s.get_last_lr() == [0.2]                      # floored at min_lr
    mx = S.ReduceLROnPlateau(jn.optim.SGD([jn.Variable(np.zeros(1))], lr=1.0), mode="max", patience=0,
                             threshold=0.1, threshold_mode="abs")
    mx.step(1.0)
    mx.step(1.05)                                       # not better by more than 0.1 -> reduce at once
    assert mx.get_last_lr() == [pytest.approx(0.1)]
    with pytest.raises(TypeError, match="metric"):
        mx.step("bad")


def test_scheduler_errors_and_state():
    sched = jn.optim.exponential_decay(1.0, 1, 0.5)
    with pytest.raises(TypeError, match="already has a learning-rate schedule"):
        S.StepLR(jn.optim.SGD([jn.Variable(np.zeros(1))], lr=sched), step_size=1)
    with pytest.raises(ValueError, match="step_size"):
        S.StepLR(jn.optim.SGD([jn.Variable(np.zeros(1))], lr=0.1), step_size=0)
    _, opt, s = _lrs(lambda o: S.StepLR(o, step_size=1, gamma=0.5), 2)
    sd = opt.state_dict()
    assert float(sd["param_groups"]["0"]["lr"]) == pytest.approx(0.25)
    st = s.state_dict()
    s.step()
    s.load_state_dict(st)
    assert s.get_last_lr() == [0.25] and float(opt.param_groups[0]["lr"]) == 0.25
    opt.param_groups[0]["lr"].assign(np.float64(9.0))
    opt.load_state_dict(sd)
    assert float(opt.param_groups[0]["lr"]) == 0.25


# -- loss modules ------------------------------------------------------------------------------------------------

def test_loss_modules_match_formulas():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3))
    y = np.array([0, 2, 1, -100])
    ls = x - np.log(np.exp(x).sum(1, keepdims=True))
    ce = -ls[np.arange(3), y[:3]]
    assert jn.nn.CrossEntropyLoss()(jn.Tensor(x), jn.Tensor(y)).item() == pytest.approx(ce.mean())
    assert jn.nn.CrossEntropyLoss(reduction="sum")(jn.Tensor(x), jn.Tensor(y)).item() == pytest.approx(ce.sum())
    t = rng.standard_normal((4, 3))
    d = x - t
    assert jn.nn.MSELoss()(jn.Tensor(x), jn.Tensor(t)).item() == pytest.approx((d * d).mean())
    np.testing.assert_allclose(jn.nn.L1Loss(reduction="none")(jn.Tensor(x), jn.Tensor(t)).numpy(), np.abs(d))
    hub = np.where(np.abs(d) <= 0.5, 0.5 * d * d, 0.5 * (np.abs(d) - 0.25))
    assert jn.nn.HuberLoss(delta=0.5)(jn.Tensor(x), jn.Tensor(t)).item() == pytest.approx(hub.mean())
    assert jn.nn.SmoothL1Loss(beta=0.5)(jn.Tensor(x), jn.Tensor(t)).item() == pytest.approx(hub.mean() / 0.5)
    z = (rng.random((4, 3)) > 0.5).astype(np.float64)
    bce = np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))
    assert jn.nn.BCEWithLogitsLoss(reduction="sum")(jn.Tensor(x), jn.Tensor(z)).item() == pytest.approx(bce.sum())
    with pytest.raises(ValueError, match="reduction"):
        jn.nn.MSELoss(reduction="avg")
    with pytest.raises(ValueError, match="ignore_index"):
        jn.nn.CrossEntropyLoss(ignore_index=3)
    with pytest.raises(ValueError, match="weight"):
        jn.nn.CrossEntropyLoss(weight=np.ones(3))
    assert jn.nn.MSELoss().parameters() == []


# -- Module habits -----------------------------------------------------------------------------------------------

class _Net(jn.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = jn.nn.Linear(2, 2)
        self.head = jn.nn.Sequential(jn.nn.Linear(2, 1), jn.nn.ReLU())
        self.register_buffer("steps", np.zeros(3))


def test_register_buffer_apply_named_modules():
    net = _Net()
    assert "steps" in net.state_dict() and all(p.name != "steps" for p in net.parameters())
    assert [n for n, _ in net.named_buffers()] == ["steps"]
    assert isinstance(net.steps, jn.Tensor) and not net.steps.trainable
    sd = {k: v.numpy() + 1 for k, v in net.state_dict().items()}
    net.load_state_dict(sd)
    np.testing.assert_allclose(net.steps.numpy(), 1.0)
    assert net.to("cpu").steps.device == jn.Tensor(np.zeros(1)).device
    with pytest.raises(KeyError, match="already a parameter"):
        net.fc.register_buffer("W", np.zeros(1))
    with pytest.raises(ValueError, match="persistent"):
        net.register_buffer("tmp", np.zeros(1), persistent=False)
    with pytest.raises(KeyError, match="invalid buffer name"):
        net.register_buffer("a.b", np.zeros(1))
    names = [n for n, _ in net.named_modules()]
    assert names == ["", "fc", "head", "head/0", "head/1"]
    seen = []
    assert net.apply(lambda m: seen.append(type(m).__name__)) is net
    assert seen == ["Linear", "Linear", "ReLU", "Sequential", "_Net"]
    net.apply(lambda m: m.W.assign(np.zeros(m.W.shape)) if isinstance(m, jn.nn.Linear) else None)
    assert all(not p.numpy().any() for n, p in net.named_parameters() if n.endswith("W"))


def test_clip_grad_norm_and_value():
    a, b = jn.Variable(np.zeros(2)), jn.Variable(np.zeros(1))
    c = jn.Variable(np.zeros(1))                          # no grad: skipped
    a.grad, b.grad = jn.Tensor(np.array([3.0, 0.0])), jn.Tensor(np.array([4.0]))
    norm = jn.nn.utils.clip_grad_norm_([a, b, c], max_norm=1.0)
    assert float(norm) == pytest.approx(5.0)
    np.testing.assert_allclose(a.grad.numpy(), [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(b.grad.numpy(), [0.8], rtol=1e-6)
    assert c.grad is None
    jn.nn.utils.clip_grad_value_(a, 0.5)
    np.testing.assert_allclose(a.grad.numpy(), [0.5, 0.0])
    with pytest.raises(ValueError, match="norm_type"):
        jn.nn.utils.clip_grad_norm_([a], 1.0, norm_type=1)


def test_module_casts_floating_variables_in_place_and_keeps_the_objects():
    net = jn.nn.Sequential(jn.nn.Linear(3, 4), jn.nn.Linear(4, 2))
    net.register_buffer("steps", jn.tensor(np.array(7, np.int64)))
    params = list(net.parameters())
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    ref = net(jn.tensor(x)).numpy()
    assert net.half() is net and [p.dtype for p in net.parameters()] == [np.dtype(np.float16)] * 4
    assert net.steps.dtype == np.int64                       # integer buffers keep their dtype
    np.testing.assert_allclose(net(jn.tensor(x.astype(np.float16))).numpy().astype(np.float32), ref,
                               rtol=2e-2, atol=2e-2)
    net.to("cpu", jn.float64)
    assert list(net.parameters()) == params and {p.dtype for p in net.parameters()} == {np.dtype(np.float64)}
    net.float()
    np.testing.assert_allclose(net(jn.tensor(x)).numpy(), ref, rtol=2e-2, atol=2e-2)
    with pytest.raises(TypeError, match="floating dtype"):
        net.to(jn.int32)
    with pytest.raises(ValueError, match="unknown device"):
        net.to("gpu")
