"""The fused nn rows on CUDA (LSTM step and sequence with their gradient rows, batch-norm statistics and affine
map, the conv bias gradient) against their CPU forms: values and gradients, with and without masks, float32 and
float64, eagerly and under ``jn.jit``; and the BatchNorm and LSTM layers taking those rows on the GPU. Tiny
shapes: the simulator is slow."""
import numpy as np
import pytest

import jitnet as jn
import jitnet.nn as nn
import jitnet.nn.functional as F

RNG = np.random.default_rng(11)
B, H, T = 3, 4, 3


def _rand(*shape, scale=1.0, dtype=np.float32):
    return (RNG.standard_normal(shape) * scale).astype(dtype)


@pytest.fixture
def cuda_calls(monkeypatch):
    """Count the calls of each fused row's CUDA implementation (proves the GPU path took the fused rows)."""
    calls = {}
    for prim in (F.LSTM_STEP, F.LSTM_DZ, F.LSTM_DPREV, F.LSTM_SEQ, F.LSTM_SEQ_BWD, F.BN_MOMENTS, F.CHANNEL_AFFINE,
                 F.CHANNEL_AFFINE_SUMS, F.CONV2D_BIAS_GRAD):
        impl = prim.impl["cuda"]

        def counted(*a, _impl=impl, _name=prim.name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _impl(*a, **k)
        monkeypatch.setitem(prim.impl, "cuda", counted)
    return calls


def _value_and_grads(dev, loss, arrays, jit, argnums):
    """(value, *gradients) of ``loss`` on ``dev`` as NumPy arrays; the results stay on the device."""
    f = jn.value_and_grad(loss, argnums=argnums)
    if jit:
        f = jn.jit(f)
    ts = [jn.tensor(a).to(dev) for a in arrays]
    for _ in range(2 if jit else 1):        # a jitted function's second call runs its compiled plan
        val, grads = f(*ts)
    outs = (val,) + tuple(grads)
    assert all(t.is_cuda == (dev == "cuda") for t in outs)
    steps = list(f._cache.values())[0].plan.step_names if jit else []
    return [t.numpy() for t in outs], steps


def _same(loss, arrays, jit, argnums, dtype, rows=()):
    """Check values and gradients on cuda against the cpu; a jitted cuda plan runs each of ``rows`` on the GPU."""
    ref, _ = _value_and_grads("cpu", loss, arrays, jit, argnums)
    got, steps = _value_and_grads("cuda", loss, arrays, jit, argnums)
    for row in rows if jit else ():
        assert any(st.startswith(f"{row} (cuda)") for st in steps), (row, steps)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)
    for a, b in zip(ref, got):
        assert b.dtype == a.dtype
        np.testing.assert_allclose(b, a, **tol)
    return got


CASES = [(np.float32, False, False), (np.float32, True, False), (np.float32, True, True), (np.float64, True, False)]
IDS = ["f32", "f32-mask", "f32-mask-jit", "f64-mask"]


@pytest.mark.parametrize("dtype,masked,jit", CASES, ids=IDS)
def test_lstm_step_rows_match_cpu(dtype, masked, jit, cuda_calls):
    xw, s, w, b, gs = (_rand(B, 4 * H, dtype=dtype), _rand(B, 6 * H, dtype=dtype),
                       _rand(H, 4 * H, scale=0.5, dtype=dtype), _rand(4 * H, dtype=dtype), _rand(B, 6 * H, dtype=dtype))
    mask = np.array([1, 0, 1], dtype)

    def loss(xw, s, w, b, gs, mask):
        out = F.lstm_step(xw, s, w, b, mask=mask if masked else None)
        return jn.sum(out * gs)                  # weights every part of the packed state [h, c, i, f, g, o]

    got = _same(loss, (xw, s, w, b, gs, mask), jit, (0, 1, 2, 3), dtype,
                rows=("lstm_step", "lstm_step_dz", "lstm_step_dprev"))
    if masked:                                   # a masked row's d xw is 0; its h and c gradients pass through
        assert np.all(got[1][1] == 0) and np.any(got[1][0] != 0)
        np.testing.assert_array_equal(got[2][1, :2 * H], gs[1, :2 * H])
    for name in ("lstm_step", "lstm_step_dz", "lstm_step_dprev"):
        assert cuda_calls.get(name, 0) >= 1, cuda_calls


