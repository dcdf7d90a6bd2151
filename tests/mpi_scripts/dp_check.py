"""Run under ``mpiexec -n 2``: data-parallel training of tiny models against a one-process reference.

Each model trains K steps on 2 ranks (per-rank batch B/2, a sharded DataLoader, DistributedOptimizer), then
rank 0 trains the same model alone with batch B on the same epoch order and writes both results to
``OUT.npz``: ``<case>/dp/<name>`` and ``<case>/ref/<name>`` for every parameter and buffer.

Batch norm statistics are per-rank: each rank normalizes its half of the batch with that half's mean and
variance and updates its moving averages from them; ``average_buffers`` averages the moving averages over the
ranks at the end. The reference does the same in one process: each step runs the two halves (the rows rank 0
and rank 1 read) through the network separately from the same moving averages, adds their gradients (each
loss weighted 1/2) and takes the mean of the two updated moving averages.

Usage: dp_check.py OUT.npz [case ...]   cases: mlp_jit mlp_eager cnn_bn_jit embed_jit (default: all)
"""
import sys

import numpy as np

import jitnet as jn
import jitnet.distributed as dist
import jitnet.nn as nn
import jitnet.nn.functional as F
from jitnet.data import DataLoader
from jitnet.nn.embedding_ops import embedding

K = 5            # steps (the third plan run builds the native driver, so the collectives run inside it too)
B = 8            # global batch


def make_mlp():
    jn.random.seed(3)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    return net, jn.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)


def make_cnn_bn():
    jn.random.seed(4)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return net, jn.optim.Adam(net.parameters(), lr=0.01)


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(jn.random.normal((30, 6)) * 0.5)
        self.out = nn.Linear(6, 3)

    def forward(self, ids):
        return self.out(jn.mean(embedding(self.table, ids), axis=1))


def make_embed():
    jn.random.seed(5)
    net = EmbedNet()
    return net, jn.optim.Adam(net.parameters(), lr=0.05)


def data(case):
    rng = np.random.default_rng(11)
    n = B * K
    if case.startswith("embed"):
        x = rng.integers(0, 30, size=(n, 4)).astype(np.int64)
    elif case.startswith("cnn"):
        x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
    else:
        x = rng.standard_normal((n, 12)).astype(np.float32)
    y = rng.integers(0, 3, size=n).astype(np.int64)
    return x, y


MAKERS = {"mlp_jit": make_mlp, "mlp_eager": make_mlp, "cnn_bn_jit": make_cnn_bn, "embed_jit": make_embed}


def state(net):
    return {k: v.numpy().copy() for k, v in net.state_dict().items()}


def train_dp(case, r, n):
    net, opt = MAKERS[case]()
    if r != 0:                          # a different start on rank 1: the broadcast must overwrite it
        for p in net.parameters():
            p.assign(p.numpy() + 1.0)
    opt = dist.DistributedOptimizer(opt, module=net, bucket_bytes=256)   # small buckets: several per step

    def step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss

    fn = step if case.endswith("eager") else jn.jit(step)
    x, y = data(case)
    loader = DataLoader((x, y), batch_size=B // n, shuffle=True, seed=7, num_replicas=n, rank=r)
    net.train()
    for xb, yb in loader:
        fn(xb, yb)
    dist.average_buffers(net)
    out = state(net)
    if not case.endswith("eager"):
        # the compiled step: one native driver before the collectives, one per bucket, one driver after
        plans = [c.plan for c in fn._cache.values()]
        out["plan_steps"] = np.array([len(p.steps) for p in plans])
        pairs = [(p.grad, p) for p in opt._all_params()]
        dense = [g for g, _ in pairs if isinstance(g, jn.Tensor)]
        out["buckets"] = np.array(len(dist.plan_buckets([g.size * 4 for g in dense], [g.dtype for g in dense],
                                                        opt.bucket_bytes)))
        out["sparse"] = np.array(len(pairs) - len(dense))
    return out


def train_ref(case, n):
    net, opt = MAKERS[case]()
    x, y = data(case)
    loader = DataLoader((x, y), batch_size=B, shuffle=True, seed=7)
    bn = case.startswith("cnn")
    params = {id(p) for p in net.parameters()}
    bufs = [v for v in net.state_dict().values() if id(v) not in params]
    net.train()
    for xb, yb in loader:
        opt.zero_grad()
        if not bn:
            F.cross_entropy(net(xb), yb).backward()
        else:                             # ghost batches: the rows each rank reads, normalized separately
            start = [b.numpy().copy() for b in bufs]
            ends = []
            for h in range(n):
                for b, s in zip(bufs, start):
                    b.assign(s)
                xh = jn.tensor(xb.numpy()[h::n])
                yh = jn.tensor(yb.numpy()[h::n])
                (F.cross_entropy(net(xh), yh) * (1.0 / n)).backward()
                ends.append([b.numpy().copy() for b in bufs])
            for i, b in enumerate(bufs):
                b.assign(np.mean([e[i] for e in ends], axis=0).astype(b.dtype))
        opt.step()
    return state(net)


def main():
    out = sys.argv[1]
    cases = sys.argv[2:] or list(MAKERS)
    r, n = dist.init()
    results = {}
    for case in cases:
        for k, v in train_dp(case, r, n).items():
            results[f"{case}/dp/{k}"] = v
    if r == 0:
        for case in cases:
            for k, v in train_ref(case, n).items():
                results[f"{case}/ref/{k}"] = v
            net, _ = MAKERS[case]()
            for k, v in state(net).items():
                results[f"{case}/init/{k}"] = v
        np.savez(out, **results)
    else:                               # rank 1's parameters must equal rank 0's
        np.savez(out + f".rank{r}.npz", **results)
    dist.barrier()


if __name__ == "__main__":
    main()
