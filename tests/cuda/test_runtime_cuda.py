"""The GPU runtime (``jitnet.cuda_runtime``): the caching allocator's reuse and statistics, prepared plan
launches, and the streams kernels launch on (in the simulator streams are no-ops: the tests check which stream
each launch was given and how the runtime orders them)."""
import gc

import numpy as np
import pytest
from numba import cuda as nc

import jitnet as jn
import jitnet.nn as nn
import jitnet.nn.functional as F
from jitnet import backend_cuda as G
from jitnet import cuda as C
from jitnet import cuda_runtime as R

SIM = C.simulator_enabled()
RNG = np.random.default_rng(11)
X = RNG.normal(size=(6, 5)).astype(np.float32)
Y = RNG.integers(0, 3, 6)


def stats():
    gc.collect()
    return jn.cuda.memory_stats()


def ptr(d):
    return C.array_interface(d)["data"][0]


@pytest.fixture
def pool_on(monkeypatch):
    monkeypatch.delenv("JITNET_CUDA_POOL", raising=False)
    R.reload_environment()
    yield
    R.reload_environment()


# ---------------------------------------------------------------------------------------------------------------
# size classes and the pool
# ---------------------------------------------------------------------------------------------------------------

def test_size_classes_cover_the_request_with_at_most_a_quarter_of_slack():
    prev = 0
    for n in sorted(list(range(0, 5000, 37)) + [2 ** k + d for k in range(12, 30, 3) for d in (-1, 0, 1)]):
        c = R.size_class(n)
        assert c >= max(n, R.MIN_BLOCK) and c % R.MIN_BLOCK == 0
        assert n <= R.MIN_BLOCK or c <= n * 1.25 + R.MIN_BLOCK, (n, c)
        assert c >= prev                                    # monotone in the request
        prev = c
    assert R.size_class(4096) == 4096 and R.size_class(4097) == 5120 and R.size_class(1 << 20) == 1 << 20
    with pytest.raises(ValueError, match="negative"):
        R.size_class(-1)


def test_a_freed_block_is_reused_for_a_request_of_its_class(pool_on):
    jn.cuda.empty_cache()
    x = C.empty((40000,), np.float32)                        # 160000 bytes: the 160 KiB class
    p, s1 = ptr(x), stats()
    assert s1["enabled"] and s1["allocated_bytes"] >= R.size_class(160000)
    del x
    s2 = stats()
    assert s2["num_frees"] == s1["num_frees"] + 1
    assert s2["cached_bytes"] == s1["cached_bytes"] + R.size_class(160000)
    assert s2["reserved_bytes"] == s1["reserved_bytes"]
    y = C.empty((200, 199), np.float32)                      # 159200 bytes: the same class
    s3 = stats()
    assert ptr(y) == p                                       # the very same memory
    assert s3["pool_hits"] == s2["pool_hits"] + 1 and s3["device_allocs"] == s2["device_allocs"]
    assert s3["reserved_bytes"] == s1["reserved_bytes"] and s3["allocated_bytes"] == s1["allocated_bytes"]
    z = C.empty((40000,), np.float32)                        # the class's free list is empty now: a new block
    assert ptr(z) != p and stats()["device_allocs"] == s3["device_allocs"] + 1


def test_pooled_arrays_hold_values_and_transfers_use_the_pool(pool_on):
    h = RNG.normal(size=(3, 4)).astype(np.float32)
    s0 = stats()
    d = C.to_device(h)
    assert tuple(d.shape) == (3, 4) and d.dtype == np.float32 and C.is_contiguous(d)
    np.testing.assert_array_equal(C.to_host(d), h)
    s1 = stats()
    assert s1["num_allocs"] == s0["num_allocs"] + 1
    t = jn.tensor(h).to("cuda")
    np.testing.assert_array_equal((t * 2 + 1).numpy(), h * 2 + 1)
    z = C.to_device(np.float32(2.5))                         # a 0-d array
    assert tuple(z.shape) == () and C.to_host(z)[()] == np.float32(2.5)
    e = C.empty((0, 3), np.float32)                          # no bytes: not from the pool
    assert tuple(e.shape) == (0, 3)
    odd = np.lib.stride_tricks.as_strided(np.arange(9, dtype=np.float32), (3, 3, 1), (12, 4, 0))
    assert odd.flags.c_contiguous                           # (a length-1 axis may have any stride)
    np.testing.assert_array_equal(C.to_host(C.to_device(odd)), odd)


