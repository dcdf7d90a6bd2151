"""Reinforcement-learning pieces: discounted returns, the replay buffer, schedules, agents on a tiny env."""
import importlib.util

import numpy as np
import pytest

import jitnet as jn
from jitnet.models import get_trainer
from jitnet.models.dqn import DQNAgent, ReplayBuffer, copy_parameters
from jitnet.models.policy_gradient import PolicyGradientAgent, bucket_size, discounted_returns
from jitnet.models.rl import (ConstantSchedule, CorridorEnv, ExponentialSchedule, LinearSchedule, env_spaces,
                              greedy_action, make_env, make_schedule, train_agent)

HAS_GYM = importlib.util.find_spec("gymnasium") is not None


# -- discounted returns ---------------------------------------------------------------------------------------------

def test_discounted_returns_one_episode():
    np.testing.assert_allclose(discounted_returns([1, 1, 1], 0.5), [1.75, 1.5, 1.0])
    np.testing.assert_allclose(discounted_returns([0, 0, 1], 0.9), [0.81, 0.9, 1.0], rtol=1e-6)
    np.testing.assert_allclose(discounted_returns([2.0], 0.99), [2.0])
    assert discounted_returns([], 0.9).shape == (0,)


def test_discounted_returns_restart_at_episode_ends():
    r = [1, 2, 3, 4, 5]
    d = [False, True, False, False, True]
    # episode 1: [1 + .5*2, 2]; episode 2: [3 + .5*4 + .25*5, 4 + .5*5, 5]
    np.testing.assert_allclose(discounted_returns(r, 0.5, d), [2.0, 2.0, 6.25, 6.5, 5.0])
    assert discounted_returns(r, 0.5, d).dtype == np.float32
    with pytest.raises(ValueError, match="dones"):
        discounted_returns(r, 0.5, [True])


def test_bucket_size():
    assert [bucket_size(n) for n in (1, 64, 65, 500, 1024, 1025)] == [64, 64, 128, 512, 1024, 2048]
    assert bucket_size(3, minimum=4) == 4


# -- replay buffer ----------------------------------------------------------------------------------------------------

def test_replay_buffer_stores_done_per_transition_and_wraps():
    buf = ReplayBuffer(3, (2,))
    for i in range(5):                       # 5 transitions into 3 slots: 0 and 1 are overwritten by 3 and 4
        buf.add([i, i], i % 2, float(i), [i + 1, i + 1], done=(i == 3))
    assert len(buf) == 3 and buf.pos == 2
    o, a, r, o2, d = buf.get(np.arange(3))
    np.testing.assert_array_equal(r, [3.0, 4.0, 2.0])                 # slot 0 <- 3, slot 1 <- 4, slot 2 kept
    np.testing.assert_array_equal(o[:, 0], [3, 4, 2])
    np.testing.assert_array_equal(o2[:, 0], [4, 5, 3])
    np.testing.assert_array_equal(a, [1, 0, 0])
    np.testing.assert_array_equal(d, [1.0, 0.0, 0.0])                 # the flag travels with transition 3
    assert buf.dones.dtype == np.float32


def test_replay_buffer_sampling_is_uniform_over_filled_slots():
    buf = ReplayBuffer(100, (1,))
    for i in range(10):
        buf.add([i], 0, float(i), [i], done=False)
    _, _, r, _, _ = buf.sample(5000, np.random.default_rng(0))
    assert set(np.unique(r)) == set(map(float, range(10)))            # never an empty slot
    counts = np.bincount(r.astype(int), minlength=10)
    assert counts.min() > 400 and counts.max() < 600
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(4, (1,)).sample(2)


def test_dqn_target_masks_bootstrap_on_terminal():
    jn.random.seed(0)
    agent = DQNAgent(2, 2, hidden=(8,), lr=0.0, gamma=0.5, learning_starts=10**9, optimizer="sgd", use_jit=False)
    s2 = np.array([[1.0, -1.0], [1.0, -1.0]], np.float32)
    qmax = agent.target(jn.tensor(s2)).numpy().max(1)
    q = agent.net(jn.tensor(s2)).numpy()
    # a batch of the same state and action with done 0 and 1: the squared loss is the mean of both errors
    onehot = np.eye(2, dtype=np.float32)[[0, 0]]
    agent.loss = "mse"
    loss = agent._learn_fn(jn.tensor(s2), jn.tensor(onehot), jn.tensor([1.0, 1.0]), jn.tensor(s2),
                           jn.tensor([0.0, 1.0])).item()
    y = np.array([1.0 + 0.5 * qmax[0], 1.0])
    np.testing.assert_allclose(loss, np.mean((q[:, 0] - y) ** 2), rtol=1e-5)


