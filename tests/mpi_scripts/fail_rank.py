"""Run under ``mpiexec -n 2``: an eager data-parallel training loop in which rank 1 fails at step 3.

Usage: fail_rank.py MODE   MODE: kill (SIGKILL itself), hang (SIGSTOP itself: the others' watchdog must end
the job; run with a short JITNET_MPI_TIMEOUT), raise (an uncaught exception: MPI_Abort from the excepthook).
Every surviving rank would loop forever without the failure handling: the test checks that the job ends
non-zero within its time limit.
"""
import os
import signal
import sys

import numpy as np

import jitnet as jn
import jitnet.distributed as dist
import jitnet.nn as nn

mode = sys.argv[1]
r, n = dist.init()
jn.random.seed(0)
net = nn.Linear(4, 2)
opt = dist.DistributedOptimizer(jn.optim.SGD(net.parameters(), lr=0.01))
x = jn.tensor(np.ones((2, 4), np.float32))
step = 0
while True:                                 # never ends by itself
    opt.zero_grad()
    jn.sum(net(x) ** 2).backward()
    opt.step()
    step += 1
    if step == 3 and r == 1:
        print(f"rank 1 fails now ({mode})", flush=True)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "hang":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            raise RuntimeError("a failure on rank 1")
