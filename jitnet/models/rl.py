"""Reinforcement learning: shared pieces of the policy-gradient and DQN agents and of their training commands.

``python -m jitnet train pg-cartpole`` and ``python -m jitnet train dqn-cartpole`` train on Gymnasium's
CartPole-v1 (any environment id with discrete actions works through ``--env``); ``--env corridor`` uses the
tiny built-in :class:`CorridorEnv`, which needs no Gymnasium. The agents live in
:mod:`jitnet.models.policy_gradient` and :mod:`jitnet.models.dqn`; this module holds what they share:
exploration schedules, environment creation (Gymnasium imported lazily), the episode loop (an episode is one
step of the shared :class:`~jitnet.models._train.Loop`: progress, logs, checkpoints, resume) and a plot of the
returns.

An agent offers ``act(obs) -> int``, ``observe(obs, action, reward, next_obs, terminated, truncated)``
(called after every environment step; returns a loss when it learned), ``state_dict()`` /
``load_state_dict(state)`` and ``stats`` (a dict of counters).

With ``device='cuda'`` an agent keeps its networks and optimizer state on the GPU. Observations come from the
environment as host NumPy arrays: each act step moves the observation in (plus the exploration rate where the
act graph takes one) and the chosen action out; each update moves its batch in and its loss (one scalar) out.
The agents' ``transfers_per_act`` and ``transfers_per_update`` give those counts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from types import SimpleNamespace

import numpy as np

import jitnet as jn

from ._train import ArgumentParser, Loop, Round, add_device_args, apply_smoke, setup_device

__all__ = ["LinearSchedule", "ExponentialSchedule", "ConstantSchedule", "make_schedule", "CorridorEnv",
           "make_env", "env_spaces", "mlp", "greedy_action", "explore_action", "make_optimizer", "train_agent",
           "plot_returns", "agent_parser", "parse_agent_args", "run_agent"]


# --------------------------------------------------------------------------------------------------------------
# exploration schedules
# --------------------------------------------------------------------------------------------------------------

class ConstantSchedule:
    """A schedule that returns the same value at every step."""

    def __init__(self, value):
        self.value = float(value)

    def __call__(self, step):
        """Return the constant value."""
        return self.value

    def __repr__(self):
        return f"ConstantSchedule({self.value})"


class LinearSchedule:
    """Anneal linearly from ``start`` to ``end`` over ``steps`` steps, then stay at ``end``."""

    def __init__(self, start, end, steps):
        if steps < 0:
            raise ValueError(f"LinearSchedule: steps must be >= 0, got {steps}")
        self.start, self.end, self.steps = float(start), float(end), int(steps)

    def __call__(self, step):
        """Return the value at ``step`` (0-based)."""
        if self.steps == 0 or step >= self.steps:
            return self.end
        return self.start + (self.end - self.start) * max(step, 0) / self.steps

    def __repr__(self):
        return f"LinearSchedule({self.start}, {self.end}, {self.steps})"


class ExponentialSchedule:
    """Decay geometrically: ``max(end, start * decay**step)``."""

    def __init__(self, start, end, decay):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"ExponentialSchedule: decay must be in (0, 1], got {decay}")
        self.start, self.end, self.decay = float(start), float(end), float(decay)

    def __call__(self, step):
        """Return the value at ``step`` (0-based)."""
        return max(self.end, self.start * self.decay ** max(step, 0))

    def __repr__(self):
        return f"ExponentialSchedule({self.start}, {self.end}, {self.decay})"


def make_schedule(spec):
    """Return a schedule from a number, a schedule, or a string 'linear:1,0.05,10000' / 'exp:1,0.05,0.999'."""
    if spec is None:
        return ConstantSchedule(0.0)
    if callable(spec):
        return spec
    if isinstance(spec, (int, float)):
        return ConstantSchedule(spec)
    kind, _, rest = str(spec).partition(":")
    if not rest:
        return ConstantSchedule(float(kind))
    vals = [float(v) for v in rest.split(",")]
    if kind == "linear" and len(vals) == 3:
        return LinearSchedule(vals[0], vals[1], int(vals[2]))
    if kind in ("exp", "exponential") and len(vals) == 3:
        return ExponentialSchedule(*vals)
    raise ValueError(f"bad schedule {spec!r}: use a number, 'linear:START,END,STEPS' or 'exp:START,END,DECAY'")


# --------------------------------------------------------------------------------------------------------------
# environments
# --------------------------------------------------------------------------------------------------------------

class _Discrete:
    """A minimal stand-in for ``gymnasium.spaces.Discrete``."""

    def __init__(self, n):
        self.n = int(n)


class _Box:
    """A minimal stand-in for ``gymnasium.spaces.Box`` (shape and dtype only)."""

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)


class CorridorEnv:
    """A deterministic corridor of ``length`` cells with the Gymnasium API (no Gymnasium needed).

    The agent starts in cell 0; action 1 moves right, action 0 moves left (a wall at 0). Reaching the last
    cell gives reward 1 and ends the episode; every other step gives ``step_reward``. Episodes are
    truncated after ``max_steps``. Observations are one-hot float32 vectors of the cell.
    """

    def __init__(self, length=5, max_steps=20, step_reward=0.0):
        self.length, self.max_steps, self.step_reward = int(length), int(max_steps), float(step_reward)
        self.observation_space = _Box((self.length,))
        self.action_space = _Discrete(2)
        self._pos = 0
        self._t = 0

    def _obs(self):
        o = np.zeros(self.length, np.float32)
        o[self._pos] = 1.0
        return o

    def reset(self, seed=None, options=None):
        """Start an episode in cell 0; return (observation, info)."""
        self._pos, self._t = 0, 0
        return self._obs(), {}

    def step(self, action):
        """Move left (0) or right (1); return (observation, reward, terminated, truncated, info)."""
        self._t += 1
        self._pos = min(self.length - 1, self._pos + 1) if int(action) == 1 else max(0, self._pos - 1)
        terminated = self._pos == self.length - 1
        reward = 1.0 if terminated else self.step_reward
        truncated = (not terminated) and self._t >= self.max_steps
        return self._obs(), reward, terminated, truncated, {}

    def close(self):
        """Release nothing; present for API compatibility."""


def make_env(env, **kwargs):
    """Return an environment: ``env`` itself if it is one, CorridorEnv for 'corridor', else gymnasium.make(env)."""
    if not isinstance(env, str):
        return env
    if env == "corridor":
        return CorridorEnv(**kwargs)
    try:
        import gymnasium as gym
    except ImportError:
        raise ImportError(f"environment {env!r} needs Gymnasium, an optional dependency: "
                          "pip install 'jitnet[rl]' (or pip install gymnasium); "
                          "--env corridor runs without it") from None
    return gym.make(env, **kwargs)


def env_spaces(env):
    """Return (observation shape, number of actions) of an environment with a discrete action space."""
    n = getattr(env.action_space, "n", None)
    if n is None:
        raise ValueError(f"the environment's action space {env.action_space!r} is not discrete; these agents "
                         "need discrete actions")
    return tuple(env.observation_space.shape), int(n)


# --------------------------------------------------------------------------------------------------------------
# networks and in-graph action selection
# --------------------------------------------------------------------------------------------------------------

def mlp(sizes, activation="relu", init="xavier"):
    """Return a Sequential MLP through ``sizes`` (e.g. (4, 16, 16, 2)) with ``activation`` between layers."""
    acts = {"relu": jn.nn.ReLU, "tanh": jn.nn.Tanh, "sigmoid": jn.nn.Sigmoid}
    if activation not in acts:
        raise ValueError(f"mlp: unknown activation {activation!r}; choose one of {sorted(acts)}")
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(jn.nn.Linear(sizes[i], sizes[i + 1], init=init))
        if i < len(sizes) - 2:
            layers.append(acts[activation]())
    return jn.nn.Sequential(*layers)


def greedy_action(values):
    """Return the int64 index of the row maxima of ``values`` (batch, n) (first on ties), as graph ops.

    Written with a max and a min reduction (serial kernels on small inputs) so that an act step on one
    observation stays cheap under ``jn.jit``.
    """
    n = values.shape[-1]
    m = jn.max(values, axis=-1, keepdims=True)
    idx = jn.tensor(np.arange(n, dtype=np.float32), device=values.device)
    return jn.astype(jn.min(jn.where(values >= m, idx, float(n)), axis=-1), jn.int64)


def explore_action(greedy, n_actions, epsilon):
    """Return ``greedy`` replaced by a uniform random action with probability ``epsilon`` (a 0-d tensor)."""
    u = jn.random.uniform(greedy.shape, device=greedy.device)
    r = jn.random.randint(0, n_actions, greedy.shape, device=greedy.device)
    return jn.where(u < epsilon, r, greedy)


# --------------------------------------------------------------------------------------------------------------
# the episode loop
# --------------------------------------------------------------------------------------------------------------

def train_agent(agent, env, episodes, *, seed=None, target=None, window=100, max_steps=None, logdir=None,
                progress=False, checkpoint_every=0, on_episode=None, desc="train", resume=False):
    """Run ``episodes`` episodes (stopping early once the ``window``-episode mean return reaches ``target``).

    Each episode is one step of the shared :class:`~jitnet.models._train.Loop`, its loss the mean of its updates'
    losses (a non-finite one stops the run). With ``logdir`` each episode's return goes to TensorBoard and
    ``returns.csv``, and the agent is saved every ``checkpoint_every`` episodes and at the end (never with
    non-finite parameters: that stops the run); ``resume`` first restores the latest checkpoint there, and the
    episode count continues from it. Returns a dict: returns (list), steps, seconds, solved_episode (or None),
    mean_return.
    """
    loop = Loop(desc, agent, logdir, SimpleNamespace(resume=resume), unit="episode", csv="returns.csv",
                csv_fields=["episode", "return", "length", "mean_return", "steps", "seconds"],
                checkpoint_every=checkpoint_every, progress="bar" if progress else "off")
    returns, recent = [], deque(maxlen=window)
    steps, solved = 0, None
    t0 = time.perf_counter()

    def episode(_):
        nonlocal steps, solved
        ep = loop.step                           # episodes before this one
        obs, _ = env.reset(seed=seed) if not returns else env.reset()
        total, length, done, losses = 0.0, 0, False, []
        while not done:
            a = agent.act(obs)
            nxt, r, terminated, truncated, _ = env.step(a)
            length += 1
            if max_steps is not None and length >= max_steps:
                truncated = True
            loss = agent.observe(obs, a, r, nxt, terminated, truncated)
            if loss is not None:
                losses.append(loss)
            total += r
            obs = nxt
            done = terminated or truncated
        steps += length
        returns.append(total)
        recent.append(total)
        mean = float(np.mean(recent))
        loop.writer.add_scalar("episode/return", total, ep)
        loop.writer.add_scalar("episode/length", length, ep)
        loop.writer.add_scalar(f"episode/mean_return_{window}", mean, ep)
        loop.csv.log(episode=ep, **{"return": total}, length=length, mean_return=mean, steps=steps,
                     seconds=round(time.perf_counter() - t0, 3))
        if on_episode is not None:
            on_episode(ep, total, mean)
        if target is not None and len(recent) == window and mean >= target:
            solved = len(returns)
            loop.stop()
        return {"loss": float(np.mean(losses)) if losses else None, "ret": f"{total:.0f}",
                f"avg{window}": f"{mean:.1f}", "steps": steps}

    loop.run(episode, [Round(range(episodes), episodes, desc)])
    return {"returns": returns, "steps": steps, "seconds": time.perf_counter() - t0, "solved_episode": solved,
            "mean_return": float(np.mean(recent)) if recent else float("nan")}


def plot_returns(returns, path, window=100, title=None):
    """Plot episode returns and their running mean to ``path`` (PNG); return the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    r = np.asarray(returns, dtype=np.float64)
    run = np.array([r[max(0, i - window + 1):i + 1].mean() for i in range(len(r))])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(r, lw=0.7, alpha=0.5, label="return")
    ax.plot(run, lw=2, label=f"mean of last {window}")
    ax.set_xlabel("episode")
    ax.set_ylabel("return")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------
