"""Train REINFORCE and DQN on CartPole-v1 with the library API (needs gymnasium: pip install 'jitnet[rl]').

    python examples/rl_cartpole.py [--agent pg|dqn] [--episodes N] [--seed S]

The same runs are available as ``python -m jitnet train pg-cartpole`` / ``dqn-cartpole`` with logging,
checkpoints and a plot; this file shows the few lines underneath.
"""
import argparse

import numpy as np

from jitnet.models.dqn import DQNAgent
from jitnet.models.policy_gradient import PolicyGradientAgent
from jitnet.models.rl import env_spaces, make_env, train_agent


def main():
    """Train one agent until the 100-episode mean return reaches its target; print the outcome."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agent", default="pg", choices=["pg", "dqn"])
    ap.add_argument("--episodes", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    env = make_env("CartPole-v1")
    (obs_dim,), n_actions = env_spaces(env)
    if args.agent == "pg":
        # a 4-16-16-2 policy, sampled in-graph; returns normalised per update; Adam
        agent = PolicyGradientAgent(obs_dim, n_actions, hidden=(16, 16), lr=0.01, gamma=0.99, seed=args.seed)
        target = 475.0
    else:
        # Double DQN, 128-128 Q-network, replay 10k, batch 128, soft target update 0.005, epsilon 1 -> 0.05
        agent = DQNAgent(obs_dim, n_actions, hidden=(128, 128), lr=1e-4, buffer_size=10000, batch_size=128,
                         tau=0.005, epsilon="linear:1,0.05,5000", seed=args.seed)
        target = 195.0
    res = train_agent(agent, env, args.episodes, seed=args.seed, target=target, progress=True)
    print(f"{args.agent}: {len(res['returns'])} episodes, solved at {res['solved_episode']}, "
          f"last-100 mean {np.mean(res['returns'][-100:]):.1f}, {res['steps']} steps in {res['seconds']:.1f} s")


if __name__ == "__main__":
    main()
