"""ONNX export and TensorBoard graphs of a model whose variables live on the GPU."""
import numpy as np
import pytest

import jitnet as jn
import jitnet.nn as nn


def test_onnx_export_of_a_gpu_model_matches_the_cpu(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    x = np.random.default_rng(0).random((4, 5), np.float32)
    net.eval()
    with jn.no_grad():
        want = net(jn.tensor(x)).numpy()
    net.train()
    dev = net.to("cuda")
    model = jn.onnx.export(dev, jn.tensor(x).to("cuda"))
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input_0": x})[0], want, rtol=1e-5, atol=1e-5)


def test_add_graph_of_a_gpu_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    net = nn.Sequential(nn.Linear(5, 3)).to("cuda")
    with jn.io.SummaryWriter(tmp_path) as w:
        w.add_graph(net, jn.tensor(np.ones((2, 5), np.float32)).to("cuda"))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert {"matmul", "add"} <= {n.op for n in acc.Graph().node}
