"""The training commands' models on the GPU: the vision models and the RL agents train on cuda with the CPU's
first losses (same seed), a jitted step moves nothing between host and device, checkpoints and evaluation work
on a cuda model, and every training command's ``python -m jitnet train MODEL --device cuda --smoke`` runs in a
simulator process of its own. Tiny shapes (4x4 images, widths of 2-8) keep the simulator fast."""
import csv
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

import jitnet as jn
from jitnet.models import _train, trainers
from jitnet.models import vision as V
from jitnet.models.dqn import DQNAgent
from jitnet.models.policy_gradient import PolicyGradientAgent
from jitnet.models.rl import CorridorEnv, train_agent

RNG = np.random.default_rng(3)
GRAY = RNG.random((6, 1, 4, 4)).astype(np.float32)          # 3 batches of 2 tiny "images"
RGB = RNG.random((6, 3, 6, 6)).astype(np.float32)
LABELS = RNG.integers(0, 10, 6)

BUILD = {
    "logreg": lambda dev, jit: V.LogisticRegression(lr=0.1, jit=jit, device=dev, in_features=16),
    "mlp": lambda dev, jit: V.MLP(hidden=(8,), jit=jit, device=dev, in_features=16),
    # dropout off: the comparison is of the arithmetic, not of two devices' random streams
    "cnn_mnist": lambda dev, jit: V.CNNMnist(channels=(2, 2), fc=4, size=4, dropout=0.0, jit=jit, device=dev),
    "cnn_cifar": lambda dev, jit: V.CNNCifar(channels=(2, 2), fc=(4, 4), crop=4, seed=1, jit=jit, device=dev),
    "autoencoder": lambda dev, jit: V.Autoencoder(code_size=2, hidden=(4,), in_features=16, jit=jit, device=dev),
}


def batches(name):
    x = RGB if name == "cnn_cifar" else GRAY
    return [(jn.tensor(x[i:i + 2]), jn.tensor(LABELS[i:i + 2])) for i in range(0, len(x), 2)]


def losses(name, dev, jit, steps=2, stats=None, raw=None):
    jn.random.seed(0)
    model = BUILD[name](dev, jit)
    out = []
    for batch in list(model.batches(batches(name)))[:steps]:
        assert all(t.device.type == jn.device(dev).type for t in batch)
        jn.cuda.reset_transfer_stats()
        r0 = dict(raw) if raw is not None else {}
        loss = model.train_step(*batch)
        if stats is not None:
            st = jn.cuda.transfer_stats()
            if raw is not None:          # the simulator's own count of copies, around the step alone
                st.update(raw_h2d=raw["h2d"] - r0["h2d"], raw_d2h=raw["d2h"] - r0["d2h"])
            stats.append(st)
        out.append(loss.item())
    return model, out


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(BUILD))
def test_first_losses_match_cpu_without_transfers_in_a_step(name, jit, raw_transfers):
    mc, lc = losses(name, "cpu", jit)
    stats = []
    mg, lg = losses(name, "cuda", jit, steps=2, stats=stats, raw=raw_transfers)
    np.testing.assert_allclose(lg, lc, rtol=2e-5, atol=1e-6)
    assert lc[0] != lc[1]                              # the first step changed the parameters
    assert all(p.is_cuda for p in mg.net.parameters())
    assert all(s.is_cuda for st in mg.opt.state.values() for s in st.values())
    # the first step uploads once (a jitted one its plan's constants; an eager one the optimizer's slots, created
    # as host zeros) and reads nothing back; the next step, measured around the step alone, moves nothing: its
    # loss (one scalar) is read afterwards
    assert all(st["d2h"] == st["raw_d2h"] == 0 for st in stats), stats
    assert stats[1]["h2d"] == stats[1]["raw_h2d"] == 0, stats


def test_fit_evaluates_checkpoints_and_restores_on_cuda(tmp_path):
    args = types.SimpleNamespace(epochs=1, batch_size=2, seed=0, resume=False, keep=1, no_progress=True,
                                 skip_nonfinite=None)
    data = (GRAY[:4], LABELS[:4], GRAY[4:], LABELS[4:])
    jn.random.seed(0)
    model = BUILD["mlp"]("cuda", True)
    m = _train.fit(model, args, data, str(tmp_path), "mlp")
    assert m["step"] == 2 and 0.0 <= m["test_accuracy"] <= 1.0 and np.isfinite(m["test_loss"])
    assert any(f.startswith("events.") for f in os.listdir(tmp_path))           # TensorBoard on a cuda run
    path = jn.io.Saver(str(tmp_path / "checkpoints")).latest_checkpoint()
    fresh = BUILD["mlp"]("cuda", True)
    assert _train.restore_checkpoint(path, fresh) == (1, 2)
    for a, b in zip(model.net.parameters(), fresh.net.parameters()):
        assert b.is_cuda
        np.testing.assert_array_equal(b.numpy(), a.numpy())
    np.testing.assert_allclose(fresh.predict(GRAY[4:]), model.predict(GRAY[4:]), rtol=1e-6)
    assert fresh.evaluate(GRAY[4:], LABELS[4:]) == pytest.approx(model.evaluate(GRAY[4:], LABELS[4:]))


def run_agent(make, dev, episodes, jit=True, learn_stats=None):
    agent = make(dev, jit)
    env = CorridorEnv(length=3, max_steps=4)
    got = []
    observe, learn = agent.observe, agent._learn_fn

    def counted_learn(*a):             # the update step alone: its inputs are on the device already
        assert all(t.device == jn.device(dev) for t in a)
        jn.cuda.reset_transfer_stats()
        out = learn(*a)
        learn_stats.append(jn.cuda.transfer_stats())
        return out
    if learn_stats is not None:
        agent._learn_fn = counted_learn

    def record(*a):
        loss = observe(*a)
        if loss is not None:
            got.append(loss)
        return loss
    agent.observe = record
    train_agent(agent, env, episodes, seed=0)
    return agent, got


