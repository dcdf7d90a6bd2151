"""PyTorch weights in and out: the same model built in both libraries gives the same outputs after copying
weights either way (MLP, CNN with batch norm in eval mode, LSTM, GRU, the seq2seq encoder, attention), and
anything unmatched is named with its shape."""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jitnet as jn  # noqa: E402
import jitnet.nn as nn  # noqa: E402
from jitnet.interop import (load_torch_state_dict, match_torch_state_dict, save_torch_safetensors,  # noqa: E402
                            torch_state_dict)

TOL = dict(rtol=1e-5, atol=1e-5)
tnn = torch.nn


def _jn(x):
    return jn.tensor(np.ascontiguousarray(x))


def _scramble(model, seed):
    """Give every jitnet variable fresh random values (so the jitnet -> torch direction tests new numbers)."""
    rng = np.random.default_rng(seed)
    for _, v in model.named_variables():
        val = rng.standard_normal(v.shape).astype(np.float32) * 0.5
        if "moving_var" in (v.name or ""):
            val = np.abs(val) + 0.5
        v.assign(val)


def _randomize_bn(tmodel, x, steps=2):
    """Move a torch model's batch-norm running statistics away from (0, 1) with a few training passes."""
    tmodel.train()
    with torch.no_grad():
        for _ in range(steps):
            tmodel(x)
    tmodel.eval()


