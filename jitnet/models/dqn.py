"""DQN: a deep Q-network agent with experience replay and a target network, for discrete actions.

Transitions go into a fixed-capacity ring buffer (NumPy arrays) that stores, for every transition, its own
``done`` flag: 1 only when the environment *terminated* after that step (a time-limit truncation still
bootstraps). Uniform mini-batches train the Q-network toward ``r + gamma * (1 - done) * Q_target(s', a')``,
with ``a'`` the target network's greedy action, or the online network's (Double DQN, the default), under the
Huber (or squared) loss with gradient-norm clipping. The target network's parameters are copied from the
online network every ``target_update`` steps (or, with ``tau``, moved toward it by that fraction after every
update). Actions are epsilon-greedy with an annealed epsilon. The act step and the whole update (forward,
backward, optimizer, soft target update) are each one ``jn.jit`` graph; the chosen actions enter the update
as one-hot rows, so selecting Q(s, a) is a multiply and a row sum.
"""
from __future__ import annotations

import numpy as np

import jitnet as jn
import jitnet.nn as nn
import jitnet.nn.functional as F

from .rl import (agent_parser, env_spaces, explore_action, greedy_action, make_env, make_optimizer, make_schedule, mlp,
                 parse_agent_args, run_agent)

__all__ = ["train_dqn", "TRAINERS", "ReplayBuffer", "AtariQNetwork", "DQNAgent", "copy_parameters"]


