"""jitnet against the compilers: JAX (``jax.jit``, XLA CPU), ``torch.compile`` (inductor) and PyTorch eager.

    python bench/compilers.py --case mlp|lstm|chain|cnn|autoencoder|contention|coldstart|all
                              [--rounds 5] [--slow-rounds 2] [--threads 2] [--libs jitnet jax torch torch_compile]
                              [--fresh] [--quick] [--json out.json]

Each library runs in its own process (one library's thread pools disturb another's in a shared process): the
driver starts one worker per library (``python bench/compilers.py --worker LIB --case CASE ...``), each builds
and compiles its step, runs its check steps and warm-up, and prints a ``READY`` JSON line; then the rounds
alternate between the workers (the order rotates from round to round, and each block follows a 0.2 s pause
and one untimed step, so the previous library's spinning threads have gone to sleep), each worker printing a
``RESULT`` JSON line per block. ``--fresh`` starts a new worker for every library and round instead (shows the
spread between processes, e.g. a slow mode that depends on the process; it pays every setup again). Each table
shows every library's per-round figure (the median step time of its block), the median and the worst round,
and the ratios peer_time / jitnet_time (above 1: jitnet is faster): of the medians, and the smallest per-round
ratio (the round where jitnet's lead was smallest).

Every library starts from the same weights and inputs (NumPy, from ``--seed``) and reports check values: the
first training losses (MLP, CNN with its dropout set to 0 in a second copy of the model, autoencoder), the
value and gradient norms (LSTM), the output's sums (chain). The driver compares them with jitnet's within
float32 tolerance and exits with an error when they disagree.

Cases (each written the way that library's users write it):

* ``mlp``: MLP 784-256-256-10, batch 128, cross-entropy, SGD with momentum 0.9 (lr 0.01), the whole train
  step: ``@jn.jit``; ``jax.jit`` of value_and_grad + the update over plain pytrees (parameters and momentum
  donated); ``torch.compile`` of the train step (the torch.compile tutorial's pattern: forward, backward and
  ``opt.step()`` in one compiled function); PyTorch eager.
* ``lstm``: an LSTM cell, hidden 64, batch 16, input 32, over T=50 steps, loss sum(h_t^2) over the steps,
  value and gradient wrt (Wx, Wh, b): ``jn.scan`` under ``jn.jit``; ``lax.scan`` under ``jax.jit``; PyTorch's
  Python loop and ``torch.autograd.grad``, eagerly and with the loss function under ``torch.compile``.
* ``chain``: relu(a*b+c)*d-e on five 10M float32 arrays (a new output each call). The ``triad`` worker
  measures the machine's bandwidth with a Numba ``prange`` triad a = b + s*c (12 bytes per element, the
  STREAM count) on the same threads; each library's bandwidth counts 24 bytes per element (5 reads, 1 write)
  and is shown as a share of the triad's.
* ``cnn``: jitnet's ``cnn_mnist`` (jitnet/models/vision.py: conv5x5-32 same, pool, conv5x5-64 same, pool,
  fc-1024, dropout 0.5, 10; Adam 1e-3), batch 64 as the CLI trains it; JAX in NHWC (Flax's layout, fc weights
  permuted to match), dropout keys split per step; the torch.nn network of bench/torch_weights.py.
* ``autoencoder``: jitnet's Autoencoder 784-1000-500-250-30 and its mirror, each layer linear (no bias) +
  batch norm (training statistics) + sigmoid, batch 100 as the CLI, per-example squared L2 loss, Adam 1e-3.
* ``contention``: in each round, the MLP step idle, then with ONE busy process on the machine: the worker
  starts ``<this python> -c "while True: pass"`` (one process, default priority, no CPU pinning), waits
  0.5 s, times the steps again and kills it. Each library's slowdown is against its own idle time in the
  same process and round.
* ``coldstart``: wall time from the worker process's start (``subprocess.Popen``) to the end of the third
  finished MLP step. Cold: jitnet with fresh empty ``JITNET_CACHE_DIR`` and ``NUMBA_CACHE_DIR`` temporary
  directories, torch.compile with a fresh ``TORCHINDUCTOR_CACHE_DIR``, JAX without a compilation cache
  (``JAX_COMPILATION_CACHE_DIR`` unset); warm: a second process with the same directories. (In the other
  cases torch.compile's worker compiles in its own process, ``TORCHINDUCTOR_COMPILE_THREADS=1``: inductor's
  pool of compile processes otherwise keeps starting up, each importing torch, after a warm-cache compile
  has finished, and loads the machine during the next blocks.)

Threads (``--threads``, default 2) for every library: ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``,
``MKL_NUM_THREADS`` and ``NUMBA_NUM_THREADS``; jitnet ``jn.set_num_threads`` (and the training CLI's malloc
setting, as bench/_util.set_threads applies it); PyTorch ``torch.set_num_threads``. XLA's CPU runtime has no
thread-count setting: it starts one thread per schedulable CPU, so on a machine with more CPUs than
``--threads`` every worker is pinned (``os.sched_setaffinity``) to the first ``--threads`` CPUs, and with
``--threads 1`` JAX also gets ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``.
The header prints what was set.

``--quick``: a smoke run (1 round, 0.15 s blocks, the chain on 1M elements): it checks the plumbing and the
losses, not the speed. A full ``--case all`` (5 rounds, 2 for contention and coldstart) costs its workers
about 6.5 minutes of CPU time, a third of it coldstart's cold compiles; the first time torch.compile runs on
a machine, inductor's first compiles add about 2 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

LIBS = ("jitnet", "jax", "torch", "torch_compile")
TIMED_CASES = ("mlp", "lstm", "chain", "cnn", "autoencoder")
CASES = TIMED_CASES + ("contention", "coldstart")
LR_SGD, MOMENTUM, LR_ADAM = 0.01, 0.9, 1e-3
B, D_IN, H, D_OUT = 128, 784, 256, 10
T_LSTM, H_LSTM, B_LSTM, I_LSTM = 50, 64, 16, 32
N_CHAIN = 10_000_000
B_CNN, B_AE, CODE = 64, 100, 30
AE_DIMS = (784, 1000, 500, 250, CODE, 250, 500, 1000, 784)
CHECK_STEPS = 3
# relative tolerance of the check values (float32 arithmetic in different orders; Adam divides by the root of
# small second moments, so its runs drift a little more than SGD's)
RTOL = {"mlp": 1e-3, "contention": 1e-3, "coldstart": 1e-3, "lstm": 1e-3, "chain": 1e-4, "cnn": 3e-3,
        "autoencoder": 3e-3}
BUSY_CMD = "while True: pass"


# ==============================================================================================================
# Shared inputs: every library starts from these NumPy arrays
# ==============================================================================================================

def _rng(seed, salt):
    import numpy as np
    return np.random.default_rng([seed, salt])


def mlp_weights(seed):
    """[W1 (784, 256), b1, W2, b2, W3 (256, 10), b3]: He-normal weights, small random biases (x @ W layout)."""
    import numpy as np
    rng, out = _rng(seed, 1), []
    for a, c in ((D_IN, H), (H, H), (H, D_OUT)):
        out.append((rng.standard_normal((a, c)) * np.sqrt(2.0 / a)).astype(np.float32))
        out.append((rng.standard_normal(c) * 0.01).astype(np.float32))
    return out


def mlp_batch(seed):
    import numpy as np
    return _rng(seed, 2).standard_normal((B, D_IN), dtype=np.float32), (np.arange(B) % D_OUT).astype(np.int64)


def lstm_inputs(seed):
    """[xs (T, B, I), h0, c0, Wx (I, 4H), Wh (H, 4H), b (4H,)] (gate order i, f, g, o)."""
    import numpy as np
    rng = _rng(seed, 3)
    f = np.float32
    return [rng.standard_normal((T_LSTM, B_LSTM, I_LSTM), dtype=f), np.zeros((B_LSTM, H_LSTM), f),
            np.zeros((B_LSTM, H_LSTM), f), (rng.standard_normal((I_LSTM, 4 * H_LSTM)) * 0.1).astype(f),
            (rng.standard_normal((H_LSTM, 4 * H_LSTM)) * 0.1).astype(f),
            (rng.standard_normal(4 * H_LSTM) * 0.1).astype(f)]


def chain_inputs(seed, n):
    import numpy as np
    rng = _rng(seed, 4)
    return [rng.standard_normal(n, dtype=np.float32) for _ in range(5)]


def cnn_weights(seed):
    """CNNMnist's parameters in jitnet's layout: conv W (O, C, 5, 5), b; fc W (in, out), b."""
    import numpy as np
    rng, out = _rng(seed, 5), []
    for shape in ((32, 1, 5, 5), (64, 32, 5, 5), (7 * 7 * 64, 1024), (1024, 10)):
        fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[0]
        out.append((rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32))
        out.append((rng.standard_normal(shape[0] if len(shape) == 4 else shape[1]) * 0.01).astype(np.float32))
    return out


def cnn_batch(seed):
    import numpy as np
    return _rng(seed, 6).random((B_CNN, 1, 28, 28), dtype=np.float32), (np.arange(B_CNN) % 10).astype(np.int64)


def ae_weights(seed):
    """Per layer [W (in, out), gamma (out,), beta (out,)] of the autoencoder's 8 layers."""
    import numpy as np
    rng, out = _rng(seed, 7), []
    for a, c in zip(AE_DIMS[:-1], AE_DIMS[1:]):
        out.append((rng.standard_normal((a, c)) * np.sqrt(2.0 / (a + c))).astype(np.float32))
        out.append((1.0 + 0.1 * rng.standard_normal(c)).astype(np.float32))
        out.append((0.1 * rng.standard_normal(c)).astype(np.float32))
    return out


