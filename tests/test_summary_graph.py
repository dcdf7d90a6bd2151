"""SummaryWriter.add_graph / add_text / add_hparams, read back with TensorBoard's own loaders."""
import numpy as np
import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import metadata as hp_metadata  # noqa: E402

import jitnet as jn  # noqa: E402
import jitnet.nn as nn  # noqa: E402
import jitnet.nn.functional as F  # noqa: E402
from jitnet.io import SummaryWriter  # noqa: E402


def _load(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_add_graph_of_a_training_step(tmp_path):
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = jn.optim.SGD(net.parameters(), lr=0.1)

    def step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss

    before = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    x, y = jn.tensor(np.random.default_rng(0).random((2, 4), np.float32)), jn.tensor(np.array([0, 2]))
    with SummaryWriter(tmp_path) as w:
        n = w.add_graph(step, x, y)
    for k, v in net.state_dict().items():            # tracing ran the update; add_graph put the weights back
        np.testing.assert_array_equal(v.numpy(), before[k])

    acc = _load(tmp_path)
    assert acc.Tags()["graph"]
    g = acc.Graph()
    by_name = {nd.name: nd for nd in g.node}
    ops = [nd.op for nd in g.node]
    assert sum(1 for o in ops if o not in ("Placeholder", "VariableV2", "Const", "Identity")) == n
    assert {"input_0", "input_1", "output_0"} <= set(by_name)
    assert by_name["input_0"].op == "Placeholder"
    assert by_name["net/0/W"].op == "VariableV2"              # variables carry their state-dict names
    assert [d.size for d in by_name["net/0/W"].attr["shape"].shape.dim] == [4, 8]
    assert {"matmul", "relu", "cross_entropy_int_reduced", "sgd_update"} <= set(ops)
    first_matmul = next(nd for nd in g.node if nd.op == "matmul")
    assert first_matmul.name.startswith("net/0/")               # ops sit in the scope of the layer they read
    assert list(first_matmul.input) == ["input_0", "net/0/W"]
    for nd in g.node:                                          # every edge names a node of the graph
        assert all(i in by_name for i in nd.input), nd.name
    updates = [nd for nd in g.node if nd.op == "sgd_update"]
    assert len(updates) == 4 and all("writes" in nd.attr for nd in updates)


def test_add_graph_of_a_conv_module(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    with SummaryWriter(tmp_path) as w:
        w.add_graph(net, jn.tensor(np.zeros((1, 1, 4, 4), np.float32)))
    g = _load(tmp_path).Graph()
    conv = next(nd for nd in g.node if nd.op == "conv2d")
    assert conv.name.startswith("0/") and list(conv.input) == ["input_0", "0/W", "0/b"]
    assert [d.size for d in conv.attr["_output_shapes"].list.shape[0].dim] == [1, 2, 4, 4]
    assert "stride=(1, 1)" in conv.attr["params"].s.decode()
    assert [nd.op for nd in g.node if nd.op in ("relu", "max_pool2d")] == ["relu", "max_pool2d"]


def test_add_text(tmp_path):
    with SummaryWriter(tmp_path) as w:
        w.add_text("notes", "lr **0.1**, batch 32", step=3)
        w.add_text("table", ["a", "b", "c"], step=4)
    acc = _load(tmp_path)
    assert {"notes", "table"} <= set(acc.Tags()["tensors"])
    (ev,) = acc.Tensors("notes")
    assert ev.step == 3 and ev.tensor_proto.string_val == [b"lr **0.1**, batch 32"]
    assert acc.SummaryMetadata("notes").plugin_data.plugin_name == "text"
    (ev,) = acc.Tensors("table")
    assert ev.tensor_proto.string_val == [b"a", b"b", b"c"]
    assert [d.size for d in ev.tensor_proto.tensor_shape.dim] == [3]


def test_add_hparams(tmp_path):
    hparams = {"lr": 0.01, "optimizer": "adam", "batch_norm": True, "layers": np.int64(3)}
    with SummaryWriter(tmp_path) as w:
        w.add_hparams(hparams, {"test/accuracy": 0.93, "test/loss": 0.25}, step=7)
    acc = _load(tmp_path)

    def content(tag):
        md = acc.SummaryMetadata(tag)
        assert md.plugin_data.plugin_name == hp_metadata.PLUGIN_NAME
        return md.plugin_data.content

    exp = hp_metadata.parse_experiment_plugin_data(content(hp_metadata.EXPERIMENT_TAG))
    types = {h.name: h.type for h in exp.hparam_infos}
    assert types == {"lr": 3, "optimizer": 1, "batch_norm": 2, "layers": 3}    # FLOAT64, STRING, BOOL
    assert sorted(m.name.tag for m in exp.metric_infos) == ["test/accuracy", "test/loss"]
    start = hp_metadata.parse_session_start_info_plugin_data(content(hp_metadata.SESSION_START_INFO_TAG))
    assert start.hparams["lr"].number_value == pytest.approx(0.01)
    assert start.hparams["optimizer"].string_value == "adam"
    assert start.hparams["batch_norm"].bool_value is True
    assert start.hparams["layers"].number_value == 3
    end = hp_metadata.parse_session_end_info_plugin_data(content(hp_metadata.SESSION_END_INFO_TAG))
    assert end.status == 1                                                       # STATUS_SUCCESS
    (s,) = acc.Scalars("test/accuracy")
    assert s.step == 7 and s.value == pytest.approx(0.93)
    with pytest.raises(ValueError, match="non-empty dict"):
        SummaryWriter(tmp_path / "other").add_hparams({}, {})