@pytest.mark.parametrize("dtype,masked,jit", CASES, ids=IDS)
def test_lstm_seq_rows_match_cpu(dtype, masked, jit, cuda_calls):
    xw, s0, w, b, gs = (_rand(T, B, 4 * H, dtype=dtype), _rand(B, 6 * H, dtype=dtype),
                        _rand(H, 4 * H, scale=0.5, dtype=dtype), _rand(4 * H, dtype=dtype),
                        _rand(T, B, 6 * H, dtype=dtype))
    mask = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 1]], dtype)       # (T, B): rows stop at different steps

    def loss(xw, s0, w, b, gs, mask):
        S = F.lstm_seq(xw, s0, w, b, mask=mask if masked else None)
        return jn.sum(S * gs)

    got = _same(loss, (xw, s0, w, b, gs, mask), jit, (0, 1, 2, 3), dtype, rows=("lstm_seq", "lstm_seq_bwd"))
    if masked:
        assert np.all(got[1][2, 0] == 0) and np.all(got[1][1, 1] == 0)
    assert cuda_calls.get("lstm_seq", 0) >= 1 and cuda_calls.get("lstm_seq_bwd", 0) >= 1, cuda_calls


@pytest.mark.parametrize("t,bsz,hd", [(0, 2, 2), (2, 0, 3), (2, 2, 0)], ids=["no-steps", "no-rows", "no-units"])
def test_lstm_seq_rows_direct_on_empty_shapes(t, bsz, hd):
    """The rows applied directly to empty shapes: an empty sequence and a zero (or empty) backward, like the CPU."""
    args = [_rand(t, bsz, 4 * hd), _rand(bsz, 6 * hd), _rand(hd, 4 * hd), _rand(4 * hd)]
    for prim, arrays in ((F.LSTM_SEQ, args), (F.LSTM_SEQ_BWD, [_rand(t, bsz, 6 * hd), _rand(t, bsz, 6 * hd)]
                                              + args[1:3])):
        ref = prim.impl["cpu"](*arrays)
        got = jn.cuda.to_host(prim.impl["cuda"](*[jn.cuda.to_device(a) for a in arrays]))
        assert got.shape == ref.shape and got.dtype == ref.dtype
        np.testing.assert_array_equal(got, ref)


def test_lstm_shape_errors_on_cuda():
    t = [jn.tensor(a).to("cuda") for a in (_rand(T, B, 4 * H), _rand(B, 6 * H), _rand(H, 4 * H), _rand(4 * H))]
    with pytest.raises(ValueError, match="lstm_seq: inconsistent shapes"):
        F.lstm_seq(t[0], t[1], t[2], t[3][:-1])
    with pytest.raises(ValueError, match="lstm_seq: mask has shape"):
        F.lstm_seq(*t, mask=jn.ones((T, B + 1), device="cuda"))
    with pytest.raises(ValueError, match="lstm_step: inconsistent shapes"):
        F.lstm_step(t[0][0], t[1][:, :-1], t[2], t[3])


# (3, 2, 5, 5): 75 values a channel, more than one ROW_CHUNK in the simulator, so the partial sums of two chunks
# are combined
BN_CASES = [((3, 2, 5, 5), np.float32, False), ((3, 2, 5, 5), np.float32, True), ((4, 3), np.float32, False),
            ((2, 3, 4), np.float64, False)]


@pytest.mark.parametrize("shape,dtype,jit", BN_CASES, ids=["nchw-f32", "nchw-f32-jit", "nc-f32", "ncl-f64"])
def test_batch_norm_rows_match_cpu(shape, dtype, jit, cuda_calls):
    c = shape[1]
    x = _rand(*shape, dtype=dtype) + dtype(5.0)      # an offset: the shifted sums keep the variance accurate
    a, b, gm, gv = (_rand(c, dtype=dtype) for _ in range(4))
    gy = _rand(*shape, dtype=dtype)

    def loss(x, a, b, gy, gm, gv):
        mean, var = F.batch_moments(x)
        return jn.sum(F.channel_affine(x, a, b) * gy) + jn.sum(mean * gm) + jn.sum(var * gv)

    _same(loss, (x, a, b, gy, gm, gv), jit, (0, 1, 2), dtype,
          rows=("bn_moments", "channel_affine", "channel_affine_sums"))
    for name in ("bn_moments", "channel_affine", "channel_affine_sums"):
        assert cuda_calls.get(name, 0) >= 1, cuda_calls


def test_bn_moments_keeps_float32_precision_far_from_zero():
    """A channel with mean 1e4 and std 1e-2: float64 sums shifted by the channel's first value, as on the CPU."""
    x = (1e4 + _rand(6, 2, 3) * 1e-2).astype(np.float32)
    ref = F.BN_MOMENTS.impl["cpu"](x)
    got = jn.cuda.to_host(F.BN_MOMENTS.impl["cuda"](jn.cuda.to_device(x)))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    np.testing.assert_allclose(got[1], x.astype(np.float64).var(axis=(0, 2)), rtol=1e-3)