class ReplayBuffer:
    """A fixed-capacity ring buffer of transitions (obs, action, reward, next_obs, done) with uniform sampling."""

    def __init__(self, capacity, obs_shape, obs_dtype=np.float32):
        if capacity < 1:
            raise ValueError(f"ReplayBuffer: capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        shape = (self.capacity,) + tuple(obs_shape)
        self.obs = np.zeros(shape, obs_dtype)
        self.next_obs = np.zeros(shape, obs_dtype)
        self.actions = np.zeros(self.capacity, np.int64)
        self.rewards = np.zeros(self.capacity, np.float32)
        self.dones = np.zeros(self.capacity, np.float32)
        self.pos = 0        # where the next transition goes
        self.size = 0

    def __len__(self):
        return self.size

    def add(self, obs, action, reward, next_obs, done):
        """Store one transition, overwriting the oldest when full; ``done`` masks the bootstrap of this one."""
        i = self.pos
        self.obs[i] = obs
        self.next_obs[i] = next_obs
        self.actions[i] = action
        self.rewards[i] = reward
        self.dones[i] = 1.0 if done else 0.0
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def get(self, idx):
        """Return (obs, actions, rewards, next_obs, dones) at the indices ``idx``."""
        return self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.dones[idx]

    def sample(self, batch_size, rng=None):
        """Return a uniform random batch (with replacement) as (obs, actions, rewards, next_obs, dones)."""
        if self.size == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty")
        rng = np.random.default_rng() if rng is None else rng
        return self.get(rng.integers(0, self.size, batch_size))


class AtariQNetwork(nn.Module):
    """The Nature-DQN convolutional Q-network for stacked 84x84 frames (N, frames, 84, 84) -> (N, actions)."""

    def __init__(self, n_actions, in_channels=4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 8, stride=4)
        self.conv2 = nn.Conv2d(32, 64, 4, stride=2)
        self.conv3 = nn.Conv2d(64, 64, 3, stride=1)
        self.fc = nn.Linear(64 * 7 * 7, 512, init="he")
        self.out = nn.Linear(512, n_actions)

    def forward(self, x):
        """Return the Q-values of a batch of frame stacks (pixels scaled to [0, 1] by the caller)."""
        h = jn.relu(self.conv1(x))
        h = jn.relu(self.conv2(h))
        h = jn.relu(self.conv3(h))
        h = jn.relu(self.fc(jn.reshape(h, (h.shape[0], -1))))
        return self.out(h)


def copy_parameters(src, dst):
    """Copy every parameter and buffer of module ``src`` into ``dst`` in place (a target-network update).

    Modules on the same device copy device to device (no host round trip); otherwise through load_state_dict."""
    s, d = src.state_dict(), dst.state_dict()
    if list(s) != list(d) or any(a.device != b.device or a.shape != b.shape for a, b in zip(s.values(), d.values())):
        dst.load_state_dict(s)
        return
    for a, b in zip(s.values(), d.values()):
        b.assign(a)


class DQNAgent:
    """DQN (Mnih et al.) with a replay buffer, a periodically copied target network and annealed epsilon-greedy."""

    def __init__(self, obs_dim, n_actions, hidden=(128, 128), lr=5e-4, gamma=0.99, buffer_size=50000,
                 batch_size=128, learning_starts=1000, train_freq=1, target_update=1000, loss="huber",
                 epsilon="linear:1,0.05,5000", optimizer="adam", double=True, clip_norm=10.0, tau=0.005, seed=None,
                 use_jit=True, q_network=None, obs_shape=None, device=None):
        if loss not in ("huber", "mse"):
            raise ValueError(f"loss must be 'huber' or 'mse', got {loss!r}")
        if seed is not None:
            jn.random.seed(seed)
        self.n_actions = int(n_actions)
        self.obs_shape = tuple(obs_shape) if obs_shape is not None else (int(obs_dim),)
        self.gamma, self.batch_size = float(gamma), int(batch_size)
        self.learning_starts, self.train_freq = int(learning_starts), int(train_freq)
        self.target_update, self.loss = int(target_update), loss
        self.double, self.clip_norm, self.tau = bool(double), clip_norm, tau
        self.epsilon = make_schedule(epsilon)
        if q_network is None:
            self.net = mlp((int(np.prod(self.obs_shape)), *hidden, self.n_actions))
            self.target = mlp((int(np.prod(self.obs_shape)), *hidden, self.n_actions))
        else:
            self.net, self.target = q_network(), q_network()
        self.device = jn.device(device or "cpu")
        self.net.to(self.device)
        self.target.to(self.device)
        copy_parameters(self.net, self.target)
        self.target.requires_grad_(False)
        self.opt = make_optimizer(optimizer, self.net.parameters(), lr)
        self.buffer = ReplayBuffer(buffer_size, self.obs_shape)
        self.rng = np.random.default_rng(seed)
        self.steps = 0
        self.updates = 0
        self._eps = np.zeros((), np.float32)
        self._eye = np.eye(self.n_actions, dtype=np.float32)
        wrap = jn.jit if use_jit else (lambda f: f)
        self._act_fn = wrap(self._act_graph)
        self._learn_fn = wrap(self._learn_graph)

    # -- graphs ---------------------------------------------------------------------------------------------------
    def _act_graph(self, obs, eps):
        return explore_action(greedy_action(self.net(obs)), self.n_actions, eps)

    def _learn_graph(self, obs, onehot, rewards, next_obs, dones):
        self.opt.zero_grad()
        q = jn.sum(self.net(obs) * onehot, axis=1)
        with jn.no_grad():
            qt = self.target(next_obs)
            if self.double:          # the online network picks a', the target network values it
                qo = self.net(next_obs)
                best = jn.astype(qo >= jn.max(qo, axis=1, keepdims=True), qt.dtype)
                q_next = jn.sum(qt * best, axis=1) / jn.sum(best, axis=1)
            else:
                q_next = jn.max(qt, axis=1)
            y = rewards + self.gamma * (1.0 - dones) * q_next
        loss = F.huber_loss(q, y) if self.loss == "huber" else F.mse_loss(q, y)
        loss.backward()
        if self.clip_norm:
            self.opt.clip_grad_norm(self.clip_norm)
        self.opt.step()
        if self.tau:                 # soft (Polyak) target update inside the same graph
            with jn.no_grad():
                for t, p in zip(self.target.parameters(), self.net.parameters()):
                    t.assign(t + self.tau * (p - t))
        return loss

    # -- acting ---------------------------------------------------------------------------------------------------
    @property
    def stats(self):
        """Return counters: steps, updates, current epsilon, buffer size."""
        return {"steps": self.steps, "updates": self.updates, "epsilon": self.epsilon(self.steps),
                "buffer": len(self.buffer)}

    transfers_per_act = 3             # on a GPU: the observation and epsilon in, the action out
    transfers_per_update = 6          # the five batch arrays in, the loss out

    def act(self, obs, explore=True):
        """Return an epsilon-greedy action (int) for one observation (greedy when ``explore`` is False)."""
        x = jn.tensor(np.asarray(obs, np.float32).reshape((1,) + self.obs_shape), device=self.device)
        self._eps[()] = self.epsilon(self.steps) if explore else 0.0
        return int(self._act_fn(x, jn.tensor(self._eps, device=self.device)).numpy()[0])

    def q_values(self, obs):
        """Return the Q-values (NumPy) of a batch of observations (eager)."""
        with jn.no_grad():
            x = np.asarray(obs, np.float32).reshape((-1,) + self.obs_shape)
            return self.net(jn.tensor(x, device=self.device)).numpy()

    def observe(self, obs, action, reward, next_obs, terminated, truncated):
        """Store the transition (done = terminated), learn every ``train_freq`` steps; return the loss or None."""
        self.buffer.add(np.asarray(obs, np.float32).reshape(self.obs_shape), action, reward,
                        np.asarray(next_obs, np.float32).reshape(self.obs_shape), terminated)
        self.steps += 1
        loss = None
        if self.steps >= self.learning_starts and self.steps % self.train_freq == 0 \
                and len(self.buffer) >= self.batch_size:
            loss = self.update()
        if not self.tau and self.steps % self.target_update == 0:
            copy_parameters(self.net, self.target)
        return loss

    # -- learning -------------------------------------------------------------------------------------------------
    def update(self):
        """Take one gradient step on a uniform replay batch; return the loss (float)."""
        o, a, r, o2, d = self.buffer.sample(self.batch_size, self.rng)
        dev = self.device
        loss = self._learn_fn(jn.tensor(o, device=dev), jn.tensor(self._eye[a], device=dev), jn.tensor(r, device=dev),
                              jn.tensor(o2, device=dev), jn.tensor(d, device=dev))
        self.updates += 1
        return float(loss.item())

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self):
        """Return {'net', 'target', 'opt', 'counters'} for jn.io.Saver (the replay buffer is not saved)."""
        return {"net": dict(self.net.state_dict()), "target": dict(self.target.state_dict()),
                "opt": self.opt.state_dict(),
                "counters": {"steps": jn.tensor(np.int64(self.steps)), "updates": jn.tensor(np.int64(self.updates))}}

    def load_state_dict(self, state):
        """Restore from :meth:`state_dict` output or its flattened form (what jn.io.load returns)."""
        flat = jn.io.flatten_state(state)
        self.net.load_state_dict({k[4:]: v for k, v in flat.items() if k.startswith("net/")})
        self.target.load_state_dict({k[7:]: v for k, v in flat.items() if k.startswith("target/")})
        self.opt.load_state_dict({k[4:]: v for k, v in flat.items() if k.startswith("opt/")})
        if "counters/steps" in flat:
            self.steps = int(np.asarray(flat["counters/steps"]))
            self.updates = int(np.asarray(flat["counters/updates"]))