AGENTS = {   # greedy acting (epsilon 0): the actions do not depend on a device's random stream
    "pg": lambda dev, jit: PolicyGradientAgent(3, 2, hidden=(4,), explore="egreedy", epsilon=0.0, seed=0,
                                               min_bucket=4, use_jit=jit, device=dev),
    "dqn": lambda dev, jit: DQNAgent(3, 2, hidden=(4,), buffer_size=16, batch_size=2, learning_starts=2, epsilon=0.0,
                                     seed=0, use_jit=jit, device=dev),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("kind", ["pg", "dqn"])
def test_agents_first_losses_match_cpu_and_count_transfers(kind, jit):
    episodes = 2 if kind == "pg" else 1          # pg: one update per episode; dqn: one per step from step 2
    _, lc = run_agent(AGENTS[kind], "cpu", episodes, jit)
    learn_stats = []
    agent, lg = run_agent(AGENTS[kind], "cuda", episodes, jit, learn_stats)
    assert len(lc) >= 2 and len(learn_stats) == len(lg)
    np.testing.assert_allclose(lg, lc, rtol=2e-5, atol=1e-6)
    # the first update uploads once (constants, optimizer slots); every later one moves nothing
    assert all(st["d2h"] == 0 for st in learn_stats) and all(st["h2d"] == 0 for st in learn_stats[1:]), learn_stats
    assert all(p.is_cuda for p in agent.net.parameters())
    jn.cuda.reset_transfer_stats()
    agent.act(np.eye(3, dtype=np.float32)[0])
    st = jn.cuda.transfer_stats()
    assert st["d2h"] == 1, st                      # the action
    if jit:                                        # (an eager act also uploads greedy_action's index row)
        assert st["h2d"] + st["d2h"] == agent.transfers_per_act, st


# ---- every training command: ``python -m jitnet train MODEL --device cuda --smoke`` in a fresh simulator process --

def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _finite(rows, *columns):
    vals = [float(r[c]) for r in rows for c in columns]
    assert vals and all(np.isfinite(vals)), (columns, rows)
    return vals


def _epoch_loss(out, name):
    """The train loss of the command's "NAME epoch 1: step 2, train loss X, ..." line."""
    m = re.search(rf"^{re.escape(name)} epoch 1: step 2, train loss (\S+),", out, re.M)
    assert m, out[-2000:]
    return float(m.group(1))


def _episodes(d):
    """Two episodes of at most 5 steps (--smoke's --max-episode-steps), each with a finite return."""
    rows = _rows(d / "returns.csv")
    _finite(rows, "return")
    return len(rows) == 2 and all(1 <= int(r["length"]) <= 5 for r in rows)


def _vision(d, out):
    return _finite(_rows(d / "metrics.csv"), "train_loss", "test_loss")


# each command's log besides its checkpoint: a finite loss, the episodes --smoke asks for, ...
SMOKE_LOGS = {
    "logreg": _vision, "mlp": _vision, "cnn_mnist": _vision, "cnn_cifar": _vision,
    "autoencoder": lambda d, out: _finite(_rows(d / "metrics.csv"), "train_loss", "test_l2"),
    "seq2seq-dates": lambda d, out: np.isfinite(_epoch_loss(out, "seq2seq-dates")) and
    _finite(_rows(d / "metrics.csv"), "char_accuracy"),
    "seq2seq-reverse": lambda d, out: np.isfinite(_epoch_loss(out, "seq2seq-reverse")) and
    _finite(_rows(d / "metrics.csv"), "char_accuracy"),
    "dnc-copy": lambda d, out: _finite(_rows(d / "metrics.csv"), "train_loss", "bit_error"),
    "dnc-babi": lambda d, out: _finite(_rows(d / "metrics.csv"), "train_loss"),
    "pg-cartpole": lambda d, out: _episodes(d),
    "dqn-cartpole": lambda d, out: _episodes(d),
}
COMMANDS = sorted(SMOKE_LOGS) + ["skipgram"]


def test_every_training_command_has_a_smoke_test():
    assert sorted(COMMANDS) == sorted(trainers())


@pytest.mark.parametrize("model", COMMANDS)
def test_cli_smoke_on_cuda(model, tmp_path):
    """Each command builds its model on cuda, trains a few jitted steps, evaluates and writes what it writes,
    in a process of its own (the simulator as CI runs it)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-m", "jitnet", "train", model, "--device", "cuda", "--smoke",
                        "--no-progress", "--logdir", str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    if model == "skipgram":          # the word2vec fast path: vectors, no optimizer state
        assert "128 words" in r.stdout
        vecs = np.loadtxt(tmp_path / "vectors.txt", skiprows=1, usecols=range(1, 9))
        assert vecs.shape == (12, 8) and np.isfinite(vecs).all() and np.abs(vecs).max() > 0
        return
    assert SMOKE_LOGS[model](tmp_path, r.stdout), r.stdout[-2000:]
    state = jn.io.load(jn.io.latest_checkpoint(str(tmp_path / "checkpoints")))
    floats = [np.asarray(v) for v in state.values() if np.asarray(v).dtype.kind == "f"]
    assert floats and all(np.isfinite(v).all() for v in floats)
    steps = [int(np.asarray(v)) for k, v in state.items() if k.endswith("global_step")]
    assert steps and max(steps) >= 2, {k: v for k, v in state.items() if k.endswith("global_step")}
