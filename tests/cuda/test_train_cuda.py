"""Training on the GPU: eager and jitted steps match the CPU, and a step makes no host<->device transfer besides
the ones the user asks for (``item()``); fused groups of a jitted GPU step become generated CUDA kernels."""
import numpy as np
import pytest

import jitnet as jn
import jitnet.nn as nn
import jitnet.nn.functional as F

RNG = np.random.default_rng(7)
X = RNG.normal(size=(6, 5)).astype(np.float32)
Y = RNG.integers(0, 3, 6)


def mlp(dev):
    jn.random.seed(3)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(dev)


def train(dev, make_opt, steps=2, jit=False, model=None, x=X, y=Y, raw=None):
    m = model(dev) if model is not None else mlp(dev)
    opt = make_opt(m.parameters())

    def step(xb, yb):
        opt.zero_grad()
        loss = F.cross_entropy(m(xb), yb)
        loss.backward()
        opt.step()
        return loss

    if jit:
        step = jn.jit(step)
    xb, yb = jn.tensor(x).to(dev), jn.tensor(y).to(dev)
    losses, stats = [], []
    for _ in range(steps):
        jn.cuda.reset_transfer_stats()
        r0 = dict(raw) if raw is not None else None
        loss = step(xb, yb)
        st = jn.cuda.transfer_stats()
        if raw is not None:                    # the simulator's own count of copies agrees
            st["raw_h2d"], st["raw_d2h"] = raw["h2d"] - r0["h2d"], raw["d2h"] - r0["d2h"]
        stats.append(st)
        losses.append(loss.item())
    return m, losses, stats, step, (xb, yb)


def check_same(make_opt, jit=False, model=None, x=X, y=Y, steps=2, raw=None):
    mc, lc, _, _, _ = train("cpu", make_opt, steps, jit, model, x, y)
    mg, lg, stats, step, args = train("cuda", make_opt, steps, jit, model, x, y, raw)
    np.testing.assert_allclose(lg, lc, rtol=1e-5)
    for pc, pg in zip(mc.parameters(), mg.parameters()):
        assert pg.is_cuda
        np.testing.assert_allclose(pg.numpy(), pc.numpy(), rtol=1e-5, atol=1e-6)
    for st in stats:                               # the step itself moved nothing between host and device
        assert st["h2d"] == 0 and st["d2h"] == 0 and st.get("raw_h2d", 0) == 0 and st.get("raw_d2h", 0) == 0, st
    return mg, step, args


def test_eager_mlp_step_matches_cpu_without_transfers(raw_transfers):
    check_same(lambda ps: jn.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), raw=raw_transfers)


def test_jitted_mlp_step_runs_a_gpu_plan_with_fused_cuda_kernels(raw_transfers):
    m, step, args = check_same(lambda ps: jn.optim.Adam(ps, lr=0.01), jit=True, steps=3, raw=raw_transfers)
    comps = list(step._cache.values())
    assert len(comps) == 1 and "cuda" in comps[0].plan.devices
    plan = comps[0].plan
    cuda_sources = [s for s in plan.sources if "@cuda.jit" in s]
    names = ["+".join(m.prim.name for m in g.members) for g in plan.groups]
    assert "add+relu" in names and "greater+where" in names
    assert len(cuda_sources) >= 3          # every group on the GPU (the step counter's groups stay on the host)
    assert any(n.startswith("cross_entropy_int_reduced") for n in plan.step_names), plan.step_names
    text = jn.explain(step, *args, file=open("/dev/null", "w"))
    assert "(cuda)" in text and "@cuda.jit" in text


@pytest.mark.parametrize("make_opt", [
    lambda ps: jn.optim.AdaGrad(ps, lr=0.1),
    lambda ps: jn.optim.RMSProp(ps, lr=0.01, momentum=0.5, centered=True),
    lambda ps: jn.optim.SGD(ps, lr=0.1, weight_decay=0.01),
], ids=["adagrad", "rmsprop-centered-momentum", "sgd-weight-decay"])
def test_other_optimizers_match_cpu(make_opt):
    check_same(make_opt)


class EmbedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, ids):
        return self.out(self.emb(ids).mean(axis=1))


def embed_model(dev):
    jn.random.seed(11)
    return EmbedModel().to(dev)


