"""Layers and modules: forward against NumPy references, gradients by central differences (float64)."""
from __future__ import annotations

import numpy as np
import pytest

import jitnet as jn
from jitnet import nn
from jitnet.nn import functional as F
from jitnet.testing import gradcheck


def T64(a):
    return jn.tensor(np.asarray(a, dtype=np.float64), dtype=jn.float64)


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------------------------------------------

def np_conv2d(x, w, b=None, stride=(1, 1), pad=((0, 0), (0, 0)), dil=(1, 1)):
    x = np.pad(x, ((0, 0), (0, 0), pad[0], pad[1]))
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh = (h - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd - dil[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, o, oh, ow))
    for i in range(oh):
        for j in range(ow):
            for a in range(kh):
                for bb in range(kw):
                    patch = x[:, :, i * stride[0] + a * dil[0], j * stride[1] + bb * dil[1]]   # (n, c)
                    out[:, :, i, j] += patch @ w[:, :, a, bb].T
    if b is not None:
        out += b[None, :, None, None]
    return out


def np_pool(x, k, s, p, op, include_pad=True):
    n, c, h, w = x.shape
    oh = (h + 2 * p[0] - k[0]) // s[0] + 1
    ow = (w + 2 * p[1] - k[1]) // s[1] + 1
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * s[0] - p[0], j * s[1] - p[1]
            win = x[:, :, max(h0, 0):min(h0 + k[0], h), max(w0, 0):min(w0 + k[1], w)]
            if op == "max":
                out[:, :, i, j] = win.max(axis=(2, 3))
            else:
                cnt = (min(h0 + k[0], h + p[0]) - h0) * (min(w0 + k[1], w + p[1]) - w0) if include_pad \
                    else win.shape[2] * win.shape[3]
                out[:, :, i, j] = win.sum(axis=(2, 3)) / cnt
    return out


def np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


def np_lstm(x, h, c, wih, whh, b):
    hd = whh.shape[0]
    z = x @ wih + h @ whh + b
    i, f, g, o = np_sigmoid(z[:, :hd]), np_sigmoid(z[:, hd:2 * hd]), np.tanh(z[:, 2 * hd:3 * hd]), \
        np_sigmoid(z[:, 3 * hd:])
    c2 = f * c + i * g
    return o * np.tanh(c2), c2


def np_gru(x, h, wih, whh, bih, bhh):
    hd = whh.shape[0]
    gi, gh = x @ wih + bih, h @ whh + bhh
    r = np_sigmoid(gi[:, :hd] + gh[:, :hd])
    z = np_sigmoid(gi[:, hd:2 * hd] + gh[:, hd:2 * hd])
    n = np.tanh(gi[:, 2 * hd:] + r * gh[:, 2 * hd:])
    return (1 - z) * n + z * h


def np_logsumexp(x):
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


# ---------------------------------------------------------------------------------------------------------------
# Module tree, state dicts, sharing
# ---------------------------------------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_1 = nn.Linear(3, 4)
        self.layer_2 = nn.Linear(4, 2)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.layer_2(jn.relu(self.bn(self.layer_1(x))))


def test_named_parameters_buffers_and_repr():
    m = MLP()
    names = [n for n, _ in m.named_parameters()]
    assert names == ["layer_1/W", "layer_1/b", "layer_2/W", "layer_2/b", "bn/gamma", "bn/beta"]
    assert [n for n, _ in m.named_buffers()] == ["bn/moving_mean", "bn/moving_var"]
    assert all(p.requires_grad for p in m.parameters())
    assert not any(b.requires_grad for b in m.buffers())
    sd = m.state_dict()
    assert set(sd) == set(names) | {"bn/moving_mean", "bn/moving_var"}
    r = repr(m)
    assert "(layer_1): Linear(in_features=3, out_features=4, bias=True)" in r and r.startswith("MLP(")
    assert m.num_parameters() == 3 * 4 + 4 + 4 * 2 + 2 + 8