def ae_batch(seed):
    import numpy as np
    return _rng(seed, 8).random((B_AE, 1, 28, 28), dtype=np.float32)


# ==============================================================================================================
# Timing inside a worker
# ==============================================================================================================

def time_steps(fn, min_time, min_steps):
    """Run ``fn`` (which returns once its work is finished) repeatedly; return each call's seconds."""
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < min_steps or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def summary(times):
    return {"median_ms": statistics.median(times) * 1e3, "mean_ms": statistics.fmean(times) * 1e3,
            "min_ms": min(times) * 1e3, "steps": len(times)}


# ==============================================================================================================
# Libraries: each builder returns (step, check_values). ``step()`` runs one step and waits for its result.
# ==============================================================================================================

class JitnetLib:
    name = "jitnet"

    def __init__(self, threads):
        from _util import set_threads
        set_threads(threads, torch=False)        # jitnet's worker process runs jitnet alone
        import jitnet as jn
        self.jn = jn

    def _mlp_model(self, seed):
        import jitnet.nn as nn
        model = nn.Sequential(nn.Linear(D_IN, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, D_OUT))
        for p, w in zip(model.parameters(), mlp_weights(seed)):
            p.assign(w)
        return model

    def mlp(self, seed):
        jn = self.jn
        import jitnet.nn.functional as F
        model = self._mlp_model(seed)
        opt = jn.optim.SGD(model.parameters(), lr=LR_SGD, momentum=MOMENTUM)

        @jn.jit
        def train_step(x, y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        xn, yn = mlp_batch(seed)
        x, y = jn.tensor(xn), jn.tensor(yn)
        losses = [float(train_step(x, y).item()) for _ in range(CHECK_STEPS)]
        return (lambda: train_step(x, y).item()), losses

    def lstm(self, seed):
        jn = self.jn
        Hd = H_LSTM

        def loss(xs, h0, c0, Wx, Wh, b):
            def cell(carry, x):
                h, c = carry
                z = x @ Wx + h @ Wh + b
                i = jn.sigmoid(z[:, :Hd])
                f = jn.sigmoid(z[:, Hd:2 * Hd])
                g = jn.tanh(z[:, 2 * Hd:3 * Hd])
                o = jn.sigmoid(z[:, 3 * Hd:])
                c = f * c + i * g
                h = o * jn.tanh(c)
                return (h, c), h
            _, hs = jn.scan(cell, (h0, c0), xs)
            return jn.sum(hs * hs)

        vg = jn.jit(jn.value_and_grad(loss, argnums=(3, 4, 5)))
        args = [jn.tensor(a) for a in lstm_inputs(seed)]
        v, g = vg(*args)
        check = [float(v.item())] + [float(jn.sqrt(jn.sum(t * t)).item()) for t in g]
        return (lambda: vg(*args)[0].item()), check

    def chain(self, seed, n):
        jn = self.jn
        f = jn.jit(lambda a, b, c, d, e: jn.relu(a * b + c) * d - e)
        args = [jn.tensor(a) for a in chain_inputs(seed, n)]
        out = f(*args).numpy()
        return (lambda: f(*args)), _chain_check(out)

    def _cnn(self, seed, dropout):
        jn = self.jn
        from jitnet.models import vision as V
        model = V.CNNMnist(lr=LR_ADAM, dropout=dropout)
        for p, w in zip(model.net.parameters(), cnn_weights(seed)):
            p.assign(w)
        xn, yn = cnn_batch(seed)
        x, y = jn.tensor(xn), jn.tensor(yn)
        return (lambda: float(model.train_step(x, y).item()))

    def cnn(self, seed, check=True):
        losses = None
        if check:
            first = self._cnn(seed, 0.0)
            losses = [first() for _ in range(CHECK_STEPS)]
        return self._cnn(seed, 0.5), losses

    def autoencoder(self, seed):
        jn = self.jn
        from jitnet.models import vision as V
        model = V.Autoencoder(code_size=CODE, lr=LR_ADAM)
        for p, w in zip(model.net.parameters(), ae_weights(seed)):
            p.assign(w)
        x = jn.tensor(ae_batch(seed))
        losses = [float(model.train_step(x).item()) for _ in range(CHECK_STEPS)]
        return (lambda: model.train_step(x).item()), losses


class JaxLib:
    name = "jax"

    def __init__(self, threads):
        import jax
        import jax.numpy as jnp
        self.jax, self.jnp = jax, jnp

    def _adam(self, params, grads, m, v, t):
        tm = self.jax.tree_util.tree_map
        b1, b2, eps = 0.9, 0.999, 1e-8
        m = tm(lambda a, g: b1 * a + (1 - b1) * g, m, grads)
        v = tm(lambda a, g: b2 * a + (1 - b2) * g * g, v, grads)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        params = tm(lambda p, a, s: p - LR_ADAM * (a / c1) / (self.jnp.sqrt(s / c2) + eps), params, m, v)
        return params, m, v

    def _xent(self, logits, y):
        jax, jnp = self.jax, self.jnp
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    def mlp(self, seed):
        jax, jnp = self.jax, self.jnp
        tm = jax.tree_util.tree_map
        w = mlp_weights(seed)
        params = [(jnp.asarray(w[i]), jnp.asarray(w[i + 1])) for i in range(0, 6, 2)]
        mom = tm(jnp.zeros_like, params)

        def loss_fn(params, x, y):
            h = x
            for i, (W, b) in enumerate(params):
                h = h @ W + b
                if i < len(params) - 1:
                    h = jax.nn.relu(h)
            return self._xent(h, y)

        def train_step(params, mom, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            mom = tm(lambda m, g: MOMENTUM * m + g, mom, grads)
            params = tm(lambda p, m: p - LR_SGD * m, params, mom)
            return params, mom, loss

        train_step = jax.jit(train_step, donate_argnums=(0, 1))
        xn, yn = mlp_batch(seed)
        x, y = jnp.asarray(xn), jnp.asarray(yn)
        state = [params, mom]

        def step():
            state[0], state[1], loss = train_step(state[0], state[1], x, y)
            return float(loss)
        losses = [step() for _ in range(CHECK_STEPS)]
        return step, losses

    def lstm(self, seed):
        jax, jnp = self.jax, self.jnp
        Hd = H_LSTM

        def loss(xs, h0, c0, Wx, Wh, b):
            def cell(carry, x):
                h, c = carry
                z = x @ Wx + h @ Wh + b
                i = jax.nn.sigmoid(z[:, :Hd])
                f = jax.nn.sigmoid(z[:, Hd:2 * Hd])
                g = jnp.tanh(z[:, 2 * Hd:3 * Hd])
                o = jax.nn.sigmoid(z[:, 3 * Hd:])
                c = f * c + i * g
                h = o * jnp.tanh(c)
                return (h, c), h
            _, hs = jax.lax.scan(cell, (h0, c0), xs)
            return jnp.sum(hs * hs)

        vg = jax.jit(jax.value_and_grad(loss, argnums=(3, 4, 5)))
        args = [jnp.asarray(a) for a in lstm_inputs(seed)]
        v, g = vg(*args)
        check = [float(v)] + [float(jnp.sqrt(jnp.sum(t * t))) for t in g]
        return (lambda: vg(*args)[0].block_until_ready()), check

    def chain(self, seed, n):
        jax, jnp = self.jax, self.jnp
        f = jax.jit(lambda a, b, c, d, e: jax.nn.relu(a * b + c) * d - e)
        args = [jnp.asarray(a) for a in chain_inputs(seed, n)]
        out = f(*args).block_until_ready()
        import numpy as np
        return (lambda: f(*args).block_until_ready()), _chain_check(np.asarray(out))

    def _cnn(self, seed, dropout):
        jax, jnp, lax = self.jax, self.jnp, self.jax.lax
        tm = jax.tree_util.tree_map
        w = cnn_weights(seed)
        # NHWC activations and HWIO filters (Flax's layout); fc1's rows follow the NHWC flattening order
        fc1 = w[4].reshape(64, 7, 7, 1024).transpose(1, 2, 0, 3).reshape(7 * 7 * 64, 1024)
        params = {"c1": (jnp.asarray(w[0].transpose(2, 3, 1, 0)), jnp.asarray(w[1])),
                  "c2": (jnp.asarray(w[2].transpose(2, 3, 1, 0)), jnp.asarray(w[3])),
                  "f1": (jnp.asarray(fc1), jnp.asarray(w[5])), "f2": (jnp.asarray(w[6]), jnp.asarray(w[7]))}

        def conv(x, p):
            y = lax.conv_general_dilated(x, p[0], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return y + p[1]

        def pool(x):
            return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

        def loss_fn(params, x, y, key):
            h = pool(jax.nn.relu(conv(x, params["c1"])))
            h = pool(jax.nn.relu(conv(h, params["c2"])))
            h = h.reshape(h.shape[0], -1)
            h = jax.nn.relu(h @ params["f1"][0] + params["f1"][1])
            if dropout:
                keep = jax.random.bernoulli(key, 1.0 - dropout, h.shape)
                h = jnp.where(keep, h / (1.0 - dropout), 0.0)
            return self._xent(h @ params["f2"][0] + params["f2"][1], y)

        def train_step(params, m, v, t, x, y, key):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y, key)
            params, m, v = self._adam(params, grads, m, v, t)
            return params, m, v, loss

        train_step = jax.jit(train_step, donate_argnums=(0, 1, 2))
        xn, yn = cnn_batch(seed)
        x, y = jnp.asarray(xn.transpose(0, 2, 3, 1)), jnp.asarray(yn)
        state = {"p": params, "m": tm(jnp.zeros_like, params), "v": tm(jnp.zeros_like, params), "t": 0,
                 "key": jax.random.PRNGKey(seed)}

        def step():
            state["t"] += 1
            state["key"], sub = jax.random.split(state["key"])
            state["p"], state["m"], state["v"], loss = train_step(state["p"], state["m"], state["v"],
                                                                   jnp.float32(state["t"]), x, y, sub)
            return float(loss)
        return step

    def cnn(self, seed, check=True):
        losses = None
        if check:
            first = self._cnn(seed, 0.0)
            losses = [first() for _ in range(CHECK_STEPS)]
        return self._cnn(seed, 0.5), losses

    def autoencoder(self, seed):
        jax, jnp = self.jax, self.jnp
        tm = jax.tree_util.tree_map
        w = ae_weights(seed)
        params = [tuple(jnp.asarray(a) for a in w[i:i + 3]) for i in range(0, len(w), 3)]

        def loss_fn(params, x):
            h = x
            for W, gamma, beta in params:
                z = h @ W
                mean = jnp.mean(z, axis=0)
                var = jnp.var(z, axis=0)
                h = jax.nn.sigmoid((z - mean) * jax.lax.rsqrt(var + 1e-5) * gamma + beta)
            return jnp.mean(jnp.sum((h - x) ** 2, axis=1))

        def train_step(params, m, v, t, x):
            loss, grads = jax.value_and_grad(loss_fn)(params, x)
            params, m, v = self._adam(params, grads, m, v, t)
            return params, m, v, loss

        train_step = jax.jit(train_step, donate_argnums=(0, 1, 2))
        x = jnp.asarray(ae_batch(seed).reshape(B_AE, 784))
        state = {"p": params, "m": tm(jnp.zeros_like, params), "v": tm(jnp.zeros_like, params), "t": 0}

        def step():
            state["t"] += 1
            state["p"], state["m"], state["v"], loss = train_step(state["p"], state["m"], state["v"],
                                                                   jnp.float32(state["t"]), x)
            return float(loss)
        losses = [step() for _ in range(CHECK_STEPS)]
        return step, losses


class TorchLib:
    name = "torch"
    compiled = False

    def __init__(self, threads):
        import torch
        torch.set_num_threads(threads)
        self.torch = torch

    def _compile(self, fn):
        return self.torch.compile(fn) if self.compiled else fn

    def _mlp_net(self, seed):
        nn = self.torch.nn
        net = nn.Sequential(nn.Linear(D_IN, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, D_OUT))
        self._load(net, mlp_weights(seed))
        return net

    def _load(self, net, weights):
        """Copy jitnet-layout weights into ``net``'s parameters (Linear weights transposed)."""
        torch = self.torch
        with torch.no_grad():
            for p, w in zip(net.parameters(), weights):
                p.copy_(torch.from_numpy(w.T.copy() if w.ndim == 2 else w))

    def _train_step(self, net, opt, x, target, loss_of):
        def train_step():
            opt.zero_grad(set_to_none=True)
            loss = loss_of(net(x), target)
            loss.backward()
            opt.step()
            return loss
        return self._compile(train_step)

    def mlp(self, seed):
        torch = self.torch
        net = self._mlp_net(seed)
        opt = torch.optim.SGD(net.parameters(), lr=LR_SGD, momentum=MOMENTUM)
        xn, yn = mlp_batch(seed)
        step = self._train_step(net, opt, torch.from_numpy(xn), torch.from_numpy(yn),
                                torch.nn.functional.cross_entropy)
        losses = [float(step().item()) for _ in range(CHECK_STEPS)]
        return (lambda: step().item()), losses

    def lstm(self, seed):
        torch = self.torch
        Hd = H_LSTM

        def loss_fn(xs, h0, c0, Wx, Wh, b):
            h, c = h0, c0
            hs = []
            for t in range(xs.shape[0]):
                z = xs[t] @ Wx + h @ Wh + b
                i = torch.sigmoid(z[:, :Hd])
                f = torch.sigmoid(z[:, Hd:2 * Hd])
                g = torch.tanh(z[:, 2 * Hd:3 * Hd])
                o = torch.sigmoid(z[:, 3 * Hd:])
                c = f * c + i * g
                h = o * torch.tanh(c)
                hs.append(h)
            hs = torch.stack(hs)
            return (hs * hs).sum()

        loss_fn = self._compile(loss_fn)
        args = [torch.from_numpy(a) for a in lstm_inputs(seed)]
        params = args[3:]
        for p in params:
            p.requires_grad_(True)

        def vg():
            v = loss_fn(*args)
            return v, torch.autograd.grad(v, params)
        v, g = vg()
        check = [float(v.item())] + [float(t.norm().item()) for t in g]
        return (lambda: vg()[0].item()), check

    def chain(self, seed, n):
        torch = self.torch
        f = self._compile(lambda a, b, c, d, e: torch.relu(a * b + c) * d - e)
        args = [torch.from_numpy(a) for a in chain_inputs(seed, n)]
        out = f(*args).numpy()
        return (lambda: f(*args)), _chain_check(out)

    def _cnn(self, seed, dropout):
        torch = self.torch
        from torch_weights import torch_cnn
        net = torch_cnn(dropout)
        self._load(net, cnn_weights(seed))
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=LR_ADAM)
        xn, yn = cnn_batch(seed)
        step = self._train_step(net, opt, torch.from_numpy(xn), torch.from_numpy(yn),
                                torch.nn.functional.cross_entropy)
        return lambda: float(step().item())

    def cnn(self, seed, check=True):
        self.torch.manual_seed(seed)
        losses = None
        if check:
            first = self._cnn(seed, 0.0)
            losses = [first() for _ in range(CHECK_STEPS)]
        return self._cnn(seed, 0.5), losses

    def autoencoder(self, seed):
        torch, nn = self.torch, self.torch.nn
        layers = [nn.Flatten()]
        for a, c in zip(AE_DIMS[:-1], AE_DIMS[1:]):
            layers += [nn.Linear(a, c, bias=False), nn.BatchNorm1d(c), nn.Sigmoid()]
        net = nn.Sequential(*layers)
        self._load(net, ae_weights(seed))
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=LR_ADAM)
        x = torch.from_numpy(ae_batch(seed))
        step = self._train_step(net, opt, x, x.reshape(B_AE, 784),
                                lambda out, target: ((out - target) ** 2).sum(1).mean())
        losses = [float(step().item()) for _ in range(CHECK_STEPS)]
        return (lambda: step().item()), losses


