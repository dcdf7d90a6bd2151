"""The fused attention-decoder rows on CUDA (jitnet.nn.attention_decoder: the decoder's LSTM step with its
gradient rows, the additive-attention tanh, context and weights rows, and the packed-gradient views) against
their CPU forms: values and gradients, eagerly and under ``jn.jit``, float32 and float64. Tiny shapes: the
simulator is slow."""
import numpy as np
import pytest

import jitnet as jn
from jitnet.nn import attention_decoder as AD

RNG = np.random.default_rng(5)
B, H, S, U, D = 3, 4, 4, 3, 2
ROWS = (AD.S2S_LSTM, AD.S2S_LSTM_DZ, AD.S2S_LSTM_DPREV, AD.S2S_LSTM_DW, AD.S2S_UNPACK, AD.ATTN_TANH,
        AD.ATTN_TANH_GRAD, AD.ATTN_CTX, AD.ATTN_CTX_GRAD, AD.ATTN_WEIGHTS)


def _rand(*shape, scale=1.0, dtype=np.float32):
    return (RNG.standard_normal(shape) * scale).astype(dtype)


@pytest.fixture
def cuda_calls(monkeypatch):
    """Count the calls of each row's CUDA implementation (proves the GPU path took the fused rows)."""
    calls = {}
    for prim in ROWS:
        impl = prim.impl["cuda"]

        def counted(*a, _impl=impl, _name=prim.name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _impl(*a, **k)
        monkeypatch.setitem(prim.impl, "cuda", counted)
    return calls


def _value_and_grads(dev, loss, arrays, jit, argnums):
    f = jn.value_and_grad(loss, argnums=argnums)
    if jit:
        f = jn.jit(f)
    ts = [jn.tensor(a).to(dev) for a in arrays]
    for _ in range(2 if jit else 1):        # a jitted function's second call runs its compiled plan
        val, grads = f(*ts)
    outs = (val,) + tuple(grads)
    assert all(t.is_cuda == (dev == "cuda") for t in outs)
    return [t.numpy() for t in outs]


def _same(loss, arrays, jit, argnums, dtype):
    ref = _value_and_grads("cpu", loss, arrays, jit, argnums)
    got = _value_and_grads("cuda", loss, arrays, jit, argnums)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)
    for a, b in zip(ref, got):
        assert b.dtype == a.dtype
        np.testing.assert_allclose(b, a, **tol)
    return got


CASES = [(np.float32, False, False), (np.float32, True, True), (np.float64, True, False)]
IDS = ["f32", "f32-mask-jit", "f64-mask"]


@pytest.mark.parametrize("dtype,masked,jit", CASES, ids=IDS)
def test_decoder_lstm_step_rows_match_cpu(dtype, masked, jit, cuda_calls):
    xw, s, w, gs = (_rand(B, 4 * H, dtype=dtype), _rand(B, 6 * H, dtype=dtype), _rand(H, 4 * H, scale=0.5, dtype=dtype),
                    _rand(B, 6 * H, dtype=dtype))
    mask = np.array([1, 0, 1], np.uint8)

    def loss(xw, s, w, gs, mask):
        return jn.sum(AD.lstm_step_fused(xw, s, w, mask if masked else None) * gs)

    got = _same(loss, (xw, s, w, gs, mask), jit, (0, 1, 2), dtype)
    for row in ("s2s_lstm_step", "s2s_lstm_step_dz", "s2s_lstm_step_dprev", "s2s_lstm_step_dw"):
        assert cuda_calls.get(row), (row, cuda_calls)
    if masked:                                   # a masked row's d xw is 0; its h and c gradients pass through
        assert np.all(got[1][1] == 0) and np.any(got[1][0] != 0)
        np.testing.assert_array_equal(got[2][1, :2 * H], gs[1, :2 * H])


def _attention_inputs(dtype):
    q, pk, v, vals, gc = (_rand(B, U, dtype=dtype), _rand(B, S, U, dtype=dtype), _rand(U, dtype=dtype),
                          _rand(B, S, D, dtype=dtype), _rand(B, D, dtype=dtype))
    mask = np.ones((B, S), np.uint8)
    mask[1, 2:] = 0
    mask[2] = 0                                  # a row with nothing to attend to: zero weights, zero context
    return q, pk, v, vals, gc, mask


@pytest.mark.parametrize("dtype,jit", [(np.float32, False), (np.float32, True), (np.float64, False)],
                         ids=["f32", "f32-jit", "f64"])