def test_state_dict_round_trip_and_errors(tmp_path):
    jn.random.seed(0)
    a, b = MLP(), MLP()
    x = jn.random.normal((5, 3))
    a.train()
    a(x)                                     # moves the batch-norm averages
    assert not np.allclose(a(x).numpy(), b(x).numpy())
    path = tmp_path / "m.safetensors"
    jn.save(a.state_dict(), str(path))
    b.load_state_dict(jn.load(str(path)))
    a.eval(), b.eval()
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())
    sd = dict(a.state_dict())
    del sd["layer_1/W"]
    sd["extra"] = np.zeros(2)
    with pytest.raises(KeyError) as e:
        b.load_state_dict(sd)
    assert "layer_1/W" in str(e.value) and "extra" in str(e.value)
    missing, unexpected = b.load_state_dict(sd, strict=False)
    assert missing == ["layer_1/W"] and unexpected == ["extra"]
    sd = dict(a.state_dict())
    sd["layer_2/W"] = np.zeros((5, 2), np.float32)
    with pytest.raises(ValueError) as e:
        b.load_state_dict(sd)
    assert "layer_2/W" in str(e.value) and "(4, 2)" in str(e.value) and "(5, 2)" in str(e.value)


def test_variable_sharing_and_zero_grad():
    shared = nn.Linear(3, 3)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = shared
            self.dec = shared

        def forward(self, x):
            return self.dec(jn.tanh(self.enc(x)))

    m = Tied()
    assert len(m.parameters()) == 2 and [n for n, _ in m.named_parameters()] == ["enc/W", "enc/b"]
    x = jn.random.normal((4, 3))
    m(x).sum().backward()
    W, b = shared.W.numpy().astype(np.float64), shared.b.numpy().astype(np.float64)
    xv = x.numpy().astype(np.float64)
    h = np.tanh(xv @ W + b)
    # d/dW sum(tanh(xW+b) W + b) = x^T (1 W^T * (1-h^2)) + h^T 1
    g_pre = (np.ones((4, 3)) @ W.T) * (1 - h ** 2)
    np.testing.assert_allclose(shared.W.grad.numpy(), xv.T @ g_pre + h.T @ np.ones((4, 3)), rtol=1e-4,
                               atol=1e-5)
    m.zero_grad()
    assert shared.W.grad is None


def test_train_eval_to_and_sequential():
    m = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Dropout(0.5), nn.Linear(3, 1))
    assert m.training and all(c.training for c in m)
    m.eval()
    assert not any(c.training for c in m)
    assert m.to("cpu") is m
    with pytest.raises(RuntimeError, match="cuda"):
        m.to("cuda")
    assert [n for n, _ in m.named_parameters()] == ["0/W", "0/b", "3/W", "3/b"]
    assert "(1): ReLU()" in repr(m)
    x = jn.random.normal((4, 2))
    ref = np.maximum(x.numpy() @ m[0].W.numpy() + m[0].b.numpy(), 0) @ m[3].W.numpy() + m[3].b.numpy()
    np.testing.assert_allclose(m(x).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_init_functions():
    jn.random.seed(1)
    a = nn.init.he_normal((400, 300))
    assert a.shape == (400, 300) and abs(a.numpy().std() - np.sqrt(2 / 400)) < 0.01
    b = nn.init.xavier_uniform((64, 32, 3, 3))
    lim = np.sqrt(6 / (32 * 9 + 64 * 9))
    assert b.numpy().max() <= lim and b.numpy().min() >= -lim
    t = nn.init.truncated_normal((1000,), std=0.5)
    assert np.abs(t.numpy()).max() <= 1.0
    assert (nn.init.constant((2, 2), 3.0).numpy() == 3).all() and nn.init.zeros(3).numpy().sum() == 0
    jn.random.seed(5)
    u1 = nn.init.uniform((3,)).numpy()
    jn.random.seed(5)
    assert (nn.init.uniform((3,)).numpy() == u1).all()
    n1 = nn.init.normal((2, 2), std=2.0)
    assert n1.dtype == jn.float32 and nn.init.ones(2).numpy().tolist() == [1, 1]


def test_linear_grad_and_errors():
    lin = nn.Linear(3, 2, dtype=jn.float64)
    x = rng().normal(size=(4, 3))
    assert gradcheck(lambda x, W, b: F.linear(x, W, b), T64(x), T64(lin.W.numpy()), T64(lin.b.numpy()))
    with pytest.raises(ValueError, match=r"Linear\(3, 2\).*\(4, 5\)"):
        lin(jn.zeros((4, 5), jn.float64))
    assert nn.Linear(3, 2, init="he").W.shape == (3, 2)


def test_activation_modules():
    x = jn.tensor([[-1.0, 0.5, 2.0]])
    np.testing.assert_allclose(nn.ReLU()(x).numpy(), [[0, 0.5, 2]])
    np.testing.assert_allclose(nn.Sigmoid()(x).numpy(), np_sigmoid(x.numpy()), rtol=1e-6)
    np.testing.assert_allclose(nn.Tanh()(x).numpy(), np.tanh(x.numpy()), rtol=1e-6)
    e = np.exp(x.numpy())
    np.testing.assert_allclose(nn.Softmax()(x).numpy(), e / e.sum(), rtol=1e-6)
    np.testing.assert_allclose(nn.LeakyReLU(0.1)(x).numpy(), [[-0.1, 0.5, 2]], rtol=1e-6)
    assert nn.Flatten()(jn.zeros((2, 3, 4))).shape == (2, 12)


# ---------------------------------------------------------------------------------------------------------------
# Convolution and pooling
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stride,padding,dil", [(1, 0, 1), (1, "same", 1), (2, 1, 1), ((2, 1), (1, 2), 1),
                                                (1, "valid", 2), (2, "same", 1)])