def train_dqn(argv=None):
    """Train the DQN agent (``python -m jitnet train dqn-cartpole``); return the exit code."""
    p = agent_parser("dqn-cartpole", "DQN with experience replay and a target network on CartPole-v1",
                       episodes=1000, lr=5e-4, gamma=0.99, hidden=(128, 128), target=195.0)
    p.add_argument("--buffer-size", type=int, default=50000, help="replay capacity (default 50000)")
    p.add_argument("--batch-size", type=int, default=128, help="replay batch (default 128)")
    p.add_argument("--learning-starts", type=int, default=1000, help="steps before learning (default 1000)")
    p.add_argument("--train-freq", type=int, default=1, help="environment steps per update (default 1)")
    p.add_argument("--target-update", type=int, default=1000, help="steps between target copies (default 1000)")
    p.add_argument("--loss", default="huber", choices=["huber", "mse"], help="(default huber)")
    p.add_argument("--tau", type=float, default=0.005, help="soft target update fraction per update; 0 copies "
                                                          "every --target-update steps (default 0.005)")
    p.add_argument("--no-double", action="store_true", help="plain DQN targets (max of the target network)")
    p.add_argument("--clip-norm", type=float, default=10.0, help="gradient-norm clip, 0 for none (default 10)")
    p.add_argument("--epsilon", default="linear:1,0.05,5000",
                   help="epsilon schedule over steps (default linear:1,0.05,5000)")
    args = parse_agent_args(p, argv, buffer_size=16, batch_size=4, learning_starts=6)   # --smoke: 4 updates
    env = make_env(args.env)
    obs_shape, n = env_spaces(env)
    agent = DQNAgent(int(np.prod(obs_shape)), n, hidden=args.hidden, lr=args.lr, gamma=args.gamma,
                     buffer_size=args.buffer_size, batch_size=args.batch_size,
                     learning_starts=args.learning_starts, train_freq=args.train_freq,
                     target_update=args.target_update, loss=args.loss, epsilon=make_schedule(args.epsilon),
                     double=not args.no_double, clip_norm=args.clip_norm, tau=args.tau or None,
                     optimizer=args.optimizer, seed=args.seed, use_jit=not args.no_jit, device=args.device_obj)
    return run_agent("dqn-cartpole", args, agent, env)


TRAINERS = {"dqn-cartpole": train_dqn}
