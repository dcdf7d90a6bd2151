"""Reinforcement learning on CartPole-v1: jitnet agents vs the same agents in PyTorch CPU eager.

    python bench/rl.py speed [--agent pg|dqn|both] [--steps 20000] [--warmup 3000] [--threads 1] [--json out.json]
    python bench/rl.py solve [--agent pg|dqn|both] [--seeds 0 1 2] [--episodes N]

``speed``: environment steps per second, inference and learning included, of each agent against its PyTorch
peer (same network sizes, optimizer, update schedule and number of environment steps). Both first run
``--warmup`` untimed steps (jitnet compiles its act and update steps there, and every padding bucket of
the policy-gradient update); the timed phase then continues the same agents for ``--steps`` steps.

(OpenBLAS gets the same thread count as PyTorch.)

``solve``: episodes and wall time (compilation included, kernels from the disk cache) until the 100-episode
mean return reaches 475 (policy gradient) or 195 (DQN), per seed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _early_threads(argv):
    """Return the --threads value from ``argv`` (default 1) before NumPy is imported."""
    for i, v in enumerate(argv):
        if v == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if v.startswith("--threads="):
            return v.split("=", 1)[1]
    return "1"


# OpenBLAS (behind NumPy and jitnet's matmul) reads its thread count once, at load: give it the same count as
# PyTorch gets. Left at the core count, a 128x128 matmul went multi-threaded and took 1.3 ms instead of 73 us
# on a busy 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", _early_threads(sys.argv[1:]))

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import dump, set_threads, table  # noqa: E402

import jitnet as jn  # noqa: E402
from jitnet.models.dqn import DQNAgent, ReplayBuffer  # noqa: E402
from jitnet.models.policy_gradient import PolicyGradientAgent, discounted_returns  # noqa: E402
from jitnet.models.rl import LinearSchedule, make_env, train_agent  # noqa: E402

PG = dict(hidden=(16, 16), lr=0.01, gamma=0.99, batch_episodes=1)
DQN = dict(hidden=(128, 128), lr=5e-4, gamma=0.99, buffer_size=50000, batch_size=128, learning_starts=1000,
           train_freq=1, target_update=1000, tau=0.005)
DQN_EPS = (1.0, 0.05, 5000)


# --------------------------------------------------------------------------------------------------------------
# PyTorch peers
# --------------------------------------------------------------------------------------------------------------

def _torch_mlp(sizes):
    import torch
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


class TorchPG:
    """REINFORCE in PyTorch eager: the same network, Adam, normalised returns, one update per episode batch."""

    def __init__(self, obs_dim, n_actions, hidden, lr, gamma, batch_episodes, seed=0):
        import torch
        torch.manual_seed(seed)
        self.torch = torch
        self.net = _torch_mlp((obs_dim, *hidden, n_actions))
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.gamma, self.batch_episodes = gamma, batch_episodes
        self._obs, self._act, self._rew, self._done, self._n = [], [], [], [], 0
        self.updates = 0

    def act(self, obs):
        """Return an action sampled from the policy."""
        torch = self.torch
        with torch.no_grad():
            p = torch.softmax(self.net(torch.as_tensor(obs, dtype=torch.float32).reshape(1, -1)), -1)
            return int(torch.multinomial(p, 1)[0, 0])

    def observe(self, obs, action, reward, next_obs, terminated, truncated):
        """Record a step; update after ``batch_episodes`` episodes."""
        self._obs.append(np.asarray(obs, np.float32))
        self._act.append(action)
        self._rew.append(reward)
        end = terminated or truncated
        self._done.append(end)
        if end:
            self._n += 1
            if self._n >= self.batch_episodes:
                self.update()

    def update(self):
        """One gradient step on the collected episodes."""
        torch = self.torch
        ret = discounted_returns(np.array(self._rew, np.float32), self.gamma, np.array(self._done))
        ret = (ret - ret.mean()) / (ret.std() + 1e-8)
        obs = torch.as_tensor(np.stack(self._obs))
        a = torch.as_tensor(np.array(self._act, np.int64))
        logp = torch.log_softmax(self.net(obs), -1).gather(1, a[:, None])[:, 0]
        loss = -(logp * torch.as_tensor(ret)).sum() / self._n
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self._obs, self._act, self._rew, self._done, self._n = [], [], [], [], 0
        self.updates += 1


class TorchDQN:
    """DQN in PyTorch eager: the same network, replay buffer, Double-DQN target, Huber loss, gradient clipping,
    soft target update and epsilon schedule."""

    def __init__(self, obs_dim, n_actions, hidden, lr, gamma, buffer_size, batch_size, learning_starts,
                 train_freq, target_update, tau, seed=0):
        import torch
        torch.manual_seed(seed)
        self.torch = torch
        self.net = _torch_mlp((obs_dim, *hidden, n_actions))
        self.target = _torch_mlp((obs_dim, *hidden, n_actions))
        self.target.load_state_dict(self.net.state_dict())
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.buffer = ReplayBuffer(buffer_size, (obs_dim,))
        self.rng = np.random.default_rng(seed)
        self.eps = LinearSchedule(*DQN_EPS)
        self.n_actions, self.gamma, self.batch_size = n_actions, gamma, batch_size
        self.learning_starts, self.train_freq, self.target_update = learning_starts, train_freq, target_update
        self.tau = tau
        self.steps = self.updates = 0

    def act(self, obs):
        """Return an epsilon-greedy action."""
        torch = self.torch
        if self.rng.random() < self.eps(self.steps):
            return int(self.rng.integers(self.n_actions))
        with torch.no_grad():
            return int(self.net(torch.as_tensor(obs, dtype=torch.float32).reshape(1, -1)).argmax(1)[0])

    def observe(self, obs, action, reward, next_obs, terminated, truncated):
        """Store the transition, learn every ``train_freq`` steps, copy the target every ``target_update``."""
        self.buffer.add(obs, action, reward, next_obs, terminated)
        self.steps += 1
        if self.steps >= self.learning_starts and self.steps % self.train_freq == 0:
            self.update()
        if not self.tau and self.steps % self.target_update == 0:
            self.target.load_state_dict(self.net.state_dict())

    def update(self):
        """One gradient step on a uniform replay batch."""
        torch = self.torch
        o, a, r, o2, d = (torch.as_tensor(v) for v in self.buffer.sample(self.batch_size, self.rng))
        q = self.net(o).gather(1, a[:, None])[:, 0]
        with torch.no_grad():
            best = self.net(o2).argmax(1, keepdim=True)
            y = r + self.gamma * (1.0 - d) * self.target(o2).gather(1, best)[:, 0]
        loss = torch.nn.functional.smooth_l1_loss(q, y)
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 10.0)
        self.opt.step()
        if self.tau:
            with torch.no_grad():
                for t, p in zip(self.target.parameters(), self.net.parameters()):
                    t.add_(self.tau * (p - t))
        self.updates += 1


# --------------------------------------------------------------------------------------------------------------

def make_agent(kind, lib, seed):
    """Return a fresh agent of ``kind`` ('pg' or 'dqn') for CartPole in ``lib`` ('jitnet' or 'torch')."""
    if kind == "pg":
        return PolicyGradientAgent(4, 2, seed=seed, **PG) if lib == "jitnet" else TorchPG(4, 2, seed=seed, **PG)
    if lib == "jitnet":
        return DQNAgent(4, 2, seed=seed, epsilon=LinearSchedule(*DQN_EPS), **DQN)
    return TorchDQN(4, 2, seed=seed, **DQN)


def run_steps(agent, env, n, obs=None):
    """Run ``n`` environment steps (resetting at episode ends); return (seconds, next observation)."""
    if obs is None:
        obs, _ = env.reset(seed=0)
    t0 = time.perf_counter()
    for _ in range(n):
        a = agent.act(obs)
        nxt, r, term, trunc, _ = env.step(a)
        agent.observe(obs, a, r, nxt, term, trunc)
        obs = env.reset()[0] if (term or trunc) else nxt
    return time.perf_counter() - t0, obs


def speed(args):
    """Measure environment steps/s of each jitnet agent against its PyTorch peer; return the table rows."""
    rows = []
    for kind in (["pg", "dqn"] if args.agent == "both" else [args.agent]):
        agents, envs, obs, secs = {}, {}, {}, {}
        for lib in ("jitnet", "torch"):
            envs[lib] = make_env("CartPole-v1")
            agents[lib] = make_agent(kind, lib, args.seed)
            if lib == "jitnet" and kind == "pg":
                agents[lib].compile_buckets(500 * PG["batch_episodes"])
            _, obs[lib] = run_steps(agents[lib], envs[lib], args.warmup)
            secs[lib] = 0.0
        traces1 = jn.compiler.stats()["traces"]
        done = 0
        while done < args.steps:          # alternate chunks so that a shared machine's load hits both alike
            n = min(args.chunk, args.steps - done)
            for lib in ("jitnet", "torch"):
                sec, obs[lib] = run_steps(agents[lib], envs[lib], n, obs[lib])
                secs[lib] += sec
            done += n
        tj, tt = secs["jitnet"], secs["torch"]
        uj, ut = agents["jitnet"].updates, agents["torch"].updates
        trj = jn.compiler.stats()["traces"] - traces1
        rows.append({"agent": kind, "steps": args.steps, "jitnet steps/s": args.steps / tj,
                     "torch steps/s": args.steps / tt, "ratio": tt / tj, "jitnet updates": uj,
                     "torch updates": ut, "traces in timed phase": trj})
    table(rows, f"CartPole-v1 environment steps per second (act + learn), {args.steps} steps after "
                f"{args.warmup} warm-up steps, {args.threads} thread(s)")
    dump(rows, args.json)
    return rows


def solve(args):
    """Train jitnet agents per seed until solved; return rows of episodes, steps and wall time."""
    rows = []
    for kind in (["pg", "dqn"] if args.agent == "both" else [args.agent]):
        target = 475.0 if kind == "pg" else 195.0
        for seed in args.seeds:
            env = make_env("CartPole-v1")
            t0 = time.perf_counter()
            agent = make_agent(kind, "jitnet", seed)
            res = train_agent(agent, env, args.episodes or (3000 if kind == "pg" else 1500), seed=seed,
                              target=target)
            wall = time.perf_counter() - t0
            rows.append({"agent": kind, "seed": seed, "target": target, "solved at episode": res["solved_episode"],
                         "final mean": res["mean_return"], "steps": res["steps"], "wall s": wall,
                         "steps/s": res["steps"] / wall})
            print(rows[-1], flush=True)
    table(rows, "CartPole-v1: episodes until the 100-episode mean return reaches the target (jitnet agents)")
    dump(rows, args.json)
    return rows


def main(argv=None):
    """Run the ``speed`` or ``solve`` benchmark from the command line; return its rows."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["speed", "solve"])
    ap.add_argument("--agent", default="both", choices=["pg", "dqn", "both"])
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--warmup", type=int, default=3000)
    ap.add_argument("--chunk", type=int, default=1000, help="steps per alternating timed chunk")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    return speed(args) if args.mode == "speed" else solve(args)


if __name__ == "__main__":
    main()