def test_conv2d_forward(stride, padding, dil):
    r = rng(1)
    x = r.normal(size=(2, 3, 7, 6)).astype(np.float32)
    w = r.normal(size=(4, 3, 3, 2)).astype(np.float32)
    b = r.normal(size=4).astype(np.float32)
    y = F.conv2d(jn.tensor(x), jn.tensor(w), jn.tensor(b), stride=stride, padding=padding, dilation=dil)
    s = F._pair(stride, "", "")
    d = F._pair(dil, "", "")
    pads = F._conv_padding(padding, x.shape[2:], w.shape[2:], s, d, "t")
    np.testing.assert_allclose(y.numpy(), np_conv2d(x, w, b, s, pads, d), rtol=1e-4, atol=1e-4)
    if padding == "same" and stride == 1:
        assert y.shape[2:] == x.shape[2:]


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0), (2, "same")])
def test_conv2d_gradients(stride, padding):
    r = rng(2)
    x, w, b = r.normal(size=(2, 2, 5, 4)), r.normal(size=(3, 2, 3, 2)), r.normal(size=3)
    assert gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride=stride, padding=padding), T64(x), T64(w), T64(b))


def test_conv2d_second_order():
    r = rng(3)
    x, w = r.normal(size=(1, 2, 4, 4)), r.normal(size=(2, 2, 2, 2))

    def g(x, w):
        x = x.detach().requires_grad_(True)
        return jn.gradients(jn.sum(F.conv2d(x, w) ** 2), [x], create_graph=True)[0]

    def gw(x, w):
        w = w.detach().requires_grad_(True)
        return jn.gradients(jn.sum(F.conv2d(x, w) ** 2), [w], create_graph=True)[0]
    assert gradcheck(g, T64(x), T64(w), argnums=(1,), atol=1e-4)
    assert gradcheck(gw, T64(x), T64(w), argnums=(0,), atol=1e-4)


def test_conv2d_layer_and_errors():
    conv = nn.Conv2d(3, 5, 3, padding="same")
    assert conv(jn.zeros((2, 3, 8, 8))).shape == (2, 5, 8, 8)
    assert [n for n, _ in conv.named_parameters()] == ["W", "b"] and conv.W.shape == (5, 3, 3, 3)
    with pytest.raises(ValueError, match=r"Conv2d\(3, 5\).*\(2, 4, 8, 8\)"):
        conv(jn.zeros((2, 4, 8, 8)))
    with pytest.raises(ValueError, match="larger than the padded input"):
        F.conv2d(jn.zeros((1, 1, 2, 2)), jn.zeros((1, 1, 3, 3)))
    with pytest.raises(ValueError, match="channels"):
        F.conv2d(jn.zeros((1, 2, 5, 5)), jn.zeros((1, 3, 3, 3)))


