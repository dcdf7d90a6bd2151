"""REINFORCE: a policy-gradient agent for environments with discrete actions.

The policy is an MLP (4-16-16-2 on CartPole) that outputs action logits. Each step the act function (jitted)
runs the policy and samples an action inside the graph with the Gumbel-max trick
(``argmax(logits - log(-log(u)))``, ``u`` a ``jn.random.uniform`` draw, so the draw is a graph node), or
takes the greedy action with epsilon-greedy exploration. After every ``batch_episodes`` episodes the
discounted returns ``R_t = r_t + gamma * R_{t+1}`` (a small kernel in kernels_cpu) are normalised over the batch
(the baseline) and one jitted update minimises ``-sum_t A_t log pi(a_t | s_t) / episodes``. The batch's steps
are padded with zero-weight rows to a power-of-two bucket, so the update compiles once per bucket and not
once per episode length.
"""
from __future__ import annotations

import numpy as np

import jitnet as jn
import jitnet.nn.functional as F
from jitnet import kernels_cpu as _K

from .rl import (ConstantSchedule, agent_parser, env_spaces, explore_action, greedy_action, make_env, make_optimizer,
                 make_schedule, mlp, parse_agent_args, run_agent)

__all__ = ["train_pg", "TRAINERS", "discounted_returns", "bucket_size", "PolicyGradientAgent"]


def discounted_returns(rewards, gamma, dones=None):
    """Return R_t = r_t + gamma * R_{t+1} (float32), restarting after every t where ``dones[t]`` is true.

    ``rewards`` is one episode (or several concatenated, with ``dones`` marking each episode's last step);
    without ``dones`` the whole array is one episode whose return after the last step is 0.
    """
    r = np.ascontiguousarray(rewards, dtype=np.float64).reshape(-1)
    d = np.zeros(r.shape[0], np.bool_) if dones is None else np.ascontiguousarray(dones, dtype=np.bool_)
    if d.shape != r.shape:
        raise ValueError(f"discounted_returns: dones of shape {d.shape} do not match rewards of shape {r.shape}")
    out = np.empty_like(r)
    _K.discounted_returns(r, d, float(gamma), out)
    return out.astype(np.float32)


def bucket_size(n, minimum=64):
    """Return the padded length for ``n`` steps: the next power of two, at least ``minimum``."""
    b = max(int(minimum), 1)
    while b < n:
        b *= 2
    return b