def _filled(agent):
    r = np.random.default_rng(1)
    for i in range(100):
        agent.buffer.add(r.standard_normal(2), i % 2, 1.0, r.standard_normal(2), i % 7 == 0)
    agent.rng = np.random.default_rng(5)
    return agent


def test_dqn_jitted_update_matches_eager_with_soft_target():
    agents = [_filled(DQNAgent(2, 2, hidden=(8,), batch_size=16, learning_starts=10**9, tau=0.1, seed=3,
                               use_jit=j)) for j in (False, True)]
    before = agents[1].target[0].W.numpy().copy()
    for a in agents:
        for _ in range(3):
            a.update()
    for m in ("net", "target"):
        for p, q in zip(getattr(agents[0], m).parameters(), getattr(agents[1], m).parameters()):
            np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.array_equal(before, agents[1].target[0].W.numpy())  # the soft update ran inside the graph


def test_copy_parameters():
    a, b = jn.nn.Linear(3, 2), jn.nn.Linear(3, 2)
    copy_parameters(a, b)
    np.testing.assert_array_equal(a.W.numpy(), b.W.numpy())
    a.W.assign(a.W.numpy() + 1)
    assert not np.array_equal(a.W.numpy(), b.W.numpy())               # a copy, not shared storage


# -- schedules --------------------------------------------------------------------------------------------------------

def test_schedules():
    s = LinearSchedule(1.0, 0.1, 10)
    assert s(0) == 1.0 and s(5) == pytest.approx(0.55) and s(10) == pytest.approx(0.1) and s(1000) == 0.1
    e = ExponentialSchedule(1.0, 0.05, 0.5)
    assert e(0) == 1.0 and e(2) == 0.25 and e(100) == 0.05
    assert ConstantSchedule(0.3)(7) == 0.3
    assert make_schedule("linear:1,0.05,100")(50) == pytest.approx(0.525)
    assert make_schedule("exp:1,0.1,0.9")(1) == pytest.approx(0.9)
    assert make_schedule(0.2)(9) == 0.2 and make_schedule("0.2")(9) == 0.2
    with pytest.raises(ValueError):
        make_schedule("cosine:1,2")


# -- in-graph action selection ----------------------------------------------------------------------------------------

def test_greedy_action_jit_and_sampling_is_a_graph_node():
    v = np.array([[0.1, 0.5, 0.5], [2.0, -1.0, 0.0]], np.float32)
    np.testing.assert_array_equal(greedy_action(jn.tensor(v)).numpy(), [1, 0])
    np.testing.assert_array_equal(jn.jit(greedy_action)(jn.tensor(v)).numpy(), [1, 0])
    jn.random.seed(0)
    agent = PolicyGradientAgent(3, 2, hidden=(4,))
    agent.net[0].W.assign(np.zeros((3, 4), np.float32))
    agent.net[2].b.assign(np.array([0.0, np.log(3.0)], np.float32))  # pi = (0.25, 0.75)
    acts = [agent.act(np.zeros(3)) for _ in range(800)]
    assert 0.68 < np.mean(acts) < 0.82                                 # new draws on every run of the plan


def test_epsilon_greedy_act_respects_epsilon():
    agent = DQNAgent(2, 4, hidden=(4,), epsilon=0.0, seed=0)
    greedy = int(np.argmax(agent.q_values(np.ones(2))[0]))
    assert all(agent.act(np.ones(2)) == greedy for _ in range(50))
    agent.epsilon = ConstantSchedule(1.0)
    acts = [agent.act(np.ones(2)) for _ in range(400)]
    assert set(acts) == {0, 1, 2, 3}


# -- agents learn a tiny deterministic environment ------------------------------------------------------------------

def test_corridor_env_api():
    env = make_env("corridor", length=3, max_steps=4)
    assert env_spaces(env) == ((3,), 2)
    o, _ = env.reset(seed=0)
    np.testing.assert_array_equal(o, [1, 0, 0])
    assert env.step(0)[1:4] == (0.0, False, False)
    assert env.step(1)[1:4] == (0.0, False, False)
    assert env.step(1)[1:4] == (1.0, True, False)
    env.reset()
    for _ in range(3):
        env.step(0)
    assert env.step(0)[3] is True                                      # truncated at max_steps


def test_policy_gradient_learns_corridor():
    env = CorridorEnv(length=4, max_steps=12, step_reward=-0.1)
    agent = PolicyGradientAgent(4, 2, hidden=(8,), lr=0.05, gamma=0.9, batch_episodes=2, seed=1)
    res = train_agent(agent, env, 300, seed=0, target=0.65, window=10)
    assert res["solved_episode"] is not None, res["returns"][-10:]      # the optimum is 1 - 0.2 = 0.8
    probs = agent.policy(np.eye(4, dtype=np.float32)[:3])
    assert (probs[:, 1] > 0.7).all()