def test_conv2d_chunked_batch(monkeypatch):
    monkeypatch.setattr(F, "CHUNK_BYTES", 1)          # one image per chunk
    r = rng(4)
    x, w, b = r.normal(size=(3, 2, 5, 5)), r.normal(size=(2, 2, 3, 3)), r.normal(size=2)
    y = F.conv2d(T64(x), T64(w), T64(b), padding=1)
    np.testing.assert_allclose(y.numpy(), np_conv2d(x, w, b, (1, 1), ((1, 1), (1, 1))), rtol=1e-10, atol=1e-10)
    assert gradcheck(lambda x, w, b: F.conv2d(x, w, b, padding=1), T64(x), T64(w), T64(b))


@pytest.mark.parametrize("k,s,p", [(2, None, 0), (3, 2, 1), ((2, 3), (1, 2), (1, 1))])
def test_pooling_forward_and_grad(k, s, p):
    r = rng(5)
    x = r.permutation(2 * 3 * 6 * 7).reshape(2, 3, 6, 7) * 0.1 + r.uniform(0, 0.01, (2, 3, 6, 7))
    kk = F._pair(k, "", "")
    ss = kk if s is None else F._pair(s, "", "")
    pp = F._pair(p, "", "")
    np.testing.assert_allclose(F.max_pool2d(T64(x), k, s, p).numpy(), np_pool(x, kk, ss, pp, "max"))
    np.testing.assert_allclose(F.avg_pool2d(T64(x), k, s, p).numpy(), np_pool(x, kk, ss, pp, "avg"),
                               rtol=1e-12)
    np.testing.assert_allclose(F.avg_pool2d(T64(x), k, s, p, count_include_pad=False).numpy(),
                               np_pool(x, kk, ss, pp, "avg", include_pad=False), rtol=1e-12)
    assert gradcheck(lambda x: F.max_pool2d(x, k, s, p), T64(x))
    assert gradcheck(lambda x: F.avg_pool2d(x, k, s, p), T64(x))
    assert gradcheck(lambda x: F.avg_pool2d(x, k, s, p, count_include_pad=False), T64(x))


def test_pool_layers():
    x = jn.random.normal((1, 2, 4, 4))
    assert nn.MaxPool2d(2)(x).shape == (1, 2, 2, 2)
    assert nn.AvgPool2d(2, 1)(x).shape == (1, 2, 3, 3)
    assert nn.MaxPool2d(3, 2, "same")(x).shape == (1, 2, 2, 2)
    with pytest.raises(ValueError, match="max_pool2d"):
        F.max_pool2d(jn.zeros((2, 3)), 2)


# ---------------------------------------------------------------------------------------------------------------
# Batch norm and dropout
# ---------------------------------------------------------------------------------------------------------------

def test_batch_norm_train_eval():
    r = rng(6)
    x = r.normal(2.0, 3.0, size=(8, 3, 4, 5)).astype(np.float32)
    bn = nn.BatchNorm2d(3, momentum=0.1)
    bn.gamma.assign(np.array([1.0, 2.0, 0.5], np.float32))
    bn.beta.assign(np.array([0.0, 1.0, -1.0], np.float32))
    y = bn(jn.tensor(x))
    mu, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
    ref = (x - mu[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    ref = ref * np.array([1, 2, 0.5])[None, :, None, None] + np.array([0, 1, -1])[None, :, None, None]
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4)
    n = 8 * 4 * 5
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * mu, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_var.numpy(), 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
    bn.eval()
    mm, mv = bn.moving_mean.numpy().copy(), bn.moving_var.numpy().copy()
    y2 = bn(jn.tensor(x))
    ref2 = (x - mm[None, :, None, None]) / np.sqrt(mv[None, :, None, None] + 1e-5)
    ref2 = ref2 * np.array([1, 2, 0.5])[None, :, None, None] + np.array([0, 1, -1])[None, :, None, None]
    np.testing.assert_allclose(y2.numpy(), ref2, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), mm)       # eval does not update
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\)"):
        bn(jn.zeros((2, 4, 3, 3)))