class PolicyGradientAgent:
    """REINFORCE with return normalisation, sampling or epsilon-greedy exploration and batched updates."""

    def __init__(self, obs_dim, n_actions, hidden=(16, 16), lr=0.01, gamma=0.99, batch_episodes=1,
                 baseline="normalize", explore="sample", epsilon=None, optimizer="adam", activation="relu",
                 seed=None, use_jit=True, min_bucket=64, device=None):
        if baseline not in ("normalize", "mean", "none"):
            raise ValueError(f"baseline must be 'normalize', 'mean' or 'none', got {baseline!r}")
        if explore not in ("sample", "egreedy"):
            raise ValueError(f"explore must be 'sample' or 'egreedy', got {explore!r}")
        if seed is not None:
            jn.random.seed(seed)
        self.obs_dim, self.n_actions = int(obs_dim), int(n_actions)
        self.gamma, self.batch_episodes, self.baseline = float(gamma), int(batch_episodes), baseline
        self.explore, self.min_bucket = explore, int(min_bucket)
        if epsilon is None:
            epsilon = 0.0 if explore == "sample" else "linear:1,0.01,500"
        self.epsilon = make_schedule(epsilon)
        self._mix = not (isinstance(self.epsilon, ConstantSchedule) and self.epsilon.value == 0.0)
        self.device = jn.device(device or "cpu")
        self.net = mlp((self.obs_dim, *hidden, self.n_actions), activation).to(self.device)
        self.opt = make_optimizer(optimizer, self.net.parameters(), lr)
        self.episodes = 0          # finished episodes (the epsilon schedule's clock)
        self.updates = 0
        self._obs, self._act, self._rew, self._done = [], [], [], []
        self._in_batch = 0
        self._eps = np.zeros((), np.float32)
        wrap = jn.jit if use_jit else (lambda f: f)
        self._act_fn = wrap(self._act_graph)
        self._learn_fn = wrap(self._learn_graph)

    # -- graphs ---------------------------------------------------------------------------------------------------
    def _act_graph(self, obs, eps=None):
        logits = self.net(obs)
        if self.explore == "sample":
            u = jn.random.uniform(logits.shape, 1e-12, 1.0, device=logits.device)
            a = greedy_action(logits - jn.log(-jn.log(u)))
        else:
            a = greedy_action(logits)
        return explore_action(a, self.n_actions, eps) if self._mix else a

    def _learn_graph(self, obs, weights):
        self.opt.zero_grad()
        loss = -jn.sum(F.log_softmax(self.net(obs), axis=-1) * weights)
        loss.backward()
        self.opt.step()
        return loss

    # -- acting ---------------------------------------------------------------------------------------------------
    @property
    def stats(self):
        """Return counters: episodes, updates, current epsilon."""
        return {"episodes": self.episodes, "updates": self.updates, "epsilon": self.epsilon(self.episodes)}

    @property
    def transfers_per_act(self):
        """Host<->device copies of one act step on a GPU: the observation in, the action out (and epsilon in)."""
        return 3 if self._mix else 2

    transfers_per_update = 3          # the padded observations and the weights in, the loss out

    def act(self, obs):
        """Return the action (int) for one observation, sampled from the policy (or epsilon-greedy)."""
        x = jn.tensor(np.asarray(obs, np.float32).reshape(1, self.obs_dim), device=self.device)
        if not self._mix:                        # pure sampling: no epsilon input to the graph
            return int(self._act_fn(x).numpy()[0])
        self._eps[()] = self.epsilon(self.episodes)
        return int(self._act_fn(x, jn.tensor(self._eps, device=self.device)).numpy()[0])

    def policy(self, obs):
        """Return the action probabilities (NumPy) for a batch of observations (eager, no exploration)."""
        with jn.no_grad():
            x = jn.tensor(np.asarray(obs, np.float32).reshape(-1, self.obs_dim), device=self.device)
            return jn.softmax(self.net(x), axis=-1).numpy()

    def observe(self, obs, action, reward, next_obs, terminated, truncated):
        """Record one step; update after every ``batch_episodes`` episodes; return the loss or None."""
        self._obs.append(np.asarray(obs, np.float32).reshape(self.obs_dim))
        self._act.append(int(action))
        self._rew.append(float(reward))
        end = bool(terminated or truncated)
        self._done.append(end)
        if not end:
            return None
        self.episodes += 1
        self._in_batch += 1
        if self._in_batch >= self.batch_episodes:
            return self.update()
        return None

    # -- learning -------------------------------------------------------------------------------------------------
    def advantages(self, rewards, dones):
        """Return the per-step weights A_t: discounted returns of the batch after the chosen baseline."""
        ret = discounted_returns(rewards, self.gamma, dones)
        if self.baseline in ("normalize", "mean"):
            ret = ret - ret.mean()
        if self.baseline == "normalize":
            ret = ret / (ret.std() + 1e-8)
        return ret.astype(np.float32)

    def update(self):
        """Take one gradient step on the collected episodes and clear them; return the loss (float)."""
        n = len(self._act)
        if n == 0:
            return None
        dones = np.array(self._done, np.bool_)
        dones[-1] = True
        adv = self.advantages(np.array(self._rew, np.float32), dones)
        nb = bucket_size(n, self.min_bucket)
        obs = np.zeros((nb, self.obs_dim), np.float32)
        obs[:n] = np.stack(self._obs)
        w = np.zeros((nb, self.n_actions), np.float32)
        w[np.arange(n), np.array(self._act, np.int64)] = adv / max(self._in_batch, 1)
        loss = self._learn_fn(jn.tensor(obs, device=self.device), jn.tensor(w, device=self.device))
        self._obs, self._act, self._rew, self._done = [], [], [], []
        self._in_batch = 0
        self.updates += 1
        return float(loss.item())

    def compile_buckets(self, max_steps):
        """Compile the update for every bucket up to ``max_steps`` steps now; return the bucket sizes.

        Each bucket runs once on zero weights; parameters, optimizer state and counters are restored after.
        """
        saved = {k: np.array(np.asarray(v.numpy() if isinstance(v, jn.Tensor) else v), copy=True)
                 for k, v in jn.io.flatten_state(self.state_dict()).items()}
        sizes, b = [], bucket_size(1, self.min_bucket)
        while True:
            sizes.append(b)
            self._learn_fn(jn.zeros((b, self.obs_dim), device=self.device),
                           jn.zeros((b, self.n_actions), device=self.device))
            if b >= max_steps:
                break
            b *= 2
        self.load_state_dict(saved)
        return sizes

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self):
        """Return {'net': policy state, 'opt': optimizer state, 'counters': episodes/updates} for jn.io.Saver."""
        return {"net": dict(self.net.state_dict()), "opt": self.opt.state_dict(),
                "counters": {"episodes": jn.tensor(np.int64(self.episodes)),
                             "updates": jn.tensor(np.int64(self.updates))}}

    def load_state_dict(self, state):
        """Restore from :meth:`state_dict` output or its flattened form (what jn.io.load returns)."""
        flat = jn.io.flatten_state(state)
        self.net.load_state_dict({k[4:]: v for k, v in flat.items() if k.startswith("net/")})
        self.opt.load_state_dict({k[4:]: v for k, v in flat.items() if k.startswith("opt/")})
        if "counters/episodes" in flat:
            self.episodes = int(np.asarray(flat["counters/episodes"]))
            self.updates = int(np.asarray(flat["counters/updates"]))