# the training commands
# --------------------------------------------------------------------------------------------------------------

def _hidden(s):
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden expects comma-separated sizes like 16,16, got {s!r}") \
            from None


def agent_parser(name, description, *, episodes, lr, gamma, hidden, target):
    """Return the argument parser of agent command ``name`` with the options every agent shares."""
    p = ArgumentParser(prog=f"python -m jitnet train {name}", description=description)
    p.add_argument("--env", default="CartPole-v1", help="Gymnasium environment id with discrete actions, or "
                                                        "'corridor' (built in) (default CartPole-v1)")
    p.add_argument("--episodes", type=int, default=episodes, help=f"maximum episodes (default {episodes})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--gamma", type=float, default=gamma, help=f"discount factor (default {gamma})")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    p.add_argument("--hidden", type=_hidden, default=hidden,
                   help=f"hidden layer sizes (default {','.join(map(str, hidden))})")
    p.add_argument("--optimizer", default="adam", choices=["adam", "rmsprop", "sgd"], help="(default adam)")
    p.add_argument("--target", type=float, default=target,
                   help=f"stop once the 100-episode mean return reaches this (default {target}; "
                        "a negative value never stops early)")
    p.add_argument("--window", type=int, default=100, help="episodes in the running mean (default 100)")
    p.add_argument("--max-episode-steps", type=int, default=None,
                   help="end (truncate) an episode after this many steps (default: when the environment ends it)")
    p.add_argument("--logdir", default=None, help=f"TensorBoard events, returns.csv, checkpoints/ and "
                                                  f"returns.png (default runs/{name})")
    p.add_argument("--resume", action="store_true", help="start from the latest checkpoint in --logdir")
    p.add_argument("--checkpoint-every", type=int, default=100, help="episodes between checkpoints (default 100)")
    p.add_argument("--no-jit", action="store_true", help="run the act and learn steps eagerly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_args(p)
    return p


# --smoke: two episodes of at most 5 steps with a small network, checkpointing after each
SMOKE = dict(episodes=2, max_episode_steps=5, hidden=(8,), checkpoint_every=1, target=-1.0)


def parse_agent_args(p, argv, **smoke):
    """Parse ``argv`` with agent parser ``p``, apply --smoke (``SMOKE`` and the command's ``smoke`` settings) and
    check --device (``args.device_obj``); return the args."""
    args = apply_smoke(p.parse_args(argv), **{**SMOKE, **smoke})
    args.device_obj = setup_device(args)
    return args


def run_agent(name, args, agent, env):
    """Train ``agent`` on ``env`` as the parsed command-line ``args`` say, print the result; return the exit code."""
    logdir = args.logdir or os.path.join("runs", name)
    if args.resume and jn.io.latest_checkpoint(os.path.join(logdir, "checkpoints")) is None:
        print(f"{name}: no checkpoint to resume from in {logdir}/checkpoints", file=sys.stderr)
        return 2
    target = args.target if args.target is not None and args.target >= 0 else None
    res = train_agent(agent, env, args.episodes, seed=args.seed, target=target, window=args.window,
                      max_steps=args.max_episode_steps, logdir=logdir, progress=not args.no_progress,
                      checkpoint_every=args.checkpoint_every, desc=name, resume=args.resume)
    n = len(res["returns"])
    sps = res["steps"] / res["seconds"] if res["seconds"] > 0 else float("nan")
    if res["solved_episode"] is not None:
        print(f"{name}: solved at episode {res['solved_episode']} ({args.window}-episode mean "
              f"{res['mean_return']:.1f} >= {target}) in {res['seconds']:.1f} s, {res['steps']} steps "
              f"({sps:.0f} steps/s)")
    else:
        print(f"{name}: {n} episodes, last {args.window}-episode mean {res['mean_return']:.1f}, "
              f"{res['steps']} steps in {res['seconds']:.1f} s ({sps:.0f} steps/s)")
    png = plot_returns(res["returns"], os.path.join(logdir, "returns.png"), args.window, title=name)
    print(f"logs: {logdir} (returns.csv, TensorBoard events, checkpoints/"
          + (", returns.png)" if png else "; pip install matplotlib for returns.png)"))
    env.close()
    return 0


def make_optimizer(name, params, lr):
    """Return the optimizer called ``name`` ('adam', 'rmsprop', 'sgd') over ``params``."""
    if name == "adam":
        return jn.optim.Adam(params, lr=lr)
    if name == "rmsprop":
        return jn.optim.RMSProp(params, lr=lr)
    if name == "sgd":
        return jn.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose adam, rmsprop or sgd")