class TorchCompileLib(TorchLib):
    name = "torch_compile"
    compiled = True

    def __init__(self, threads):
        super().__init__(threads)
        import logging
        import warnings
        warnings.filterwarnings("ignore")
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
        logging.getLogger("torch._inductor").setLevel(logging.ERROR)


LIB_CLASSES = {"jitnet": JitnetLib, "jax": JaxLib, "torch": TorchLib, "torch_compile": TorchCompileLib}


def _chain_check(out):
    import numpy as np
    o = np.asarray(out, np.float64)
    return [float(o.sum()), float(np.abs(o).sum())]


def triad_step(threads, n):
    """Return (step, bytes per step) of the machine's triad a = b + s*c (Numba prange, ``threads`` threads)."""
    os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
    import numba
    import numpy as np
    numba.set_num_threads(threads)

    @numba.njit(parallel=True, fastmath=True)
    def triad(a, b, c, s):
        for i in numba.prange(a.shape[0]):
            a[i] = b[i] + s * c[i]

    a = np.zeros(n, np.float32)
    b, c = chain_inputs(0, n)[:2]
    s = np.float32(3.0)
    return (lambda: triad(a, b, c, s)), 12.0 * n


# ==============================================================================================================
# Worker
# ==============================================================================================================

def _block(step, min_time, min_steps):
    """One timed block: an untimed call (the caches and thread pools after another process ran), then steps."""
    step()
    return summary(time_steps(step, min_time, min_steps))