@pytest.mark.parametrize("make_opt", [lambda ps: jn.optim.SGD(ps, lr=0.5, momentum=0.9),
                                      lambda ps: jn.optim.Adam(ps, lr=0.05)], ids=["sgd", "adam"])
def test_embedding_sparse_updates_match_cpu(make_opt):
    ids = np.array([[1, 1, 4], [0, 8, 4], [2, 2, 2], [8, 7, 1]])
    check_same(make_opt, model=embed_model, x=ids, y=np.array([0, 2, 1, 1]))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        h = F.max_pool2d(jn.relu(self.conv(x)), 2)
        return self.fc(jn.reshape(h, (h.shape[0], -1)))


def cnn(dev):
    jn.random.seed(5)
    return SmallCNN().to(dev)


def test_cnn_step_matches_cpu_without_transfers():
    x = RNG.normal(size=(2, 1, 4, 4)).astype(np.float32)
    check_same(lambda ps: jn.optim.SGD(ps, lr=0.1), model=cnn, x=x, y=np.array([0, 2]), steps=1)


def test_optimizer_built_before_the_move_follows_its_parameters():
    m = mlp("cpu")
    opt = jn.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m.to("cuda")
    loss = F.cross_entropy(m(jn.tensor(X).to("cuda")), jn.tensor(Y).to("cuda"))
    loss.backward()
    opt.step()
    assert all(s.is_cuda for st in opt.state.values() for s in st.values())
    assert not opt.global_step.is_cuda and int(opt.global_step) == 1


def test_jit_retraces_when_inputs_change_device():
    @jn.jit
    def f(a):
        return (a * 2).sum()
    a = jn.tensor([1.0, 2.0])
    assert f(a).item() == 6.0 and not f(a).is_cuda
    r = f(a.to("cuda"))
    assert r.is_cuda and r.item() == 6.0
    assert len(f._cache) == 2


def test_jitted_outputs_are_recycled_only_once_dropped():
    f = jn.jit(lambda v: jn.relu(v * 2.0 + 1.0) * v - 0.5)
    x = jn.tensor(np.arange(6, dtype=np.float32) - 3).to("cuda")
    ref = np.maximum(np.arange(6) * 2.0 - 5, 0) * (np.arange(6) - 3) - 0.5
    held = [f(x) for _ in range(3)]
    assert len({id(h._data) for h in held}) == 3         # results the caller holds are never overwritten
    for h in held:
        np.testing.assert_allclose(h.numpy(), ref)
    seen = set()
    for _ in range(3):
        seen.add(id(f(x)._data))
    assert len(seen) <= 2                                 # dropped results are reused
    v = f(x)
    tail = v[1:]                                          # a view keeps its base alive
    del v
    f(x)
    f(x)
    np.testing.assert_allclose(tail.numpy(), ref[1:])


def test_gpu_plans_get_the_cpu_plan_passes_views_read_in_place_and_groups_written_into_variables():
    """One plan builder for every device: a step on CUDA tensors reads basic slices inside its fused kernel
    (no getitem step) and a group assigned to a variable writes into the variable's array (no assign step)."""
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((3, 4)).astype(np.float32)
    lin = nn.Linear(3, 4).to("cuda")
    w = lin.W
    w.assign(jn.tensor(w0).to("cuda"))
    hn = rng.standard_normal((6, 8)).astype(np.float32)
    h = jn.tensor(hn).to("cuda")

    @jn.jit
    def step(h):
        a = jn.tanh(h[:, 0:4]) * jn.sigmoid(h[:, 4:8])
        w.assign(w * 0.5 + 1.0)
        return a

    for _ in range(2):
        a = step(h)
    plan = list(step._cache.values())[0].plan
    assert plan.devices == ["cuda"]
    assert not any(n.startswith("getitem") or n.startswith("assign") for n in plan.step_names), plan.step_names
    assert "fused[tanh+sigmoid+multiply] -> (6, 4)" in plan.step_names
    assert "fused[multiply+add+assign] -> (3, 4)" in plan.step_names
    assert a.is_cuda and w.is_cuda
    np.testing.assert_allclose(a.numpy(), np.tanh(hn[:, :4]) / (1 + np.exp(-hn[:, 4:])), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.numpy(), w0 * 0.25 + 1.5, rtol=1e-6)
