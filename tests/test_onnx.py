"""jitnet.onnx.export: traced models run in onnxruntime and agree with jitnet (float32 tolerance)."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import jitnet as jn  # noqa: E402
import jitnet.nn as nn  # noqa: E402
import jitnet.nn.functional as F  # noqa: E402
import jitnet.onnx as jonnx  # noqa: E402
from jitnet.models.vision import MLP, Autoencoder, CNNCifar, CNNMnist  # noqa: E402

RTOL, ATOL = 1e-5, 2e-5      # ATOL is relative to the output's largest magnitude (float32 sums of ~1000 terms)


def _run_onnx(model, *xs):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, xs)))


def _reference(fn, *xs):
    with jn.no_grad():
        out = fn(*[jn.tensor(x) for x in xs])
    return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


def _check(fn, *xs, modules=(), **kw):
    """Export fn on xs, run it in onnxruntime, compare with jitnet in eval mode; return the model."""
    model = jonnx.export(fn, *[jn.tensor(x) for x in xs], **kw)
    got = _run_onnx(model, *xs)
    for m in modules:
        m.eval()
    want = _reference(fn, *xs)
    for m in modules:
        m.train()
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL * max(1.0, float(np.abs(w).max(initial=0))))
    return model


def _randomize_bn(module, seed):
    """Give every batch norm non-trivial moving statistics and affine parameters."""
    rng = np.random.default_rng(seed)
    state = {}
    for k, v in module.state_dict().items():
        if k.endswith(("moving_mean", "beta")):
            state[k] = rng.normal(0, 0.5, v.shape).astype(np.float32)
        elif k.endswith(("moving_var", "gamma")):
            state[k] = rng.uniform(0.5, 2.0, v.shape).astype(np.float32)
    module.load_state_dict(state, strict=False)


def _ops(model):
    return [n.op_type for n in model.graph.node]


def test_mlp_matches_onnxruntime(tmp_path):
    m = MLP(hidden=(16,), jit=False)
    x = np.random.default_rng(0).random((3, 1, 28, 28), np.float32)
    path = tmp_path / "mlp.onnx"
    model = _check(m.net, x, path=path, modules=[m.net])
    inits = {i.name for i in model.graph.initializer}
    assert set(m.net.state_dict()) <= inits                 # parameters keep their state-dict names
    assert _ops(model).count("Gemm") == 2 and {"Relu", "Reshape"} <= set(_ops(model))   # Linear -> Gemm
    loaded = onnx.load(str(path))                           # path= saves the same model
    np.testing.assert_allclose(_run_onnx(loaded, x)[0], _run_onnx(model, x)[0])


def _small_cnn_with_bn():
    """CNNCifar's layer pattern (conv + BN + ReLU + pool twice, fc + BN + ReLU, fc) at a few channels."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding="same", bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding="same", bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 6, init="he", bias=False), nn.BatchNorm1d(6), nn.ReLU(),
        nn.Linear(6, 10))


def _check_cnn_with_bn(net, x):
    _randomize_bn(net, 1)
    assert net.training
    model = _check(net, x, modules=[net])
    assert all(m.training for m in net.modules())             # export put them in eval mode and back
    ops = _ops(model)
    n_bn = sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in net.modules())
    assert ops.count("BatchNormalization") == n_bn and "Sqrt" not in ops     # one node per batch norm
    assert {"Conv", "MaxPool", "Relu"} <= set(ops)
    return model


def test_cnn_with_batch_norm_eval_mode():
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    _check_cnn_with_bn(_small_cnn_with_bn(), x)


@pytest.mark.slow
def test_cnn_cifar_with_batch_norm_matches_onnxruntime():
    x = np.random.default_rng(2).standard_normal((2, 3, 24, 24)).astype(np.float32)
    _check_cnn_with_bn(CNNCifar(jit=False).net, x)


def test_batch_norm_pattern_keeps_values_read_elsewhere():
    mean = jn.Parameter(np.array([0.5, -1.0, 2.0], np.float32), trainable=False)
    var = jn.Parameter(np.array([1.5, 0.25, 4.0], np.float32), trainable=False)

    def f(x):
        std = jn.sqrt(jn.reshape(var, (1, 3)) + 1e-3)         # the same value the batch norm computes
        return F.batch_norm(x, mean, var, eps=1e-3), x / std

    x = np.random.default_rng(11).standard_normal((4, 3)).astype(np.float32)
    ops = _ops(_check(f, x))
    assert ops.count("BatchNormalization") == 1 and "Sqrt" in ops       # its other reader keeps the Sqrt


def test_autoencoder_bound_method():
    a = Autoencoder(code_size=2, hidden=(8,), jit=False)
    _randomize_bn(a.net, 3)
    x = np.random.default_rng(4).random((3, 784), np.float32)
    model = _check(a.inference, x, modules=[a.net])          # the method's object holds the network
    inits = {i.name for i in model.graph.initializer}
    assert "net/encoder/1/W" in inits and "net/decoder/1/moving_var" in inits
    assert _ops(model).count("BatchNormalization") == 4 and "Sigmoid" in _ops(model)
    assert a.net.training
    _check(a.encode, x, modules=[a.net])


