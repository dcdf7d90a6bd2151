"""bfloat16 (and float16) where the package tests "is this a float": ONNX export, TensorBoard summaries, MPI
collectives, the training guards, gradcheck, tensor-index checks, image batches and the DNC memory step."""
import os
import subprocess
import sys

import numpy as np
import pytest

import jitnet as jn

pytest.importorskip("ml_dtypes")
HERE = os.path.dirname(os.path.abspath(__file__))


def test_onnx_export_of_a_bfloat16_model_casts_around_each_op():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from jitnet import nn
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    for p in m.parameters():
        p._data = p._data.astype(jn.bfloat16.dtype)
    x = jn.tensor(np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32), dtype=jn.bfloat16)

    def f(x):
        return (m(x) * 0.5).astype(jn.float32)        # (onnxruntime's Python API returns no bfloat16 arrays)
    model = jn.onnx.export(f, x)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    assert {t.data_type for t in model.graph.initializer if "W" in t.name} == {onnx.TensorProto.BFLOAT16}
    sess = ort.InferenceSession(model.SerializeToString())
    feed = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(x.numpy().view(np.uint16), onnx.TensorProto.BFLOAT16)
    got = sess.run_with_ort_values(None, {"input_0": feed})[0].numpy()
    np.testing.assert_array_equal(got, f(x).numpy())   # the same float32 compute, the same roundings
    lstm = nn.LSTM(3, 4)
    for p in lstm.parameters():
        p._data = p._data.astype(jn.bfloat16.dtype)
    with pytest.raises(jn.onnx.UnsupportedPrimitiveError, match="lstm_seq on bfloat16.*float32"):
        jn.onnx.export(lstm, jn.zeros((2, 5, 3), dtype=jn.bfloat16))


def test_summary_hparams_and_images_take_bfloat16():
    from jitnet.io import summary
    bf16 = jn.bfloat16.dtype
    assert summary._pb_value(np.float32(1.5).astype(bf16)) == summary._pb_value(1.5)   # a number, not text
    img = np.linspace(0, 1, 12, dtype=np.float32).reshape(2, 2, 3)
    assert summary.encode_png(img.astype(bf16)) == summary.encode_png(img.astype(bf16).astype(np.float32))


def test_training_guards_see_bfloat16_non_finite_values():
    from jitnet.models import _train
    bad = np.array([1.0, np.nan], np.float32).astype(jn.bfloat16.dtype)

    class Agent:                          # the guard checks an RL agent through its state_dict
        def __init__(self, w):
            self.w = w

        def state_dict(self):
            return {"w": self.w}
    assert _train._finite(_train._state_variables(Agent(bad[:1])))
    assert not _train._finite(_train._state_variables(Agent(bad)))
    assert _train._finite([jn.Variable(bad[:1])]) and not _train._finite([jn.Variable(bad)])


def test_gradcheck_widens_bfloat16_inputs_and_float_index_checks_name_bfloat16():
    seen = []

    def f(x):
        seen.append(x.dtype)
        return (x * x).sum()
    assert jn.testing.gradcheck(f, jn.tensor([0.5, 1.5], dtype=jn.bfloat16))
    assert jn.float64 in seen                          # checked in float64, not skipped
    x = jn.zeros(3)
    idx = jn.tensor([1.0], dtype=jn.bfloat16)
    with pytest.raises(TypeError, match="float index of dtype bfloat16"):
        x[idx] = 1.0
    with pytest.raises(TypeError, match="float index of dtype bfloat16"):
        x.at[idx].set(1.0)


def test_augment_takes_bfloat16_batches():
    from jitnet.data import augment
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    got = augment.center_crop(x.astype(jn.bfloat16.dtype), 2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(augment.center_crop(x, 2)))


def test_allreduce_mean_accepts_bfloat16_before_needing_a_job():
    import jitnet.distributed as dist
    if dist.is_initialized():
        pytest.skip("an MPI job is running")
    with pytest.raises(Exception) as e:
        dist.allreduce(jn.ones(2, dtype=jn.bfloat16), "mean")
    assert "floating" not in str(e.value)              # no longer refused as non-floating


@pytest.mark.slow
def test_dnc_memory_step_runs_on_bfloat16():
    from jitnet.models import dnc
    N, W, R = 4, 3, 1
    rng = np.random.default_rng(0)
    p = jn.tensor(rng.random((2, dnc.packed_size(N, W, R))).astype(np.float32) * 0.1, dtype=jn.bfloat16)
    xi = jn.tensor(rng.standard_normal((2, dnc.interface_size(R, W))).astype(np.float32), dtype=jn.bfloat16)
    out = dnc.dnc_memory_step(p, xi, N, W, R)
    ref = dnc.dnc_memory_step(p.astype(jn.float32), xi.astype(jn.float32), N, W, R)
    assert out.dtype == jn.bfloat16
    np.testing.assert_allclose(out.numpy().astype(np.float32), ref.numpy(), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_two_ranks_reduce_bfloat16_and_float16_in_float32(tmp_path):
    pytest.importorskip("mpi4py")
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    out = str(tmp_path / "lowp.npz")
    env = dict(os.environ)
    env.pop("JITNET_MPI_TIMEOUT", None)
    p = subprocess.run([exe if os.path.exists(exe) else "mpiexec", "-n", "2", sys.executable,
                        os.path.join(HERE, "mpi_scripts", "lowp_collectives.py"), out],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    res = np.load(out)
    x = np.array([1.0, 2.5, -3.0], np.float32)
    for name in ("bfloat16", "float16"):
        np.testing.assert_array_equal(res[f"{name}/sum"], 3 * x)
        np.testing.assert_array_equal(res[f"{name}/out"], 3 * x)
        np.testing.assert_array_equal(res[f"{name}/mean"], 1.5 * x)
        np.testing.assert_array_equal(res[f"{name}/bcast"], 2 * x)          # rank 1's bits, unchanged
        assert float(res[f"{name}/metrics"]) == 0.5
        for k in ("sum", "mean", "out", "bcast"):
            assert str(res[f"{name}/{k}/dtype"]) == name
    np.testing.assert_array_equal(res["strided/out"], 3 * x)      # allreduce into a strided plain Tensor