def test_batch_norm_gradient():
    r = rng(7)
    x, g, b = r.normal(size=(5, 3)), r.normal(size=3), r.normal(size=3)

    def f(x, g, b):
        bn = nn.BatchNorm1d(3, dtype=jn.float64)
        bn.gamma, bn.beta = g, b       # plain tensors: a functional use of the layer (training mode)
        return bn(x) * jn.arange(1, 4, dtype=jn.float64)
    assert gradcheck(f, T64(x), T64(g), T64(b))


@pytest.mark.parametrize("shape,layer", [((4, 3, 5, 2), "BatchNorm2d"), ((6, 3, 4), "BatchNorm1d")])
def test_batch_norm_gradient_nd(shape, layer):
    r = rng(8)
    x, g, b = r.normal(1.0, 2.0, size=shape), r.normal(size=3), r.normal(size=3)
    w = T64(r.normal(size=shape))

    def f(x, g, b):
        bn = getattr(nn, layer)(3, dtype=jn.float64)
        bn.gamma, bn.beta = g, b
        return (bn(x) * w).sum() + (bn(x) ** 2 * w).sum()
    assert gradcheck(f, T64(x), T64(g), T64(b))


def test_batch_moments_and_channel_affine():
    r = rng(9)
    x = (r.normal(size=(16, 5, 7, 3)) * 0.01 + 1e4).astype(np.float32)     # large mean, small spread
    m, v = F.batch_moments(jn.tensor(x))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(m.numpy(), x64.mean((0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(v.numpy(), x64.var((0, 2, 3)), rtol=1e-3)
    a, b = r.normal(size=5), r.normal(size=5)
    x2 = r.normal(size=(3, 5, 4))
    y = F.channel_affine(T64(x2), T64(a), T64(b))
    np.testing.assert_allclose(y.numpy(), x2 * a[None, :, None] + b[None, :, None], rtol=1e-12)
    wt = T64(r.normal(size=x2.shape))
    assert gradcheck(lambda x, a, b: (F.channel_affine(x, a, b) * wt).sum(), T64(x2), T64(a), T64(b))
    assert gradcheck(lambda x: (F.batch_moments(x)[0] * T64(a)).sum() + (F.batch_moments(x)[1] * T64(b)).sum(),
                     T64(x2))
    with pytest.raises(ValueError, match="channel_affine"):
        F.channel_affine(T64(x2), T64(a[:4]), T64(b))


def test_batch_norm_jit_matches_eager():
    r = rng(10)
    x = r.normal(0.5, 2.0, size=(6, 4, 5, 5))
    bn = nn.BatchNorm2d(4, dtype=jn.float64)
    bn.gamma.assign(r.normal(size=4))
    bn.beta.assign(r.normal(size=4))
    w = T64(r.normal(size=x.shape))

    def f(x):
        return ((bn(x) * w) ** 2).sum()
    ge = jn.grad(f)(T64(x)).numpy()
    gj = jn.jit(jn.grad(f))(T64(x)).numpy()
    np.testing.assert_allclose(gj, ge, rtol=1e-10, atol=1e-10)
    n = 6 * 25
    mu, var = x.mean((0, 2, 3)), x.var((0, 2, 3)) * n / (n - 1)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.19 * mu, rtol=1e-10)    # two updates of 0.1
    np.testing.assert_allclose(bn.moving_var.numpy(), 0.81 + 0.19 * var, rtol=1e-10)


def test_dropout_train_eval():
    jn.random.seed(0)
    x = jn.ones((200, 50))
    d = nn.Dropout(0.3)
    y = d(x).numpy()
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.02
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
    d.eval()
    assert d(x) is x
    x2 = jn.tensor(rng().normal(size=(3, 4)), requires_grad=True)
    y2 = F.dropout(x2, 0.5)
    y2.sum().backward()
    np.testing.assert_allclose(x2.grad.numpy(), (y2.numpy() != 0) * 2.0)


# ---------------------------------------------------------------------------------------------------------------
# Recurrent layers
# ---------------------------------------------------------------------------------------------------------------

def test_lstm_cell_forward_and_fused_matches_reference():
    r = rng(8)
    cell = nn.LSTMCell(3, 4, dtype=jn.float64)
    x, h, c = r.normal(size=(2, 3)), r.normal(size=(2, 4)), r.normal(size=(2, 4))
    h2, c2 = cell(T64(x), (T64(h), T64(c)))
    rh, rc = np_lstm(x, h, c, cell.W_ih.numpy(), cell.W_hh.numpy(), cell.b.numpy())
    np.testing.assert_allclose(h2.numpy(), rh, rtol=1e-10)
    np.testing.assert_allclose(c2.numpy(), rc, rtol=1e-10)
    args = [T64(v) for v in (x, h, c, cell.W_ih.numpy(), cell.W_hh.numpy(), cell.b.numpy())]

    def fused(*a):
        h, c = F.lstm_cell(*a)
        return h * 1.5 + c * c
    assert gradcheck(fused, *args)


def test_gru_and_rnn_cells():
    r = rng(9)
    cell = nn.GRUCell(3, 4, dtype=jn.float64)
    cell.b_ih.assign(r.normal(size=12))
    x, h = r.normal(size=(2, 3)), r.normal(size=(2, 4))
    ref = np_gru(x, h, cell.W_ih.numpy(), cell.W_hh.numpy(), cell.b_ih.numpy(), cell.b_hh.numpy())
    np.testing.assert_allclose(cell(T64(x), T64(h)).numpy(), ref, rtol=1e-10)
    assert gradcheck(F.gru_cell, T64(x), T64(h), cell.W_ih, cell.W_hh, cell.b_ih, T64(r.normal(size=12)))
    rc = nn.RNNCell(3, 4, dtype=jn.float64)
    ref = np.tanh(x @ rc.W_ih.numpy() + h @ rc.W_hh.numpy() + rc.b.numpy())
    np.testing.assert_allclose(rc(T64(x), T64(h)).numpy(), ref, rtol=1e-10)


def _np_lstm_seq(x, cells, lengths=None):
    b, t, _ = x.shape
    seq = x
    hs, cs = [], []
    for (wih, whh, bb) in cells:
        hd = whh.shape[0]
        h, c = np.zeros((b, hd)), np.zeros((b, hd))
        outs = np.zeros((b, t, hd))
        for s in range(t):
            h2, c2 = np_lstm(seq[:, s], h, c, wih, whh, bb)
            valid = np.ones(b, bool) if lengths is None else s < np.asarray(lengths)
            h = np.where(valid[:, None], h2, h)
            c = np.where(valid[:, None], c2, c)
            outs[:, s] = np.where(valid[:, None], h2, 0)
        seq = outs
        hs.append(h)
        cs.append(c)
    return seq, np.stack(hs), np.stack(cs)


@pytest.mark.parametrize("lengths", [None, [3, 1, 2]])
def test_lstm_sequence_forward_and_grad(lengths):
    r = rng(10)
    lstm = nn.LSTM(3, 4, num_layers=2, dtype=jn.float64)
    for p in lstm.parameters():
        p.assign(r.normal(0, 0.5, p.shape))
    x = r.normal(size=(3, 3, 3))
    out, (h, c) = lstm(T64(x), lengths=lengths)
    ref = _np_lstm_seq(x, [(cl.W_ih.numpy(), cl.W_hh.numpy(), cl.b.numpy()) for cl in lstm.cells()], lengths)
    np.testing.assert_allclose(out.numpy(), ref[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(h.numpy(), ref[1], rtol=1e-9)
    np.testing.assert_allclose(c.numpy(), ref[2], rtol=1e-9)
    ps = lstm.parameters()

    def f(x, *params):
        m = nn.LSTM(3, 4, num_layers=2, dtype=jn.float64)
        for cl, (a, b_, c_) in zip(m.cells(), zip(params[0::3], params[1::3], params[2::3])):
            cl.W_ih, cl.W_hh, cl.b = a, b_, c_
        o, (hh, cc) = m(x, lengths=lengths)
        return jn.sum(o * o) + jn.sum(hh) + jn.sum(cc * cc)
    assert gradcheck(f, T64(x), *[T64(p.numpy()) for p in ps])


def test_gru_rnn_sequences_with_mask():
    r = rng(11)
    x = r.normal(size=(2, 4, 3))
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    gru = nn.GRU(3, 2, dtype=jn.float64)
    out, h = gru(T64(x), mask=mask)
    cl = gru.layer_0
    hh = np.zeros((2, 2))
    for t in range(4):
        h2 = np_gru(x[:, t], hh, cl.W_ih.numpy(), cl.W_hh.numpy(), cl.b_ih.numpy(), cl.b_hh.numpy())
        hh = np.where(mask[:, t:t + 1] > 0, h2, hh)
        np.testing.assert_allclose(out.numpy()[:, t], hh * mask[:, t:t + 1], rtol=1e-10)
    np.testing.assert_allclose(h.numpy()[0], hh, rtol=1e-10)
    rnn = nn.RNN(3, 2, num_layers=2, dtype=jn.float64)
    out, h = rnn(T64(x))
    assert out.shape == (2, 4, 2) and h.shape == (2, 2, 2)
    np.testing.assert_allclose(out.numpy()[:, -1], h.numpy()[-1])
    assert gradcheck(lambda x: nn.GRU.forward(gru, x, mask=mask)[0], T64(x))
    with pytest.raises(ValueError, match=r"GRU\(3, 2\).*\(2, 4\)"):
        gru(jn.zeros((2, 4)))


def test_lstm_input_gradient_and_float32():
    r = rng(12)
    lstm = nn.LSTM(3, 5)
    x = jn.tensor(r.normal(size=(2, 6, 3)), requires_grad=True)
    out, (h, c) = lstm(x)
    assert out.dtype == jn.float32 and out.shape == (2, 6, 5) and h.shape == (1, 2, 5)
    out.sum().backward()
    assert x.grad.shape == (2, 6, 3) and np.isfinite(x.grad.numpy()).all()
    assert "LSTMCell(3, 5)" in repr(lstm)


def test_lstm_seq_matches_step_loop_gradcheck_zero_length_and_jit():
    r = rng(14)
    t, b, hd = 4, 3, 2
    xw, whh, bias = r.normal(size=(t, b, 4 * hd)), r.normal(0, 0.5, (hd, 4 * hd)), r.normal(size=4 * hd)
    s0 = np.concatenate([r.normal(size=(b, 2 * hd)), np.zeros((b, 4 * hd))], axis=1)
    mask = np.array([[1, 1, 1], [1, 0, 1], [1, 0, 1], [0, 0, 1]], float)
    for m in (None, mask):
        got = F.lstm_seq(T64(xw), T64(s0), T64(whh), T64(bias), mask=m).numpy()
        s = T64(s0)
        for k in range(t):
            s = F.lstm_step(T64(xw[k]), s, T64(whh), T64(bias), None if m is None else T64(m[k]))
            np.testing.assert_allclose(got[k], s.numpy(), rtol=1e-12, atol=1e-14)
        wts = T64(r.normal(size=(t, b, 6 * hd)))        # gradients reach h, c and the saved gates
        assert gradcheck(lambda *a: F.lstm_seq(*a, mask=m) * wts, T64(xw), T64(s0), T64(whh), T64(bias))
    # jitted: forward and every gradient equal the eager ones
    ws = [jn.tensor(v, requires_grad=True) for v in (xw, s0, whh, bias)]

    def loss(*a):
        return jn.sum(F.lstm_seq(*a, mask=mask) ** 2)
    eager = jn.grad(loss, argnums=(0, 1, 2, 3))(*ws)
    jitted = jn.jit(jn.grad(loss, argnums=(0, 1, 2, 3)))(*ws)
    for e, j in zip(eager, jitted):
        np.testing.assert_allclose(j.numpy(), e.numpy(), rtol=1e-12, atol=1e-14)
    # zero steps: empty states, zero gradients
    z = F.lstm_seq(T64(np.zeros((0, b, 4 * hd))), T64(s0), T64(whh), T64(bias))
    assert z.shape == (0, b, 6 * hd)
    g = jn.grad(lambda w: jn.sum(F.lstm_seq(T64(np.zeros((0, b, 4 * hd))), T64(s0), w, T64(bias))))(T64(whh))
    assert np.array_equal(g.numpy(), np.zeros_like(whh))
    with pytest.raises(ValueError, match=r"lstm_seq: inconsistent shapes"):
        F.lstm_seq(T64(xw), T64(s0[:, :5]), T64(whh), T64(bias))
    with pytest.raises(ValueError, match=r"lstm_seq: mask has shape \(3, 4\)"):
        F.lstm_seq(T64(xw), T64(s0), T64(whh), T64(bias), mask=mask.T)


# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------

def _np_softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_dot_product_attention_with_mask():
    r = rng(13)
    q, k, v = r.normal(size=(2, 4)), r.normal(size=(2, 5, 4)), r.normal(size=(2, 5, 3))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ctx, w = nn.dot_product_attention(T64(q), T64(k), T64(v), mask=mask, scale=0.5)
    s = np.einsum("bd,btd->bt", q, k) * 0.5
    s = np.where(mask > 0, s, -1e9)
    rw = _np_softmax(s)
    np.testing.assert_allclose(w.numpy(), rw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ctx.numpy(), np.einsum("bt,btd->bd", rw, v), rtol=1e-10)
    assert w.numpy()[0, 3:].max() == 0
    assert gradcheck(lambda q, k, v: nn.dot_product_attention(q, k, v, mask=mask)[0], T64(q), T64(k), T64(v))


def test_luong_and_bahdanau_layers():
    r = rng(14)
    q, k = r.normal(size=(2, 3, 4)), r.normal(size=(2, 5, 6))
    att = nn.LuongAttention(4, 6, score="general", dtype=jn.float64)
    ctx, w = att(T64(q), T64(k))
    rw = _np_softmax(np.einsum("bqd,btd->bqt", q @ att.proj.W.numpy(), k))
    np.testing.assert_allclose(w.numpy(), rw, rtol=1e-10)
    assert ctx.shape == (2, 3, 6)
    ba = nn.BahdanauAttention(4, 6, 7, dtype=jn.float64)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    ctx, w = ba(T64(q[:, 0]), T64(k), mask=mask)
    e = np.tanh((q[:, 0] @ ba.query_proj.W.numpy())[:, None, :] + k @ ba.key_proj.W.numpy()
                + ba.key_proj.b.numpy())
    s = np.where(mask > 0, e @ ba.v.W.numpy()[:, 0], -1e9)
    np.testing.assert_allclose(w.numpy(), _np_softmax(s), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ctx.numpy(), np.einsum("bt,btd->bd", _np_softmax(s), k), rtol=1e-10)
    assert [n for n, _ in ba.named_parameters()] == ["query_proj/W", "key_proj/W", "key_proj/b", "v/W"]
    Wq, Wk, v = (T64(r.normal(size=s_)) for s_ in [(4, 7), (6, 7), (7,)])
    assert gradcheck(lambda q, k, a, b, c: nn.additive_attention(q, k, a, b, c, mask=mask)[0],
                     T64(q[:, 0]), T64(k), Wq, Wk, v)


# ---------------------------------------------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------------------------------------------

def test_embedding_layer():
    emb = nn.Embedding(10, 3)
    ids = jn.tensor(np.array([[1, 2], [2, 9]]))
    y = emb(ids)
    np.testing.assert_array_equal(y.numpy(), emb.W.numpy()[ids.numpy()])
    (y * y).sum().backward()
    g = emb.W.grad
    dense = g.to_dense().numpy() if hasattr(g, "to_dense") else np.asarray(g.numpy())
    ref = np.zeros((10, 3), np.float32)
    np.add.at(ref, ids.numpy().reshape(-1), 2 * y.numpy().reshape(-1, 3))
    np.testing.assert_allclose(dense, ref, rtol=1e-6)
    with pytest.raises(IndexError, match="10"):
        emb(jn.tensor(np.array([10])))