class LSTMClassifier(nn.Module):
    """Embedding -> LSTM -> linear logits of the last hidden state (log-probabilities)."""

    def __init__(self, vocab=11, dim=5, hidden=6, classes=3, layers=1):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=layers)
        self.out = nn.Linear(hidden, classes)

    def forward(self, ids):
        seq, (h, c) = self.lstm(self.emb(ids))
        return F.log_softmax(self.out(h[-1]), axis=-1), seq, c


@pytest.mark.parametrize("layers", [1, 2])
def test_lstm_classifier_uses_onnx_lstm(layers):
    net = LSTMClassifier(layers=layers)
    ids = np.random.default_rng(5).integers(0, 11, (3, 4))
    model = _check(net, ids)
    ops = _ops(model)
    assert ops.count("LSTM") == layers and "Gather" in ops


def test_lstm_masked_and_cell_are_unrolled():
    lstm = nn.LSTM(3, 4)
    mask = np.array([[1, 1, 0], [1, 1, 1]])

    def masked(x):
        seq, (h, c) = lstm(x, mask=mask)
        return seq, h, c

    x = np.random.default_rng(6).standard_normal((2, 3, 3)).astype(np.float32)
    model = _check(masked, x)
    assert "LSTM" not in _ops(model) and "Where" in _ops(model)

    cell = nn.LSTMCell(3, 4)

    def two_steps(x):
        h, c = cell(x)
        return cell(x * 2.0, (h, c))

    _check(two_steps, x[:, 0])


def test_activations_and_layout_ops():
    def f(x, y):
        return (F.leaky_relu(x, 0.1), F.elu(x), jn.sigmoid(x), jn.tanh(x), jn.softmax(x, 0), jn.log_softmax(x),
                jn.concatenate([x, x[:, ::-1]], 1), x[1:, None, 2], jn.transpose(x), jn.reshape(x, (2, 6)),
                jn.max(x, axis=1), jn.sum(x, axis=0, keepdims=True), jn.argmax(x, 1), jn.clip(x, -0.2, 0.5),
                jn.pad(x, ((1, 0), (0, 2))), jn.flip(x, 0), x % 0.3, jn.where(x > 0.5, x, -x),
                jn.take(x, y, axis=1), jn.sqrt(jn.abs(x)) ** 1.5, jn.maximum(x, 0.1), x.astype(jn.int32) + y[0])

    x = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
    y = np.array([3, 0, 1])
    _check(f, x, y)


def test_pools_and_strided_conv():
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)

    def f(x):
        y = conv(x)
        return F.avg_pool2d(y, 2, 1), F.max_pool2d(x, 3, 2, 1), F.avg_pool2d(x, 2, count_include_pad=False)

    x = np.random.default_rng(8).standard_normal((2, 2, 7, 7)).astype(np.float32)
    _check(f, x)


def test_unsupported_primitive_is_named():
    x = jn.tensor(np.zeros((2, 3), np.float32))
    with pytest.raises(jonnx.UnsupportedPrimitiveError, match=r"'argsort'.*Supported primitives: .*conv2d"):
        jonnx.export(lambda x: jn.argsort(x, axis=1), x)
    assert "lstm_seq" in jonnx.supported_primitives()


def test_training_step_export_is_refused_and_leaves_the_model():
    net = nn.Sequential(nn.Linear(4, 3))
    opt = jn.optim.SGD(net.parameters(), lr=0.5)
    before = net.state_dict()["0/W"].numpy().copy()

    def step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss

    with pytest.raises(jonnx.UnsupportedPrimitiveError,
                       match=r"updates variables \(.*sgd_update\).*not a training step"):
        jonnx.export(step, jn.tensor(np.ones((2, 4), np.float32)), jn.tensor(np.array([0, 2])))
    np.testing.assert_array_equal(net.state_dict()["0/W"].numpy(), before)


def test_names_and_dropout_in_eval():
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2), nn.Softmax())
    x = np.random.default_rng(9).random((5, 4), np.float32)
    model = _check(net, x, modules=[net], input_names=["pixels"], output_names=["probs"])
    assert [i.name for i in model.graph.input] == ["pixels"]
    assert [o.name for o in model.graph.output] == ["probs"]
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [5, 2]
    with pytest.raises(ValueError, match="2 input_names for 1 tensor arguments"):
        jonnx.export(net, jn.tensor(x), input_names=["a", "b"])


@pytest.mark.slow
def test_cnn_mnist_matches_onnxruntime():
    c = CNNMnist(jit=False)
    x = np.random.default_rng(10).random((2, 1, 28, 28), np.float32)
    model = _check(c.net, x, modules=[c.net])
    assert _ops(model).count("Conv") == 2


def test_optional_packages_stay_optional(monkeypatch):
    import subprocess
    import sys
    code = ("import sys, jitnet, jitnet.onnx, jitnet.io; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"                              # importing jitnet imports none of them
    monkeypatch.setitem(sys.modules, "onnx", None)           # as if onnx were not installed
    with pytest.raises(ImportError, match=r'pip install "jitnet\[interop\]"'):
        jonnx.export(nn.Linear(2, 2), jn.tensor(np.zeros((1, 2), np.float32)))