def test_policy_gradient_egreedy_and_eager_match_api():
    env = CorridorEnv(length=3, max_steps=8)
    agent = PolicyGradientAgent(3, 2, hidden=(8,), lr=0.05, explore="egreedy", epsilon="linear:1,0,20",
                                seed=0, use_jit=False)
    res = train_agent(agent, env, 30, seed=0)
    assert len(res["returns"]) == 30 and agent.updates == 30
    assert agent.stats["epsilon"] == 0.0


def test_dqn_learns_corridor():
    env = CorridorEnv(length=4, max_steps=12, step_reward=-0.1)
    agent = DQNAgent(4, 2, hidden=(16,), lr=0.01, gamma=0.9, buffer_size=500, batch_size=16,
                     learning_starts=32, target_update=20, tau=None, epsilon="linear:1,0.0,300", seed=0)
    res = train_agent(agent, env, 300, seed=0, target=0.75, window=10)
    assert res["solved_episode"] is not None, res["returns"][-10:]
    q = agent.q_values(np.eye(4, dtype=np.float32)[:3])
    assert (q[:, 1] > q[:, 0]).all()


def test_checkpoint_roundtrip_and_logs(tmp_path):
    env = CorridorEnv(length=3, max_steps=6)
    agent = DQNAgent(3, 2, hidden=(8,), learning_starts=4, batch_size=4, seed=0)
    res = train_agent(agent, env, 5, seed=0, logdir=str(tmp_path), checkpoint_every=2)
    assert (tmp_path / "returns.csv").read_text().count("\n") == 6
    path = jn.io.latest_checkpoint(str(tmp_path / "checkpoints"))
    other = DQNAgent(3, 2, hidden=(8,), seed=5)
    other.load_state_dict(jn.io.load(path))
    np.testing.assert_array_equal(other.q_values(np.eye(3)), agent.q_values(np.eye(3)))
    assert other.steps == res["steps"]
    pg = PolicyGradientAgent(3, 2, hidden=(4,), seed=0)
    train_agent(pg, env, 3, seed=0)
    pg2 = PolicyGradientAgent(3, 2, hidden=(4,), seed=1)
    jn.save(jn.io.flatten_state(pg.state_dict()), str(tmp_path / "pg.safetensors"))
    pg2.load_state_dict(jn.load(str(tmp_path / "pg.safetensors")))
    np.testing.assert_array_equal(pg2.policy(np.eye(3)), pg.policy(np.eye(3)))
    assert pg2.episodes == 3


def test_update_does_not_retrace_within_a_bucket():
    env = CorridorEnv(length=5, max_steps=30)
    agent = PolicyGradientAgent(5, 2, hidden=(4,), seed=0)
    train_agent(agent, env, 20, seed=0)                                # lengths vary, all <= 30 < 64
    assert len(agent._learn_fn._cache) == 1
    assert len(agent._act_fn._cache) == 1


@pytest.mark.slow
def test_cli_corridor(tmp_path, capsys):
    rc = get_trainer("pg-cartpole")(["--env", "corridor", "--episodes", "5", "--logdir", str(tmp_path),
                                     "--no-progress", "--target", "-1"])
    assert rc == 0
    assert "5 episodes" in capsys.readouterr().out
    assert (tmp_path / "returns.csv").exists() and (tmp_path / "checkpoints").is_dir()
    rc = get_trainer("dqn-cartpole")(["--env", "corridor", "--episodes", "3", "--logdir", str(tmp_path / "d"),
                                      "--no-progress", "--learning-starts", "5", "--batch-size", "4"])
    assert rc == 0


def test_missing_gymnasium_message(monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "gymnasium":
            raise ImportError("no gymnasium")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"pip install 'jitnet\[rl\]'"):
        make_env("CartPole-v1")


@pytest.mark.skipif(not HAS_GYM, reason="gymnasium not installed")
def test_cartpole_smoke():
    env = make_env("CartPole-v1")
    assert env_spaces(env) == ((4,), 2)
    pg = PolicyGradientAgent(4, 2, seed=0)
    res = train_agent(pg, env, 3, seed=0)
    assert len(res["returns"]) == 3 and res["steps"] > 0 and pg.updates == 3
    dqn = DQNAgent(4, 2, learning_starts=20, batch_size=8, seed=0)
    res = train_agent(dqn, env, 3, seed=0)
    assert dqn.updates > 0