jn.cache.protect_module(__name__)    # imported after jitnet: give this module's kernels the self-repairing cache


def train_pg(argv=None):
    """Train the REINFORCE agent (``python -m jitnet train pg-cartpole``); return the exit code."""
    p = agent_parser("pg-cartpole", "REINFORCE policy gradient on CartPole-v1 (or any discrete-action env)",
                       episodes=2000, lr=0.01, gamma=0.99, hidden=(16, 16), target=475.0)
    p.add_argument("--batch-episodes", type=int, default=1, help="episodes per update (default 1)")
    p.add_argument("--baseline", default="normalize", choices=["normalize", "mean", "none"],
                   help="return normalisation per batch (default normalize)")
    p.add_argument("--explore", default="sample", choices=["sample", "egreedy"],
                   help="sample from the policy, or take the greedy action with epsilon-greedy (default sample)")
    p.add_argument("--epsilon", default=None,
                   help="exploration schedule over episodes: a number, 'linear:1,0.01,500' or 'exp:1,0.01,0.99' "
                        "(default 0 with --explore sample, linear:1,0.01,500 with egreedy)")
    args = parse_agent_args(p, argv)
    env = make_env(args.env)
    obs_shape, n = env_spaces(env)
    eps = args.epsilon if args.epsilon is not None else ("linear:1,0.01,500" if args.explore == "egreedy" else 0)
    agent = PolicyGradientAgent(int(np.prod(obs_shape)), n, hidden=args.hidden, lr=args.lr, gamma=args.gamma,
                                batch_episodes=args.batch_episodes, baseline=args.baseline,
                                explore=args.explore, epsilon=make_schedule(eps), optimizer=args.optimizer,
                                seed=args.seed, use_jit=not args.no_jit, device=args.device_obj)
    return run_agent("pg-cartpole", args, agent, env)


TRAINERS = {"pg-cartpole": train_pg}