def test_views_keep_the_block_taken(pool_on):
    x = C.empty((3000,), np.float32)
    v = C.view(x, (1000,), (8,), 4)                          # jitnet's view
    b = G.as_u8(G.full((5000,), True, np.bool_))             # a NumPy-level view of a pooled bool array
    s1 = stats()
    del x
    s2 = stats()
    assert s2["num_frees"] == s1["num_frees"] and s2["allocated_bytes"] == s1["allocated_bytes"]
    del v
    s3 = stats()
    assert s3["num_frees"] == s1["num_frees"] + 1
    assert s3["allocated_bytes"] == s1["allocated_bytes"] - R.size_class(12000)
    assert C.to_host(b).sum() == 5000                        # the bool array's block is still its own
    del b
    assert stats()["num_frees"] == s1["num_frees"] + 2


def test_peak_is_reported_and_reset(pool_on):
    big = R.size_class(1 << 21)
    jn.cuda.reset_peak_memory_stats()
    s0 = stats()
    assert s0["peak_allocated_bytes"] == s0["allocated_bytes"]
    x = C.empty((1 << 19,), np.float32)                      # 2 MiB
    del x
    s1 = stats()
    assert s1["peak_allocated_bytes"] >= s0["allocated_bytes"] + big
    assert s1["allocated_bytes"] == s0["allocated_bytes"]    # freed, but the peak remembers it
    assert s1["peak_reserved_bytes"] >= s1["reserved_bytes"]
    jn.cuda.reset_peak_memory_stats()
    s2 = stats()
    assert s2["peak_allocated_bytes"] == s2["allocated_bytes"] < s1["peak_allocated_bytes"]
    assert s2["peak_reserved_bytes"] == s2["reserved_bytes"]


def test_empty_cache_releases_the_free_blocks(pool_on):
    x = C.empty((30000,), np.float64)
    del x
    s1 = stats()
    assert s1["cached_bytes"] >= R.size_class(240000) and s1["cached_blocks"] >= 1
    jn.cuda.empty_cache()
    s2 = stats()
    assert s2["cached_bytes"] == 0 and s2["cached_blocks"] == 0
    assert s2["reserved_bytes"] == s2["allocated_bytes"] == s1["allocated_bytes"]
    C.empty((30000,), np.float64)                            # nothing cached: a new block
    s3 = stats()
    assert s3["device_allocs"] == s2["device_allocs"] + 1 and s3["pool_hits"] == s2["pool_hits"]


def test_pool_off_by_environment(monkeypatch):
    monkeypatch.setenv("JITNET_CUDA_POOL", "0")
    try:
        R.reload_environment()
        s0 = stats()
        assert not s0["enabled"] and s0["cached_bytes"] == 0
        x = C.to_device(np.arange(7, dtype=np.float32))
        y = C.empty((5,), np.int64)
        np.testing.assert_array_equal(C.to_host(x), np.arange(7))
        del x, y
        s1 = stats()
        assert s1["num_allocs"] == s0["num_allocs"] + 2
        assert s1["pool_hits"] == s0["pool_hits"] and s1["device_allocs"] == s0["device_allocs"]
        assert s1["cached_bytes"] == 0
        monkeypatch.setenv("JITNET_CUDA_POOL", "maybe")
        with pytest.raises(ValueError, match="JITNET_CUDA_POOL"):
            R.reload_environment()
    finally:
        monkeypatch.delenv("JITNET_CUDA_POOL")
        R.reload_environment()
    assert stats()["enabled"]


def mlp_step(make_opt):
    """Return (jitted training step of a tiny MLP on cuda, its model, the batch on cuda)."""
    jn.random.seed(3)
    m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to("cuda")
    opt = make_opt(m.parameters())

    @jn.jit
    def step(xb, yb):
        opt.zero_grad()
        loss = F.cross_entropy(m(xb), yb)
        loss.backward()
        opt.step()
        return loss

    return step, m, (jn.tensor(X).to("cuda"), jn.tensor(Y).to("cuda"))