def test_mlp_both_ways():
    torch.manual_seed(0)
    t = tnn.Sequential(tnn.Linear(5, 7), tnn.ReLU(), tnn.Linear(7, 3, bias=False))
    j = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3, bias=False))
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    rep = load_torch_state_dict(j, t.state_dict())
    assert rep.complete and [p[0] for p in rep.pairs] == ["0", "2"]
    with torch.no_grad():
        want = t(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(j(_jn(x)).numpy(), want, **TOL)
    # the other way: new jitnet weights, default PyTorch names
    _scramble(j, 1)
    sd = torch_state_dict(j, as_torch=True)
    assert list(sd) == ["0.weight", "0.bias", "2.weight"]
    t.load_state_dict(sd)
    with torch.no_grad():
        np.testing.assert_allclose(t(torch.from_numpy(x)).numpy(), j(_jn(x)).numpy(), **TOL)


class _TorchCNN(tnn.Module):
    def __init__(self):
        super().__init__()
        self.features = tnn.Sequential(tnn.Conv2d(2, 4, 3, padding=1), tnn.BatchNorm2d(4), tnn.ReLU(),
                                       tnn.MaxPool2d(2))
        self.head = tnn.Sequential(tnn.Flatten(), tnn.Linear(4 * 2 * 2, 6), tnn.BatchNorm1d(6), tnn.ReLU(),
                                   tnn.Linear(6, 3))

    def forward(self, x):
        return self.head(self.features(x))


def _jitnet_cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def test_cnn_with_batch_norm_through_safetensors_files(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(1)
    t = _TorchCNN()
    x = np.random.default_rng(1).standard_normal((3, 2, 4, 4)).astype(np.float32)
    _randomize_bn(t, torch.from_numpy(x) * 2 + 1)
    path = tmp_path / "cnn.safetensors"
    st.save_file(t.state_dict(), str(path))
    # torch's names (features.0, head.1, ...) differ from the flat jitnet Sequential: matched by order and shape
    j = _jitnet_cnn().eval()
    rep = load_torch_state_dict(j, str(path))
    assert rep.complete
    assert sorted(rep.ignored) == ["features.1.num_batches_tracked", "head.2.num_batches_tracked"]
    np.testing.assert_allclose(j[1].moving_var.numpy(), t.features[1].running_var.numpy())
    with torch.no_grad():
        want = t(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(j(_jn(x)).numpy(), want, **TOL)
    # back: new jitnet weights written into a file with the torch model's names, read by safetensors.torch
    _scramble(j, 2)
    out = tmp_path / "back.safetensors"
    keys = save_torch_safetensors(j, str(out), like=t)
    assert keys == list(t.state_dict())
    t.load_state_dict(st.load_file(str(out)))
    with torch.no_grad():
        np.testing.assert_allclose(t(torch.from_numpy(x)).numpy(), j(_jn(x)).numpy(), **TOL)


def test_lstm_two_layers_both_ways():
    torch.manual_seed(2)
    t = tnn.LSTM(3, 4, num_layers=2, batch_first=True)
    j = nn.LSTM(3, 4, num_layers=2)
    x = np.random.default_rng(2).standard_normal((2, 5, 3)).astype(np.float32)
    load_torch_state_dict(j, t)
    out, (h, c) = j(_jn(x))
    with torch.no_grad():
        tout, (th, tc) = t(torch.from_numpy(x))
    np.testing.assert_allclose(out.numpy(), tout.numpy(), **TOL)
    np.testing.assert_allclose(h.numpy(), th.numpy(), **TOL)
    np.testing.assert_allclose(c.numpy(), tc.numpy(), **TOL)
    _scramble(j, 3)
    sd = torch_state_dict(j, as_torch=True)
    assert list(sd)[:4] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    t.load_state_dict(sd)
    with torch.no_grad():
        tout, (th, tc) = t(torch.from_numpy(x))
    out, (h, c) = j(_jn(x))
    np.testing.assert_allclose(tout.numpy(), out.numpy(), **TOL)
    np.testing.assert_allclose(tc.numpy(), c.numpy(), **TOL)


def test_gru_and_cells_both_ways():
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    t = tnn.GRU(3, 4, batch_first=True)
    j = nn.GRU(3, 4)
    x = rng.standard_normal((2, 3, 3)).astype(np.float32)
    load_torch_state_dict(j, t.state_dict())
    with torch.no_grad():
        tout, th = t(torch.from_numpy(x))
    out, h = j(_jn(x))
    np.testing.assert_allclose(out.numpy(), tout.numpy(), **TOL)
    np.testing.assert_allclose(h.numpy(), th.numpy(), **TOL)
    # an Elman RNN: torch's two biases become jitnet's one
    tr, jr = tnn.RNN(3, 4, batch_first=True), nn.RNN(3, 4)
    load_torch_state_dict(jr, tr)
    with torch.no_grad():
        np.testing.assert_allclose(jr(_jn(x))[0].numpy(), tr(torch.from_numpy(x))[0].numpy(), **TOL)
    # single cells, jitnet -> torch: GRUCell keeps both biases, LSTMCell's one bias goes to bias_ih
    x2, h2 = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((2, 4)).astype(np.float32)
    for jc, tc in ((nn.GRUCell(3, 4), tnn.GRUCell(3, 4)), (nn.LSTMCell(3, 4), tnn.LSTMCell(3, 4))):
        _scramble(jc, 4)
        tc.load_state_dict(torch_state_dict(jc, as_torch=True))
        with torch.no_grad():
            if isinstance(tc, tnn.GRUCell):
                np.testing.assert_allclose(tc(torch.from_numpy(x2), torch.from_numpy(h2)).numpy(),
                                           jc(_jn(x2), _jn(h2)).numpy(), **TOL)
            else:
                th_, tc_ = tc(torch.from_numpy(x2), (torch.from_numpy(h2), torch.from_numpy(h2)))
                jh, jcc = jc(_jn(x2), (_jn(h2), _jn(h2)))
                np.testing.assert_allclose(th_.numpy(), jh.numpy(), **TOL)
                np.testing.assert_allclose(tc_.numpy(), jcc.numpy(), **TOL)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_seq2seq_encoder_from_torch(cell):
    from jitnet.models.seq2seq import Seq2Seq

    class Encoder(tnn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = tnn.Embedding(7, 3)
            self.rnn = (tnn.LSTM if cell == "lstm" else tnn.GRU)(3, 4, num_layers=2, batch_first=True)

    torch.manual_seed(4)
    t = Encoder()
    j = Seq2Seq(7, 9, embed=3, hidden=4, layers=2, cell=cell)
    g = 4 if cell == "lstm" else 3
    # the encoder alone: the decoder, attention, output layer and target embedding stay unmatched
    with pytest.raises(ValueError, match=rf"decoder_0/W_ih \(7, {4 * g}\)"):
        load_torch_state_dict(j, t)
    rep = load_torch_state_dict(j, t, strict=False)
    assert [p[0] for p in rep.pairs] == ["src_embed", "encoder_0", "encoder_1"]
    assert not rep.unexpected
    assert {n for n, _ in rep.missing} >= {"tgt_embed/W", "decoder_0/W_hh", "attention/query_proj/W", "out/b"}
    src = np.array([[1, 2, 3, 4], [6, 5, 0, 2]], np.int64)
    enc, finals = j.encode(_jn(src), _jn(np.ones_like(src, np.uint8)))
    with torch.no_grad():
        tout, tstate = t.rnn(t.embedding(torch.from_numpy(src)))
    np.testing.assert_allclose(enc.numpy().transpose(1, 0, 2), tout.numpy(), **TOL)
    if cell == "lstm":        # the packed LSTM state is [h, c, ...]
        np.testing.assert_allclose(finals[1].numpy()[:, 4:8], tstate[1][1].numpy(), **TOL)
    else:
        np.testing.assert_allclose(finals[1].numpy(), tstate[1].numpy(), **TOL)


def test_bahdanau_attention_from_torch():
    class Additive(tnn.Module):
        def __init__(self):
            super().__init__()
            self.query_proj = tnn.Linear(4, 5, bias=False)
            self.key_proj = tnn.Linear(3, 5)
            self.v = tnn.Linear(5, 1, bias=False)

        def forward(self, q, k):
            s = self.v(torch.tanh(self.query_proj(q)[:, None, :] + self.key_proj(k)))[..., 0]
            w = torch.softmax(s, -1)
            return (w[:, :, None] * k).sum(1), w

    torch.manual_seed(5)
    t, j = Additive(), nn.BahdanauAttention(4, 3, 5)
    assert load_torch_state_dict(j, t).complete
    rng = np.random.default_rng(5)
    q, k = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((2, 6, 3)).astype(np.float32)
    ctx, w = j(_jn(q), _jn(k))
    with torch.no_grad():
        tctx, tw = t(torch.from_numpy(q), torch.from_numpy(k))
    np.testing.assert_allclose(ctx.numpy(), tctx.numpy(), **TOL)
    np.testing.assert_allclose(w.numpy(), tw.numpy(), **TOL)


def test_unmatched_entries_are_named_with_shapes():
    torch.manual_seed(6)
    t = tnn.Sequential(tnn.Linear(5, 7), tnn.LayerNorm(7), tnn.Linear(7, 2))
    j = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    w_before = j[1].W.numpy().copy()
    with pytest.raises(ValueError) as e:
        load_torch_state_dict(j, t.state_dict())
    msg = str(e.value)
    assert "1/W (7, 3)" in msg and "2.weight (2, 7)" in msg and "1.weight (7,)" in msg
    assert "needs PyTorch [weight (3, 7), bias (3,)]" in msg        # the closest layer and how it differs
    np.testing.assert_array_equal(j[1].W.numpy(), w_before)        # strict: nothing written
    rep = load_torch_state_dict(j, t.state_dict(), strict=False)
    assert [p[0] for p in rep.pairs] == ["0"] and not rep.complete
    assert {k for k, _, _ in rep.unexpected} == {"1.weight", "1.bias", "2.weight", "2.bias"}
    assert "LayerNorm" in dict((k, why) for k, _, why in rep.unexpected)["1.weight"]
    np.testing.assert_array_equal(j[0].W.numpy(), t[0].weight.detach().numpy().T)
    # a dry run changes nothing and gives the same report
    assert str(match_torch_state_dict(j, t)) == str(rep)


def test_layers_without_a_jitnet_counterpart_say_why():
    bi = tnn.LSTM(3, 4, bidirectional=True)
    rep = match_torch_state_dict(nn.LSTM(3, 4), bi)
    assert len(rep.pairs) == 1 and not rep.missing
    assert all("bidirectional" in why for _, _, why in rep.unexpected) and len(rep.unexpected) == 4
    mha = tnn.MultiheadAttention(4, 2)
    with pytest.raises(ValueError, match="MultiheadAttention has no jitnet counterpart"):
        load_torch_state_dict(nn.Sequential(nn.Linear(4, 4)), mha)
    with pytest.raises(TypeError, match="expected a PyTorch state dict"):
        load_torch_state_dict(nn.Linear(2, 2), [1, 2])


def test_bias_free_torch_lstm_and_lost_bias_note():
    t = tnn.LSTM(2, 3, bias=False, batch_first=True)
    j = nn.LSTM(2, 3)
    load_torch_state_dict(j, t)
    np.testing.assert_array_equal(j.layer_0.b.numpy(), 0)          # forget_bias=1 replaced by torch's none
    _scramble(j, 7)
    with pytest.raises(ValueError, match="has no bias"):
        torch_state_dict(j, like=t)
    sd, rep = torch_state_dict(j, like=t, strict=False, return_report=True)
    assert list(sd) == list(t.state_dict()) and len(rep.notes) == 1


def test_importing_interop_does_not_import_torch():
    code = "import sys, jitnet.interop; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_fashion_mnist_cnn_trained_in_one_library_scores_the_same_in_the_other():
    """A briefly trained cnn_mnist moved either way (through safetensors files) keeps its test accuracy to 0.1%
    (bench/torch_weights.py runs the same with more steps and prints the table)."""
    pytest.importorskip("safetensors.torch")
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "torch_weights.py")
    spec = importlib.util.spec_from_file_location("bench_torch_weights", path)
    tw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tw)
    _, n, rows = tw.run(steps=40, batch=32, test_limit=1000, jitnet_steps=15)
    assert n in (500, 1000)                  # the embedded test subset, or the first 1000 of the full set
    for r in rows:
        assert r["trained_in"] > 0.4, r      # well above chance (0.1): the comparison means something
        assert abs(r["trained_in"] - r["loaded_in"]) <= 0.001, r
        assert r["max_logit_diff"] < 1e-3, r


def test_bfloat16_checkpoints_load_as_float32(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    pytest.importorskip("ml_dtypes")          # jitnet.io reads BF16 files through ml_dtypes' bfloat16
    t = tnn.Linear(3, 2).to(torch.bfloat16)
    st.save_file(t.state_dict(), str(tmp_path / "bf16.safetensors"))
    want = t.weight.detach().float().numpy().T
    for source in (str(tmp_path / "bf16.safetensors"), t):       # the file (read by jitnet.io) and the module
        j = nn.Linear(3, 2)
        load_torch_state_dict(j, source)
        assert j.W.dtype == np.float32
        np.testing.assert_array_equal(j.W.numpy(), want)


def test_bias_free_torch_conv_and_linear_load_as_zero_bias():
    torch.manual_seed(8)
    t = tnn.Sequential(tnn.Conv2d(2, 3, 3, bias=False), tnn.Flatten(), tnn.Linear(12, 2, bias=False))
    j = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    _scramble(j, 8)
    assert load_torch_state_dict(j, t).complete
    np.testing.assert_array_equal(j[0].b.numpy(), 0)
    np.testing.assert_array_equal(j[2].b.numpy(), 0)
    x = np.random.default_rng(8).standard_normal((2, 2, 4, 4)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(j(_jn(x)).numpy(), t(torch.from_numpy(x)).numpy(), **TOL)
    assert list(torch_state_dict(j, like=t)) == ["0.weight", "2.weight"]     # zero biases: nothing lost
    j[2].b.assign(np.array([1.0, 0.0], np.float32))
    with pytest.raises(ValueError, match=r"2: the PyTorch layer has no bias.*max \|b\| = 1"):
        torch_state_dict(j, like=t)