def test_additive_attention_rows_match_cpu(dtype, jit, cuda_calls):
    q, pk, v, vals, gc, mask = _attention_inputs(dtype)

    def loss(q, pk, v, vals, gc, mask):
        return jn.sum(AD.additive_attention_step(q, pk, v, mask, vals) * gc)

    got = _same(loss, (q, pk, v, vals, gc, mask), jit, (0, 1, 2, 3), dtype)
    for row in ("additive_attention_tanh", "additive_attention_context", "additive_attention_tanh_grad",
                "additive_attention_context_grad", "s2s_unpack"):
        assert cuda_calls.get(row), (row, cuda_calls)
    assert np.all(got[4][2] == 0) and np.all(got[2][1, 2:] == 0)     # masked positions get no gradient


def test_attention_weights_and_tanh_match_cpu(cuda_calls):
    q, pk, v, vals, _, mask = _attention_inputs(np.float32)
    args = (q, pk, v, mask, vals)
    ref = AD.additive_attention_weights(*(jn.tensor(a) for a in args)).numpy()
    d = [jn.tensor(a).to("cuda") for a in args]
    w = AD.additive_attention_weights(*d)
    th = AD.additive_attention_tanh(d[0], d[1], d[3])
    assert w.is_cuda and th.is_cuda and cuda_calls.get("additive_attention_weights")
    np.testing.assert_allclose(w.numpy(), ref, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(w.numpy()[:2].sum(1), 1.0, rtol=1e-6)
    assert np.all(w.numpy()[2] == 0) and np.all(w.numpy()[1, 2:] == 0)
    ref_th = np.where(mask[:, :, None] > 0, np.tanh(pk + q[:, None, :]), 0)
    np.testing.assert_allclose(th.numpy(), ref_th, rtol=2e-6, atol=1e-6)


# ---- the model and its commands on cuda ---------------------------------------------------------------------------

def _twins(jit):
    """A tiny reversal task, two batches, and a cpu and a cuda trainer of the same initial weights."""
    from jitnet.data import seq_tasks as T
    from jitnet.models import seq2seq as S
    task = T.reverse_task(8, 2, 1, 2, alphabet="abc", seed=0)
    src, tgt = T.encode_pairs(task.train, task.src_vocab, task.tgt_vocab)
    batches = list(T.BucketBatcher(src, tgt, 2, n_buckets=1, seed=0).batches(0))[:2 if jit else 1]
    jn.random.seed(3)
    nets = [S.Seq2Seq(len(task.src_vocab), len(task.tgt_vocab), embed=4, hidden=4) for _ in range(2)]
    nets[1].load_state_dict({k: v.numpy().copy() for k, v in nets[0].state_dict().items()})
    return batches, [S.Seq2SeqTrainer(n, task.src_vocab, task.tgt_vocab, lr=1e-2, jit=jit, device=d, max_len=2,
                                      eval_batch=2) for n, d in zip(nets, ("cpu", "cuda"))]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_model_first_losses_match_cpu_without_in_step_transfers(jit, raw_transfers):
    batches, (tc, tg) = _twins(jit)
    assert all(p.is_cuda for p in tg.net.parameters())
    for b in batches:
        lc, nc = tc.train_step(b)
        args = tg.step_inputs(b)                 # the batch goes to the device once, before the step
        assert all(a.is_cuda for a in args)
        jn.cuda.reset_transfer_stats()
        r0 = dict(raw_transfers)
        lg, ng = tg._step(*args)
        st = jn.cuda.transfer_stats()
        # the step itself moves nothing (the loss is read below, after it)
        assert st["h2d"] == st["d2h"] == 0 and raw_transfers["h2d"] == r0["h2d"] and \
            raw_transfers["d2h"] == r0["d2h"], st
        assert lg.is_cuda and ng.is_cuda
        np.testing.assert_allclose(lg.item(), lc.item(), rtol=2e-5)
        np.testing.assert_allclose(ng.item(), nc.item(), rtol=2e-4)
    for (name, pc), pg in zip(tc.net.named_parameters(), tg.net.parameters()):
        np.testing.assert_allclose(pg.numpy(), pc.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_reverse_command_smoke_on_cuda_in_process(tmp_path, capsys):   # eager (test_models_cuda's subprocess: jitted)
    from jitnet.models import _seq2seq_cli as CLI
    argv = ["--device", "cuda", "--smoke", "--no-progress", "--no-jit", "--logdir", str(tmp_path)]
    trainer, m = CLI.run_reverse(argv)
    assert trainer.device.type == "cuda" and all(p.is_cuda for p in trainer.net.parameters())
    assert m["step"] == 2 and 0.0 <= m["char_accuracy"] <= 1.0             # --smoke's two steps
    assert (tmp_path / "checkpoints").is_dir() and (tmp_path / "metrics.csv").exists()
    assert "seq2seq-reverse epoch 1: step 2" in capsys.readouterr().out