def mlp_losses(steps=4):
    step, m, (xb, yb) = mlp_step(lambda ps: jn.optim.Adam(ps, lr=0.01))
    losses = [step(xb, yb).item() for _ in range(steps)]
    return losses, [p.numpy() for p in m.parameters()], step, (xb, yb)


def test_jitted_mlp_gives_the_same_losses_with_the_pool_on_and_off(monkeypatch):
    R.reload_environment()
    h0 = stats()["pool_hits"]
    on, p_on, _, _ = mlp_losses()
    assert stats()["pool_hits"] > h0                         # the steps reused freed blocks
    monkeypatch.setenv("JITNET_CUDA_POOL", "0")
    try:
        R.reload_environment()
        h1 = stats()["pool_hits"]
        off, p_off, _, _ = mlp_losses()
        assert stats()["pool_hits"] == h1
    finally:
        monkeypatch.delenv("JITNET_CUDA_POOL")
        R.reload_environment()
    assert on[-1] < on[0]
    np.testing.assert_array_equal(on, off)
    for a, b in zip(p_on, p_off):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# prepared launches
# ---------------------------------------------------------------------------------------------------------------

@nc.jit
def _axpy(n, a, s, out):
    for i in range(nc.grid(1), n, nc.gridsize(1)):
        out[i] = a[i] * s + out[i]


def test_a_prepared_launch_matches_the_plain_launch_and_is_configured_once_per_stream():
    n = 37
    h = np.arange(n, dtype=np.float32)
    a, plain, prep = C.to_device(h), C.to_device(np.ones(n, np.float32)), C.to_device(np.ones(n, np.float32))
    _axpy[3, 16](n, a, np.float32(2), plain)
    launch = R.PreparedLaunch(_axpy, 3, 16, arrays=[1, 3])
    R.reset_launch_stats()
    launch([n, a, np.float32(2), prep])
    np.testing.assert_array_equal(C.to_host(prep), C.to_host(plain))
    launch([n, a, np.float32(-1), prep])
    launch([n, a, np.float32(0.5), prep])
    np.testing.assert_array_equal(C.to_host(prep), 1 + h * 1.5)
    assert R.launch_stats()["prepared"] == 1
    s = jn.cuda.Stream()
    with jn.cuda.stream(s):
        launch([n, a, np.float32(1), prep])
        launch([n, a, np.float32(1), prep])
    assert R.launch_stats()["prepared"] == 2                # configured again, once, for the user stream
    np.testing.assert_array_equal(C.to_host(prep), 1 + h * 3.5)
    if not SIM:
        assert R.launch_stats()["overloads"] == 1           # one operand layout: looked up once


def cuda_groups(plan):
    return sum(1 for src in plan.sources if "@cuda.jit" in src)


def test_a_plan_prepares_its_fused_launches_once():
    step, _, (xb, yb) = mlp_step(lambda ps: jn.optim.SGD(ps, lr=0.1, momentum=0.9))
    step(xb, yb)
    R.reset_launch_stats()
    step(xb, yb)
    (comp,) = step._cache.values()
    n = cuda_groups(comp.plan)
    assert n >= 3
    assert R.launch_stats()["prepared"] == n                # each fused step's launch configured once
    losses = [step(xb, yb).item() for _ in range(3)]
    st = R.launch_stats()
    assert st["prepared"] == n                              # and not again on later calls
    assert st["plan_streams"] <= 1 and losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------------------------
# streams
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def launches(monkeypatch):
    """The stream each kernel launch was configured with (0 where none was given)."""
    if not SIM:
        pytest.skip("records launches through the simulator's kernel objects")
    from numba.cuda.simulator.kernel import FakeCUDAKernel
    seen = []
    orig = FakeCUDAKernel.__getitem__

    def getitem(self, config):
        seen.append(config[2] if len(config) > 2 else 0)
        return orig(self, config)

    monkeypatch.setattr(FakeCUDAKernel, "__getitem__", getitem)
    return seen


