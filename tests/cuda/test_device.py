"""Device placement: tensors and modules on "cuda", the default device, transfers, device mixing errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

import jitnet as jn
import jitnet.nn as nn


def test_to_and_back_counts_one_transfer_each_way(raw_transfers):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    jn.cuda.reset_transfer_stats()
    t = jn.tensor(a).to("cuda")
    assert t.device == jn.device("cuda") and t.is_cuda and str(t.device) == "cuda:0"
    assert t.to("cuda") is t
    back = t.cpu()
    assert back.device == jn.device("cpu") and not back.is_cuda
    np.testing.assert_array_equal(back.numpy(), a)
    st = jn.cuda.transfer_stats()
    assert (st["h2d"], st["d2h"], st["h2d_bytes"], st["d2h_bytes"]) == (1, 1, 24, 24)
    assert (raw_transfers["h2d"], raw_transfers["d2h"]) == (1, 1)      # the counters miss nothing


def test_item_numpy_repr_are_explicit_copies():
    t = jn.tensor([[1.5, 2.0]]).to("cuda")
    jn.cuda.reset_transfer_stats()
    assert t[0, 1].item() == 2.0
    assert t.tolist() == [[1.5, 2.0]]
    assert "device='cuda:0'" in repr(t)
    assert float(t.sum()) == 3.5
    assert jn.cuda.transfer_stats()["d2h"] == 4


def test_mixing_devices_names_op_and_devices():
    a = jn.ones((2, 3)).to("cuda")
    b = jn.ones((2, 3))
    with pytest.raises(RuntimeError, match=r"add: expected all tensors on the same device, got cuda:0 .* and cpu"):
        a + b
    with pytest.raises(RuntimeError, match=r"matmul: .*cuda:0.*cpu"):
        jn.matmul(b, jn.ones((3, 2)).to("cuda"))
    # a Python number or a 0-d host tensor is a scalar, as in PyTorch
    np.testing.assert_allclose((a * 2 + jn.tensor(1.0)).numpy(), np.full((2, 3), 3.0))


def test_default_device_context_and_constructors():
    with jn.device("cuda"):
        assert jn.get_default_device() == jn.device("cuda")
        z = jn.zeros((2, 2))
        o = jn.ones(3, dtype=jn.int32)
        f = jn.full((2,), 7.5)
        r = jn.arange(5)
        e = jn.eye(3)
        t = jn.tensor([1.0, 2.0])
        n = jn.random.normal((4,))
        lin = jn.linspace(0.0, 1.0, 5)
    assert jn.get_default_device() == jn.device("cpu")
    for x in (z, o, f, r, e, t, n, lin):
        assert x.is_cuda
    np.testing.assert_array_equal(o.numpy(), np.ones(3, np.int32))
    np.testing.assert_array_equal(f.numpy(), [7.5, 7.5])
    np.testing.assert_array_equal(r.numpy(), np.arange(5))
    np.testing.assert_array_equal(e.numpy(), np.eye(3, dtype=np.float32))
    np.testing.assert_allclose(lin.numpy(), np.linspace(0, 1, 5, dtype=np.float32), rtol=1e-6)
    assert jn.zeros_like(t).is_cuda and not jn.zeros_like(jn.ones(2)).is_cuda
    assert jn.ones((2,), device="cuda").is_cuda and not jn.ones((2,), device="cpu").is_cuda


def test_module_to_moves_parameters_in_place_and_back():
    jn.random.seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    before = [p.numpy().copy() for p in m.parameters()]
    ids = [id(p) for p in m.parameters()]
    assert m.to("cuda") is m
    assert all(p.is_cuda for p in m.parameters()) and [id(p) for p in m.parameters()] == ids
    m.cpu()
    for p, b in zip(m.parameters(), before):
        assert not p.is_cuda
        np.testing.assert_array_equal(p.numpy(), b)


def test_layers_built_under_cuda_default_device_live_on_the_gpu():
    with jn.device("cuda"):
        jn.random.seed(1)
        lin = nn.Linear(3, 2)
    assert lin.W.is_cuda and lin.b.is_cuda


def test_parameter_assign_and_state_dict_round_trip():
    m = nn.Linear(2, 2).to("cuda")
    w = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    m.load_state_dict({"W": w, "b": np.zeros(2, np.float32)})
    assert m.W.is_cuda
    np.testing.assert_array_equal(m.state_dict()["W"].numpy(), w)
    m.W.assign(m.W * 2)
    np.testing.assert_array_equal(m.W.numpy(), 2 * w)


def test_cuda_array_interface():
    t = jn.tensor(np.arange(12, dtype=np.float32).reshape(3, 4)).to("cuda")
    ai = t.__cuda_array_interface__
    assert ai["shape"] == (3, 4) and ai["typestr"] == "<f4" and ai["version"] == 3 and ai["strides"] is None
    assert t.T.__cuda_array_interface__["strides"] == (4, 16)
    with pytest.raises(AttributeError, match="CPU tensor"):
        jn.ones(2).__cuda_array_interface__
    assert not hasattr(jn.ones(2), "__cuda_array_interface__")


def test_gradient_flows_back_through_to():
    w = jn.tensor([1.0, 2.0, 3.0], requires_grad=True)
    loss = (w.to("cuda") ** 2).sum()
    loss.backward()
    assert not w.grad.is_cuda
    np.testing.assert_allclose(w.grad.numpy(), [2.0, 4.0, 6.0])


def test_device_side_index_error_is_raised_at_the_next_sync():
    x = jn.ones((3, 2)).to("cuda")
    idx = jn.tensor([0, 5]).to("cuda")
    r = jn.take(x, idx, axis=0)            # queued: the kernel records the bad index
    with pytest.raises(IndexError, match=r"take: index 5 is out of bounds for size 3"):
        r.numpy()
    np.testing.assert_array_equal(jn.take(x, jn.tensor([-1]).to("cuda"), axis=0).numpy(), np.ones((1, 2)))


def test_without_gpu_or_simulator_cuda_is_a_clear_error_and_import_stays_light():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["CUDA_VISIBLE_DEVICES"] = ""          # no GPU even on a machine that has one
    code = ("import sys, jitnet as jn\n"
            "assert 'numba.cuda' not in sys.modules, 'importing jitnet imported numba.cuda'\n"
            "assert not jn.cuda.active()\n"
            "try:\n    jn.ones(2).to('cuda')\nexcept RuntimeError as e:\n    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "device 'cuda' is not available" in r.stdout and "NUMBA_ENABLE_CUDASIM=1" in r.stdout