def test_channel_affine_shape_error_on_cuda():
    x = jn.tensor(_rand(2, 3, 2)).to("cuda")
    with pytest.raises(ValueError, match="channel_affine: a"):
        F.channel_affine(x, jn.ones(2, device="cuda"), jn.zeros(3, device="cuda"))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_conv2d_bias_grad_matches_cpu(jit, cuda_calls):
    x, w, b, gy = _rand(2, 2, 4, 4), _rand(3, 2, 3, 3), _rand(3), _rand(2, 3, 2, 2)

    def loss(x, w, b, gy):
        return jn.sum(F.conv2d(x, w, b) * gy)

    got = _same(loss, (x, w, b, gy), jit, (1, 2), np.float32, rows=("conv2d_bias_grad",))
    np.testing.assert_allclose(got[2], gy.sum(axis=(0, 2, 3)), rtol=1e-5)
    assert cuda_calls.get("conv2d_bias_grad", 0) >= 1, cuda_calls


def _train_step(dev, make_model, x, loss_of, jit):
    jn.random.seed(5)
    model = make_model().to(dev)
    opt = jn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(xb):
        opt.zero_grad()
        loss = loss_of(model, xb)
        loss.backward()
        opt.step()
        return loss

    if jit:
        step = jn.jit(step)
    loss = step(jn.tensor(x).to(dev))
    grads = [p.grad.numpy() for p in model.parameters() if p.grad is not None] if not jit else []
    return loss.item(), grads, [p.numpy() for p in model.parameters()], model


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_batch_norm_layer_on_cuda_matches_cpu(jit, cuda_calls):
    x = _rand(4, 3, 3, 3) + np.float32(2.0)
    gy = _rand(4, 3, 3, 3)

    def make():
        return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))

    def loss_of(model, xb):
        return jn.sum(model(xb) * jn.tensor(gy).to(xb.device))

    lc, gc, pc, mc = _train_step("cpu", make, x, loss_of, jit)
    lg, gg, pg, mg = _train_step("cuda", make, x, loss_of, jit)
    np.testing.assert_allclose(lg, lc, rtol=1e-5, atol=1e-5)
    for a, b in zip(gc + pc, gg + pg):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    bc, bg = mc[1], mg[1]                            # the moving statistics follow the same batch moments
    np.testing.assert_allclose(bg.moving_mean.numpy(), bc.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bg.moving_var.numpy(), bc.moving_var.numpy(), rtol=1e-5, atol=1e-6)
    for name in ("bn_moments", "channel_affine", "channel_affine_sums", "conv2d_bias_grad"):
        assert cuda_calls.get(name, 0) >= 1, cuda_calls


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_lstm_layer_on_cuda_matches_cpu(jit, cuda_calls):
    x = _rand(B, T, 2)
    lengths = np.array([3, 1, 2])

    def loss_of(model, xb):
        out, (h, c) = model(xb, lengths=lengths)
        return jn.sum(out * out) + jn.sum(h) + jn.sum(c * c)

    lc, gc, pc, _ = _train_step("cpu", lambda: nn.LSTM(2, H), x, loss_of, jit)
    lg, gg, pg, _ = _train_step("cuda", lambda: nn.LSTM(2, H), x, loss_of, jit)
    np.testing.assert_allclose(lg, lc, rtol=1e-5, atol=1e-5)
    for a, b in zip(gc + pc, gg + pg):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert cuda_calls.get("lstm_seq", 0) >= 1 and cuda_calls.get("lstm_seq_bwd", 0) >= 1, cuda_calls


def test_lstm_cell_on_cuda_matches_cpu(cuda_calls):
    """nn.LSTMCell (zero initial state, packed by lstm_state) runs the fused step rows on the device."""
    x = _rand(B, 2)

    def loss_of(model, xb):
        h, c = model(xb)
        return jn.sum(h * h) + jn.sum(c)

    lc, gc, _, _ = _train_step("cpu", lambda: nn.LSTMCell(2, H), x, loss_of, False)
    lg, gg, _, _ = _train_step("cuda", lambda: nn.LSTMCell(2, H), x, loss_of, False)
    np.testing.assert_allclose(lg, lc, rtol=1e-5, atol=1e-5)
    for a, b in zip(gc, gg):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert cuda_calls.get("lstm_step", 0) >= 1 and cuda_calls.get("lstm_step_dz", 0) >= 1, cuda_calls
