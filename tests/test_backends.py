"""Adding a device kind is one module: a ``jitnet.backends.Backend`` subclass, registered, with its arrays.

The worked example of docs/ARCHITECTURE.md ("How to add a backend"): a "boxed" device whose arrays are NumPy
arrays in an opaque box (standing for memory the host cannot read directly). Its ``impl`` runs a row's CPU
implementation on the unboxed arrays, and its plan target runs the CPU code generator's fused kernels, so the
example is short; a real backend gives its own kernels in the same places. Nothing else in the library changes:
tensors move to it with ``.to("boxed")``, eager ops, gradients, optimizers and ``jn.jit`` plans run through it,
and results come back with ``.numpy()``.
"""
from collections import Counter

import numpy as np
import pytest

import jitnet as jn
from jitnet import backends, nn


class Boxed:
    """An array of the boxed device."""

    __slots__ = ("a",)

    def __init__(self, a):
        self.a = a

    shape = property(lambda self: self.a.shape)
    dtype = property(lambda self: self.a.dtype)
    ndim = property(lambda self: self.a.ndim)
    size = property(lambda self: self.a.size)


def unbox(x):
    return x.a if isinstance(x, Boxed) else tuple(map(unbox, x)) if isinstance(x, tuple) else x


def box(x):
    return Boxed(x) if isinstance(x, np.ndarray) else tuple(map(box, x)) if isinstance(x, tuple) else x


class BoxedBackend(backends.Backend):
    name = "boxed"

    def __init__(self):
        self.calls = Counter()          # what ran on this device: row names, and "fused" for generated kernels

    # arrays
    def owns(self, arr):
        return isinstance(arr, Boxed)

    def empty(self, shape, dtype):
        return Boxed(np.empty(shape, dtype))

    def from_host(self, arr):
        return Boxed(np.array(arr, copy=True))

    def to_host(self, arr):
        return arr.a.copy()

    # ops: every row's implementation on this device
    def impl(self, prim):
        cpu = prim.impl["cpu"]
        if prim.extra.get("any_device"):        # the transfer between devices handles every device's arrays
            return cpu

        def run(*arrays, **params):
            self.calls[prim.name] += 1
            return box(cpu(*[unbox(a) for a in arrays], **params))
        return run

    # plan target: fused groups and nodes of a jitted step on this device
    def group_kernel(self, program, out_rank, in_maps, scalar_kinds, size):
        return backends.CPU.group_kernel(program, out_rank, in_maps, scalar_kinds, size)

    def group_step(self, kernel, in_slots, o, out, buf, into, in_maps, scalar_kinds):
        kshape, oshape = out.shape or (1,), out.shape

        def step(env):
            self.calls["fused"] += 1
            ins = [unbox(env[i]) for i in in_slots]
            if into is not None:
                kernel(*ins, env[into].a.reshape(kshape))
                env[o] = env[into]
            else:
                dst = buf.a if buf is not None else np.empty(kshape, out.dtype)
                kernel(*ins, dst)
                env[o] = Boxed(dst.reshape(oshape))
        return step

    def node_step(self, node, in_slots, o, buffer):
        f, params = self.impl(node.prim), node.params

        def step(env):
            env[o] = f(*[env[i] for i in in_slots], **params)
        return step, False


BOXED = backends.get("boxed") if "boxed" in backends.names() else backends.register(BoxedBackend())


def _mlp_run(dev, jit):
    jn.random.seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dev)
    opt = jn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    x = jn.tensor(rng.standard_normal((6, 4)).astype(np.float32)).to(dev)
    y = jn.tensor(rng.integers(0, 3, 6)).to(dev)

    def step(x, y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    f = jn.jit(step) if jit else step
    losses = [f(x, y).numpy().item() for _ in range(3)]
    return losses, [p.numpy() for p in model.parameters()], f


def test_a_registered_backend_is_a_device():
    assert "boxed" in backends.names() and backends.get("boxed") is BOXED
    t = jn.tensor(np.arange(6.0, dtype=np.float32).reshape(2, 3)).to("boxed")
    assert isinstance(t._data, Boxed) and t.device == jn.Device("boxed") and str(t.device) == "boxed"
    assert not t.is_cuda
    np.testing.assert_array_equal(t.numpy(), np.arange(6.0).reshape(2, 3))
    back = t.to("cpu")
    assert isinstance(back._data, np.ndarray)
    with pytest.raises(ValueError, match="unknown device 'tpu'.*'boxed'"):
        jn.Device("tpu")
    with pytest.raises(ValueError, match="already registered"):
        backends.register(BoxedBackend())


def test_eager_ops_and_gradients_run_on_the_new_device():
    BOXED.calls.clear()
    a = jn.tensor(np.array([[1.0, -2.0], [3.0, 0.5]], np.float32), requires_grad=True)
    b = jn.tensor(np.array([0.5, 2.0], np.float32), requires_grad=True)
    ad, bd = a.to("boxed"), b.to("boxed")
    out = (jn.tanh(ad @ ad) * bd + bd).sum()
    assert isinstance(out._data, Boxed)
    out.backward()
    ref_a, ref_b = a.numpy(), b.numpy()
    m = ref_a @ ref_a
    np.testing.assert_allclose(out.numpy(), (np.tanh(m) * ref_b + ref_b).sum(), rtol=1e-6)
    dm = (1 - np.tanh(m) ** 2) * ref_b
    np.testing.assert_allclose(a.grad.numpy(), dm @ ref_a.T + ref_a.T @ dm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.grad.numpy(), (np.tanh(m) + 1).sum(axis=0), rtol=1e-5, atol=1e-6)
    assert BOXED.calls["matmul"] >= 3 and BOXED.calls["tanh"] == 1      # forward and backward ran on the device


def test_mixing_devices_names_both():
    with pytest.raises(RuntimeError, match="same device, got boxed .* and cpu"):
        jn.tensor(np.ones(3, np.float32)).to("boxed") + jn.tensor(np.ones(3, np.float32))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_model_trains_on_the_new_device_like_on_the_cpu(jit):
    ref_losses, ref_params, _ = _mlp_run("cpu", jit)
    BOXED.calls.clear()
    losses, params, f = _mlp_run("boxed", jit)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(params, ref_params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert BOXED.calls["matmul"] > 0
    if jit:
        plan = list(f._cache.values())[0].plan
        assert "boxed" in plan.devices          # (and "cpu": the optimizer's step counter stays on the host)
        assert BOXED.calls["fused"] > 0 and any(n.endswith(") -> (6, 5)") or "(boxed)" in n for n in plan.step_names)
        assert not getattr(plan, "segments", None)  # native drivers are CPU code: a boxed plan has none
