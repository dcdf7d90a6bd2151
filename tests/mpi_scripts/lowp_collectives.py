"""Run under ``mpiexec -n 2``: float16/bfloat16 collectives reduce in float32; writes rank 0's results."""
import sys

import numpy as np

import jitnet as jn
import jitnet.distributed as dist

dist.init()
r = dist.rank()
res = {}
for name in ("bfloat16", "float16"):
    dt = getattr(jn, name)
    x = jn.tensor(np.array([1.0, 2.5, -3.0], np.float32) * (r + 1), dtype=dt)
    res[f"{name}/sum"] = dist.allreduce(x, "sum")
    res[f"{name}/mean"] = dist.allreduce(x, "mean")
    res[f"{name}/out"] = dist.allreduce(x, "sum", out=jn.zeros(3, dtype=dt))
    v = jn.Variable(x)
    dist.broadcast_variables([v], root=1)
    res[f"{name}/bcast"] = v
    res[f"{name}/metrics"] = jn.tensor(dist.allreduce_metrics({"m": np.float32(r).astype(dt.dtype if name ==
                                                               "bfloat16" else dt)})["m"])
o = jn.zeros((3, 2))[:, 0]                   # a strided out (a plain Tensor, not a Variable)
dist.allreduce(jn.tensor(np.array([1.0, 2.5, -3.0], np.float32) * (r + 1)), "sum", out=o)
res["strided/out"] = o
if r == 0:
    np.savez(sys.argv[1], **{k: np.asarray(v.numpy()).astype(np.float32) for k, v in res.items()},
             **{k + "/dtype": np.array(str(v.dtype)) for k, v in res.items()})