def run_worker(args):
    """Set one library up on one case, print ``READY {json}``, then run a timed block for each ``run`` line read
    from stdin, printing ``RESULT {json}`` after each, until ``exit`` or the end of stdin."""
    t_start = time.time()
    quick = args.quick
    min_time = 0.15 if quick else 0.4
    min_steps, warmup = (3, 5) if quick else (5, 5)
    n_chain = N_CHAIN // 10 if quick else N_CHAIN
    base = {"lib": args.worker, "case": args.case, "pid": os.getpid(), "threads": args.threads}
    ready = dict(base)

    def emit(tag, d):
        print(f"{tag} " + json.dumps(d), flush=True)

    if args.worker == "triad":
        step, gb = triad_step(args.threads, n_chain)
        ready["n"] = n_chain
    else:
        lib = LIB_CLASSES[args.worker](args.threads)
        ready["import_s"] = time.time() - t_start
        case = "mlp" if args.case in ("contention", "coldstart") else args.case
        t0 = time.perf_counter()
        if case == "chain":
            step, check = lib.chain(args.seed, n_chain)
            ready["n"], gb = n_chain, 24.0 * n_chain
        elif case == "cnn":
            step, check = lib.cnn(args.seed, check=not args.no_check)
        else:
            step, check = getattr(lib, case)(args.seed)
        ready["check"] = check
        if args.case == "coldstart":
            ready["t_third_step"] = time.time()       # the check ran the first three steps
        ready["setup_s"] = time.perf_counter() - t0   # building, compiling, the check steps
        if case != "chain":
            gb = None
    if args.case != "coldstart":
        for _ in range(warmup):
            step()
    emit("READY", ready)
    if args.case == "coldstart":
        return ready
    for line in sys.stdin:
        if line.strip() != "run":
            break
        res = dict(base, **_block(step, min_time, min_steps))
        if gb:
            res["gb_s"] = gb / (res["median_ms"] * 1e-3) / 1e9
        if args.case == "contention":
            res["idle"] = {k: res[k] for k in ("median_ms", "mean_ms", "min_ms", "steps")}
            busy = subprocess.Popen([sys.executable, "-c", BUSY_CMD])
            try:
                time.sleep(0.5)
                res["busy"] = summary(time_steps(step, min_time, min_steps))
            finally:
                busy.kill()
                busy.wait()
            res["median_ms"] = res["busy"]["median_ms"]
            res["slowdown"] = res["busy"]["median_ms"] / res["idle"]["median_ms"]
        emit("RESULT", res)
    return ready