def test_a_plan_launches_on_its_own_stream_and_a_user_stream_inside_stream_blocks(launches):
    losses, _, step, (xb, yb) = mlp_losses(steps=2)
    (comp,) = step._cache.values()
    plan = comp.plan
    assert isinstance(plan.stream, jn.cuda.Stream)
    own = plan.stream.numba
    del launches[:]
    step(xb, yb)
    assert len(launches) >= cuda_groups(plan) and all(s is own for s in launches), launches
    s = jn.cuda.Stream()
    del launches[:]
    with jn.cuda.stream(s) as cur:
        assert cur is s and jn.cuda.current_stream() is s
        step(xb, yb)
        (xb * 2).numpy()                                    # an eager kernel inside the block
    assert launches and all(x is s.numba for x in launches), launches
    assert plan.stream.numba is own and jn.cuda.current_stream() is None
    del launches[:]
    (xb * 2).numpy()
    assert launches == [0]                                  # eager kernels outside: the default stream
    with jn.cuda.stream(None) as cur:                       # None: nothing changes
        assert cur is None and jn.cuda.current_stream() is None


def test_plans_nested_in_a_loop_use_the_outer_stream(launches):
    w = jn.tensor(RNG.normal(size=(3, 3)).astype(np.float32) * 0.5).to("cuda")
    xs = jn.tensor(RNG.normal(size=(3, 2, 3)).astype(np.float32)).to("cuda")

    @jn.jit
    def f(h0, xs):
        def body(h, x):
            h = jn.tanh(h @ w + x)
            return h, h * 2.0
        h, ys = jn.scan(body, h0, xs)
        return jn.sum(ys) + jn.sum(h)

    h0 = jn.tensor(RNG.normal(size=(2, 3)).astype(np.float32)).to("cuda")
    a = f(h0, xs).item()                                    # (traced: the loop ran its body's plan alone)
    R.reset_launch_stats()
    del launches[:]
    b = f(h0, xs).item()
    assert a == pytest.approx(b)
    (comp,) = f._cache.values()
    assert any(n.startswith("scan (cuda)") for n in comp.plan.step_names), comp.plan.step_names
    assert len(launches) >= 3 and all(s is comp.plan.stream.numba for s in launches), launches
    assert R.launch_stats()["plan_streams"] == 1             # the outer plan's; run inside it, the body's made none
    f(h0, xs)
    assert R.launch_stats()["plan_streams"] == 1


def test_switching_streams_orders_them():
    R.reset_launch_stats()
    a = C.to_device(np.arange(4, dtype=np.float32))
    s = jn.cuda.Stream()
    with jn.cuda.stream(s):
        b = G.copy(a)
    st = R.launch_stats()
    assert st["stream_switches"] >= 1 and st["stream_waits"] == 0      # a blocking stream: no event needed
    C.to_host(b)                                                        # back to the default stream to copy
    assert R.launch_stats()["stream_switches"] == st["stream_switches"] + 1
    ext = nc.stream()
    ext.external = True                                     # as numba.cuda.external_stream marks one
    with jn.cuda.stream(ext) as e:
        assert not e.blocking
        G.full((4,), 2.0, np.float32)
    C.to_host(b)
    assert R.launch_stats()["stream_waits"] == 2            # into and out of a stream of unknown kind
    with pytest.raises(TypeError, match="Numba CUDA stream"):
        jn.cuda.Stream(42)
    s.synchronize()
    jn.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------
# the GPU-only routes, driven without a GPU
# ---------------------------------------------------------------------------------------------------------------

class _FakeOverload:
    def __init__(self):
        self.calls = []

    def launch(self, args, griddim, blockdim, stream, sharedmem):
        self.calls.append((list(args), griddim, blockdim, stream, sharedmem))


class _FakeConfigured:
    def __init__(self, kernel, stream):
        self.kernel, self.griddim, self.blockdim, self.stream, self.sharedmem = kernel, (3, 1, 1), (16, 1, 1), \
            stream, 0

    def __call__(self, *args):
        self.kernel.dispatched.append(list(args))


