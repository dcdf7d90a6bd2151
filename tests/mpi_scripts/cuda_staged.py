"""Run under ``mpiexec -n 2`` with NUMBA_ENABLE_CUDASIM=1: collectives on GPU tensors are staged through the host.

Each rank puts a tensor on the (simulated) GPU, allreduces, broadcasts and allgathers it, and a jitted step
allreduces a GPU gradient-like tensor; the results must stay on the GPU and hold the right values.
"""
import numpy as np

import jitnet as jn
import jitnet.distributed as dist

r, n = dist.init()
x = jn.tensor(np.arange(6, dtype=np.float32).reshape(2, 3) * (r + 1)).to("cuda")
s = dist.allreduce(x, "sum")
assert s.device.type == "cuda", s.device
expected = np.arange(6, dtype=np.float32).reshape(2, 3) * sum(range(1, n + 1))
np.testing.assert_array_equal(s.cpu().numpy(), expected)
b = dist.broadcast(x)
np.testing.assert_array_equal(b.cpu().numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
g = dist.allgather(x)
assert g.shape == (2 * n, 3) and g.device.type == "cuda"
p = jn.Parameter(np.zeros(3, np.float32), device="cuda")
opt = dist.DistributedOptimizer(jn.optim.SGD([p], lr=1.0))
p.grad = jn.tensor(np.full(3, float(r + 1), np.float32)).to("cuda")
opt.step()
np.testing.assert_allclose(p.cpu().numpy(), -np.full(3, (n + 1) / 2, np.float32))
print(f"rank {r}: staged collectives ok", flush=True)