def worker_env(lib, threads, extra=None):
    env = dict(os.environ)
    for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[v] = str(threads)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.setdefault("JAX_PLATFORMS", "cpu")
    if threads == 1 and lib == "jax":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    env.update(extra or {})
    return env


def _pin(threads):
    """Pin this process (and its children) to the first ``threads`` CPUs when the machine has more."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None
    if len(cpus) > threads:
        os.sched_setaffinity(0, cpus[:threads])
        return cpus[:threads]
    return None


# ==============================================================================================================
# Driver
# ==============================================================================================================

class Worker:
    """One worker process (``--worker LIB --case CASE``): started and set up on creation (``ready`` holds its
    READY record: check values, import and setup seconds), ``run()`` times one block, ``close()`` ends it."""

    def __init__(self, lib, case, args, extra_env=None, check=True):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", lib, "--case", case,
               "--threads", str(args.threads), "--seed", str(args.seed)]
        if args.quick:
            cmd.append("--quick")
        if not check:
            cmd.append("--no-check")
        self.lib, self.case, self.gap = lib, case, 0.05 if args.quick else 0.2
        self.err = tempfile.TemporaryFile(mode="w+")
        self.t_start = time.time()
        self.proc = subprocess.Popen(cmd, env=worker_env(lib, args.threads, extra_env), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1)
        self.ready = self._read("READY")
        self.ready["ready_s"] = time.time() - self.t_start

    def _read(self, tag):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                self.err.seek(0)
                raise RuntimeError(f"worker {self.lib}/{self.case} ended (exit {self.proc.returncode}) before "
                                   f"its {tag} line:\n{self.err.read()[-3000:]}")
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])

    def run(self):
        """Time one block in the worker (after a pause that lets other processes' spinning threads sleep)."""
        time.sleep(self.gap)
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read("RESULT")

    def close(self):
        """End the worker; return its CPU seconds (user + system, its children included)."""
        try:
            self.proc.stdin.write("exit\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            _, status, ru = os.wait4(self.proc.pid, 0)
            self.proc.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            self.proc.wait()
            return None
        self.err.close()
        return ru.ru_utime + ru.ru_stime


def _order(libs, r):
    k = r % len(libs)
    return list(libs[k:]) + list(libs[:k])


def _ratio_rows(case, libs, per_lib, key="median_ms", unit="ms"):
    """Rows of a timing table: per-round figures, median, worst, ratios to jitnet."""
    rows = []
    ref = per_lib.get("jitnet")
    for lib in libs:
        vals = [r[key] for r in per_lib[lib]]
        row = {"lib": lib}
        for i, v in enumerate(vals):
            row[f"r{i + 1}_{unit}"] = v
        row[f"median_{unit}"] = statistics.median(vals)
        row[f"worst_{unit}"] = max(vals)
        if ref and lib != "jitnet":
            rv = [r[key] for r in ref]
            row["x_jitnet"] = statistics.median(vals) / statistics.median(rv)
            row["x_jitnet_worst_round"] = min(v / w for v, w in zip(vals, rv))
        elif ref:
            row["x_jitnet"] = row["x_jitnet_worst_round"] = 1.0
        rows.append(row)
    return rows


def check_agreement(case, per_lib):
    """Compare every run's check values with the reference library's first run; return a list of problems."""
    import numpy as np
    ref_lib = "jitnet" if "jitnet" in per_lib else next(iter(per_lib))
    ref = np.asarray(per_lib[ref_lib][0]["check"], np.float64)
    problems = []
    for lib, runs in per_lib.items():
        for i, r in enumerate(runs):
            if r.get("check") is None:
                continue
            c = np.asarray(r["check"], np.float64)
            if c.shape != ref.shape or not np.all(np.isfinite(c)) or \
                    not np.allclose(c, ref, rtol=RTOL[case], atol=1e-6 * max(1.0, float(np.abs(ref).max()))):
                problems.append(f"{case}: {lib} round {i + 1} check values {c.tolist()} disagree with "
                                f"{ref_lib}'s {ref.tolist()} (rtol {RTOL[case]})")
    return problems


def _coldstart(case, args, libs, record):
    """Cold and warm process starts: fresh cache directories per library and round, the same ones for warm."""
    cold, warm = {lib: [] for lib in libs}, {lib: [] for lib in libs}
    for r in range(record["rounds"]):
        for lib in _order(libs, r):
            root = tempfile.mkdtemp(prefix="jitnet-coldstart-")
            try:
                env = {"JITNET_CACHE_DIR": os.path.join(root, "k"), "NUMBA_CACHE_DIR": os.path.join(root, "n"),
                       "TORCHINDUCTOR_CACHE_DIR": os.path.join(root, "inductor")}
                for kind, out in (("cold", cold), ("warm", warm)):
                    w = Worker(lib, case, args, env)
                    res = dict(w.ready, kind=kind, start_to_third_step_s=w.ready["t_third_step"] - w.t_start)
                    res["cpu_s"] = w.close()
                    out[lib].append(res)
                    record["runs"].append(res)
                    print(f"  {case} round {r + 1} {lib} {kind}: {res['start_to_third_step_s']:.2f} s", flush=True)
            finally:
                shutil.rmtree(root, ignore_errors=True)
    return cold, warm


def _timed_rounds(case, args, libs, record):
    """Run the rounds of a timed case; return ({lib: [RESULT per round]}, {lib: [READY records]}, triad)."""
    rounds = record["rounds"]
    names = list(libs) + (["triad"] if case == "chain" else [])
    per, readies = {lib: [] for lib in names}, {lib: [] for lib in names}
    workers = {}

    def start(lib, first):
        # inductor's pool of compile processes keeps starting (each imports torch) after a warm-cache compile
        # has finished: it would load the machine during the other libraries' first blocks
        env = {"TORCHINDUCTOR_COMPILE_THREADS": "1"} if lib == "torch_compile" else None
        w = Worker(lib, case, args, env, check=first)
        readies[lib].append(w.ready)
        return w

    def stop(lib, w):
        readies[lib][-1]["cpu_s"] = w.close()

    try:
        if not args.fresh:
            for lib in names:
                workers[lib] = start(lib, True)
        for r in range(rounds):
            for lib in _order(libs, r) + names[len(libs):]:
                w = workers[lib] if not args.fresh else start(lib, r == 0)
                try:
                    res = w.run()
                finally:
                    if args.fresh:
                        stop(lib, w)
                res["round"] = r + 1
                per[lib].append(res)
                record["runs"].append(res)
                extra = f", slowdown {res['slowdown']:.2f}x" if case == "contention" else ""
                print(f"  {case} round {r + 1} {lib}: {res['median_ms']:.3f} ms{extra}", flush=True)
    finally:
        for lib, w in workers.items():
            stop(lib, w)
    record["workers"] = [dict(r) for lib in names for r in readies[lib]]
    triad = per.pop("triad", None)
    readies.pop("triad", None)
    return per, readies, triad


def run_case(case, args, libs, report):
    """Run one case over its rounds; print its table(s); return its JSON record."""
    from _util import table
    rounds = 1 if args.quick else (args.slow_rounds if case in ("contention", "coldstart") else args.rounds)
    record = {"case": case, "rounds": rounds, "libs": list(libs), "runs": [],
              "processes": "fresh per round" if args.fresh or case == "coldstart" else "one per library"}
    t_case = time.perf_counter()
    if case == "coldstart":
        cold, warm = _coldstart(case, args, libs, record)
        record["cold"], record["warm"] = cold, warm
        for kind, per in (("cold", cold), ("warm", warm)):
            rows = _ratio_rows(case, libs, per, "start_to_third_step_s", "s")
            record[f"rows_{kind}"] = rows
            report.append(table(rows, f"\n{case} ({kind} caches): process start to the end of the third MLP "
                                      f"step, seconds; x_jitnet = peer / jitnet"))
        problems = check_agreement(case, {lib: cold[lib] + warm[lib] for lib in libs})
    else:
        per_lib, readies, triad = _timed_rounds(case, args, libs, record)
        where = "each round in a new process" if args.fresh else "one process per library, rounds alternating"
        if case == "contention":
            idle = {lib: [dict(median_ms=x["idle"]["median_ms"]) for x in per_lib[lib]] for lib in libs}
            rows = _ratio_rows(case, libs, idle)
            report.append(table(rows, f"\n{case}: MLP step idle, ms ({where})"))
            record["rows_idle"] = rows
            rows = _ratio_rows(case, libs, per_lib)
            for row in rows:
                sl = [x["slowdown"] for x in per_lib[row["lib"]]]
                row["slowdown_median"] = statistics.median(sl)
                row["slowdown_worst"] = max(sl)
            report.append(table(rows, f"\n{case}: MLP step with ONE busy process ({sys.executable} -c "
                                      f"\"{BUSY_CMD}\"), ms; slowdown = busy / idle in the same process and round"))
            record["rows"] = rows
        else:
            rows = _ratio_rows(case, libs, per_lib)
            if case == "chain":
                tri = statistics.median(t["gb_s"] for t in triad)
                record["triad_gb_s"] = tri
                record["triad_runs"] = [t["gb_s"] for t in triad]
                for row in rows:
                    gb = statistics.median(x["gb_s"] for x in per_lib[row["lib"]])
                    row["gb_s"] = gb
                    row["pct_triad"] = 100.0 * gb / tri
                print(f"\ntriad (Numba prange a = b + s*c, {args.threads} threads, 12 bytes per element): "
                      f"{', '.join(f'{t:.1f}' for t in record['triad_runs'])} GB/s, median {tri:.1f} GB/s",
                      flush=True)
            report.append(table(rows, f"\n{case}: {CASE_TITLES[case]}; ms per step, each round the median of "
                                      f"its block ({where}); x_jitnet = peer / jitnet"))
            record["rows"] = rows
        problems = check_agreement(case, readies)
    record["seconds"] = time.perf_counter() - t_case
    record["check_problems"] = problems
    src = record.get("workers", record["runs"])
    record["checks"] = {f"{r['lib']}/{r.get('kind', 'pid %d' % r['pid'])}": r["check"] for r in src
                        if r.get("check") is not None}
    print(f"{case}: {record['seconds']:.1f} s; check values {'AGREE' if not problems else 'DISAGREE'}",
          flush=True)
    return record


CASE_TITLES = {
    "mlp": f"MLP {D_IN}-{H}-{H}-{D_OUT} SGD-momentum train step, batch {B}",
    "lstm": f"LSTM cell h{H_LSTM} b{B_LSTM} i{I_LSTM} over T={T_LSTM} (scan), value and grad",
    "chain": "relu(a*b+c)*d-e on 10M float32 (24 bytes per element)",
    "cnn": f"cnn_mnist train step (Adam, dropout 0.5), batch {B_CNN}",
    "autoencoder": f"autoencoder 784-1000-500-250-{CODE} train step (batch norm, Adam), batch {B_AE}",
}


def header(args, libs, pinned):
    mode = "a new process per library and round" if args.fresh else "one process per library and case"
    lines = [f"jitnet vs compilers: {args.threads} threads per library, each library in its own process ({mode}), "
             f"{args.rounds} rounds ({args.slow_rounds} for contention and coldstart), libraries alternating"
             f"{' [--quick: 1 round, few steps, not a measurement]' if args.quick else ''}",
             f"  libraries: {', '.join(libs)}; python {sys.version.split()[0]}; {os.cpu_count()} CPUs"
             + (f", workers pinned to CPUs {pinned}" if pinned else ""),
             f"  threads: OPENBLAS/OMP/MKL/NUMBA_NUM_THREADS={args.threads}, jn.set_num_threads({args.threads}), "
             f"torch.set_num_threads({args.threads}); JAX: XLA's CPU pool, one thread per schedulable CPU"
             + (" + XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
                if args.threads == 1 else f" ({len(os.sched_getaffinity(0))} here)")]
    try:
        import importlib.metadata as md
        lines.append("  versions: " + ", ".join(f"{p} {md.version(p)}" for p in ("jitnet", "jax", "jaxlib",
                                                                               "torch", "numba", "numpy")
                                                if _has(md, p)))
    except Exception:                     # noqa: BLE001 (versions are informative only)
        pass
    if "contention" in args.cases:
        lines.append(f"  contention: ONE busy process, `{sys.executable} -c \"{BUSY_CMD}\"`, started by each "
                     f"worker after its idle timing (default priority, not pinned), killed after the busy timing")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _has(md, p):
    try:
        md.version(p)
        return True
    except md.PackageNotFoundError:
        return False


def available(libs, threads):
    """Return the libraries whose modules import here (the others are reported and skipped)."""
    import importlib.util
    mods = {"jitnet": "jitnet", "jax": "jax", "torch": "torch", "torch_compile": "torch"}
    out = []
    for lib in libs:
        if importlib.util.find_spec(mods[lib]) is None:
            print(f"  {lib}: not installed, skipped (pip install \"jitnet[bench]\")", flush=True)
        else:
            out.append(lib)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="mlp", choices=CASES + ("all",))
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    p.add_argument("--rounds", type=int, default=5, help="rounds of the step cases (default 5)")
    p.add_argument("--slow-rounds", type=int, default=2, help="rounds of contention and coldstart (default 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (1 round, few steps)")
    p.add_argument("--fresh", action="store_true",
                   help="start a new worker process for every library and round (the spread between processes; "
                        "slower) instead of one process per library and case")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", choices=LIBS + ("triad",), help=argparse.SUPPRESS)
    p.add_argument("--no-check", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads < 1 or args.rounds < 1 or args.slow_rounds < 1:
        p.error("--threads, --rounds and --slow-rounds must be at least 1")
    if args.worker:
        if args.case == "all":
            p.error("a worker runs one case")
        _pin(args.threads)
        res = run_worker(args)
        print("RESULT " + json.dumps(res), flush=True)
        return res
    args.cases = list(CASES) if args.case == "all" else [args.case]
    libs = available(args.libs, args.threads)
    if "jitnet" not in libs:
        p.error("jitnet is the reference of every ratio: keep it in --libs")
    pinned = _pin(args.threads)
    report = [header(args, libs, pinned)]
    t0 = time.perf_counter()
    out = {"config": {"threads": args.threads, "rounds": args.rounds, "slow_rounds": args.slow_rounds,
                      "quick": args.quick, "fresh": args.fresh, "seed": args.seed, "libs": libs, "pinned_cpus": pinned,
                      "busy_process": f"{sys.executable} -c \"{BUSY_CMD}\" (1 process)"},
           "cases": {}}
    problems = []
    for case in args.cases:
        rec = run_case(case, args, libs, report)
        out["cases"][case] = rec
        problems += rec["check_problems"]
    out["seconds"] = time.perf_counter() - t0
    out["check_problems"] = problems
    print(f"\ntotal {out['seconds']:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if problems:
        print("\nCHECK FAILED: the libraries computed different results:\n  " + "\n  ".join(problems),
              file=sys.stderr, flush=True)
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()