class _FakeDispatcher:
    """What PreparedLaunch uses of a Numba CUDA dispatcher: configuration, typing, the overloads by types."""

    def __init__(self, known=True):
        self.dispatched, self.configured = [], []
        self.ovl = _FakeOverload()
        self.known = known

    def __getitem__(self, config):
        self.configured.append(config)
        return _FakeConfigured(self, config[2])

    def typeof_pyval(self, a):
        return ("array", a.strides) if hasattr(a, "strides") else type(a).__name__

    @property
    def overloads(self):
        return {("int", ("array", (4,)), ("array", (4,))): self.ovl} if self.known else {}


class _Arr:
    def __init__(self, strides):
        self.strides = strides


def test_the_gpu_route_of_a_prepared_launch_looks_the_overload_up_once_per_layout(monkeypatch):
    monkeypatch.setattr(R, "_sim", lambda: False)
    d = _FakeDispatcher()
    launch = R.PreparedLaunch(d, 3, 16, arrays=[1, 2])
    a, b = _Arr((4,)), _Arr((4,))
    R.reset_launch_stats()
    launch([5, a, b])                                       # first: Numba's whole launch, then the look-up
    launch([5, a, b])
    launch([6, b, a])
    assert len(d.dispatched) == 1 and len(d.ovl.calls) == 2
    assert d.ovl.calls[1][0] == [6, b, a] and d.ovl.calls[1][1:] == ((3, 1, 1), (16, 1, 1), 0, 0)
    assert R.launch_stats()["overloads"] == 1 and R.launch_stats()["prepared"] == 1
    launch([5, _Arr((8,)), b])                              # another layout: dispatched, looked up again
    assert len(d.dispatched) == 2 and R.launch_stats()["overloads"] == 2
    launch([5, _Arr((8,)), b])                              # (no overload under those types: the plain call)
    assert len(d.dispatched) == 3 and len(d.ovl.calls) == 2
    s = jn.cuda.Stream()
    with jn.cuda.stream(s):
        launch([5, a, b])
        launch([5, a, b])
    assert d.configured[-1] == (3, 16, s.numba) and R.launch_stats()["prepared"] == 2
    assert d.ovl.calls[-1][3] is s.numba
    u = _FakeDispatcher(known=False)                        # an overload the types do not find: always dispatched
    plain = R.PreparedLaunch(u, 3, 16, arrays=[1, 2])
    for _ in range(3):
        plain([5, a, b])
    assert len(u.dispatched) == 3 and not u.ovl.calls


_GPU_ARRAY_SCRIPT = r"""
import ctypes, gc, sys, types
import numpy as np
try:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray  # noqa: F401
except ImportError as e:
    print("SKIP", e); sys.exit(0)
from jitnet import cuda_runtime as R
R._nc = lambda: types.SimpleNamespace(current_context=lambda: types.SimpleNamespace())
block = types.SimpleNamespace(device_ctypes_pointer=ctypes.c_size_t(0x7f0000001000))  # only its address is read
pool = R._Pool()
arr = pool._gpu_array(block, 1024, (10, 20), np.dtype(np.float32), 800)
assert type(arr).__name__ == "DeviceNDArray" and arr.shape == (10, 20) and arr.strides == (80, 4)
assert arr.device_ctypes_pointer.value == 0x7f0000001000 and len(pool.live) == 1
v = arr.gpu_data.view(16)                   # Numba's own views of the memory
r = arr.reshape(200)
assert v.device_ctypes_pointer.value == 0x7f0000001010
del arr; gc.collect()
assert len(pool.live) == 1 and not pool.pending, "freed while views are alive"
del r; gc.collect()
assert len(pool.live) == 1 and not pool.pending
del v; gc.collect()
assert not pool.live and list(pool.pending) == [(1024, block)]
print("OK")
"""


def test_the_gpu_route_of_the_allocator_returns_a_block_after_its_last_view():
    """Numba's real pointer classes over a fake block address, in a process without the simulator."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-c", _GPU_ARRAY_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    out = r.stdout.strip()
    if out.startswith("SKIP"):
        pytest.skip(out)
    assert r.returncode == 0 and out == "OK", r.stdout + r.stderr
