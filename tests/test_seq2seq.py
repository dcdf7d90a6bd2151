"""Seq2seq with attention: task generators, batching, the fused step primitives, the model, decoding, training."""
from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pytest

import jitnet as jn
import jitnet.nn as nn
import jitnet.nn.functional as F
from jitnet.data import seq_tasks as T
from jitnet.models import _seq2seq_cli as CLI
from jitnet.models import seq2seq as S
from jitnet.nn import attention_decoder as AD
from jitnet.testing import gradcheck


def _f64(a):
    return jn.tensor(np.asarray(a, np.float64), dtype=jn.float64)


# ---- date task --------------------------------------------------------------------------------------------------

_STRPTIME = {
    "d MMMM yyyy": "%d %B %Y", "dd MMMM yyyy": "%d %B %Y", "MMMM d, yyyy": "%B %d, %Y",
    "mmmm d, yyyy": "%B %d, %Y", "MMMM-UPPER d yyyy": "%B %d %Y", "d MMM yyyy": "%d %b %Y",
    "MMM d, yyyy": "%b %d, %Y", "MMM dd yyyy": "%b %d %Y", "d-MMM-yyyy": "%d-%b-%Y", "mm/dd/yyyy": "%m/%d/%Y",
    "m/d/yy": "%m/%d/%y", "dd.mm.yyyy": "%d.%m.%Y", "yyyy.mm.dd": "%Y.%m.%d", "yyyy/m/d": "%Y/%m/%d",
    "yyyymmdd": "%Y%m%d", "EEE MMM d yyyy": "%a %b %d %Y", "EEEE, MMMM d, yyyy": "%A, %B %d, %Y",
    "dth of MMMM, yy": "%d of %B, %y", "the dth of mmmm yyyy": "the %d of %B %Y", "MMMM dth, yyyy": "%B %d, %Y",
    "yyyy MMMM d": "%Y %B %d", "d mmm 'yy": "%d %b '%y",
}


def _parse(text, fmt_name):
    """Parse a generated date back with the standard library (ordinal suffixes stripped, century 1950-2049)."""
    text = re.sub(r"(\d+)(st|nd|rd|th)\b", r"\1", text)
    d = dt.datetime.strptime(text, _STRPTIME[fmt_name]).date()
    if "%y" in _STRPTIME[fmt_name]:
        yy = d.year % 100
        d = d.replace(year=(1900 if yy >= 50 else 2000) + yy)
    return d


def test_every_date_format_parses_back_to_its_date():
    assert {n for n, _ in T.DATE_FORMATS} == set(_STRPTIME)
    rng = np.random.default_rng(0)
    n_days = (T.LAST_DATE - T.FIRST_DATE).days + 1
    days = [T.FIRST_DATE + dt.timedelta(days=int(k)) for k in rng.integers(0, n_days, 40)]
    days += [dt.date(2021, 3, 3), dt.date(1950, 1, 1), dt.date(2049, 12, 31), dt.date(2000, 2, 29)]
    per_format = []
    for i, (name, _) in enumerate(T.DATE_FORMATS):
        texts = []
        for d in days:
            text = T.format_date(d, i)
            assert _parse(text, name) == d, (name, text)
            if "EEE" in name:
                assert text.split()[0].rstrip(",") in (d.strftime("%a"), d.strftime("%A"))
            texts.append(text)
        per_format.append(tuple(texts))
    assert len(set(per_format)) == len(T.DATE_FORMATS)          # no two formats write every date alike
    assert T.format_date(dt.date(2021, 3, 3), "dth of MMMM, yy") == "3rd of March, 21"
    assert T.format_date(dt.date(2021, 3, 3), "yyyy.mm.dd") == "2021.03.03"
    with pytest.raises(KeyError, match="unknown format"):
        T.format_date(dt.date(2021, 3, 3), "nope")


def test_date_task_is_seeded_and_test_is_held_out():
    a = T.date_task(600, 200, seed=3)
    b = T.date_task(600, 200, seed=3)
    c = T.date_task(600, 200, seed=4)
    assert a.train.sources == b.train.sources and a.test.targets == b.test.targets
    assert a.train.sources != c.train.sources
    names = [n for n, _ in T.DATE_FORMATS]
    combos = set(a.held_combos)
    styles = T.MONTH_STYLES
    for name in names:                                        # one held-out month per format that shares its
        group = [n for n in names if styles[n] == styles[name]]          # month spelling with another format
        held_here = [m for f, m in combos if f == name]
        assert len(held_here) == (1 if len(group) > 1 else 0), name
        for m in held_here:                                   # the spelling stays in training elsewhere
            assert any((g, m) not in combos for g in group if g != name)

    def held(target, fmt):
        d = dt.date.fromisoformat(target)
        return bool(a.held_dates[(d - T.FIRST_DATE).days]) or (names[fmt], d.month) in combos

    for data, want in ((a.train, False), (a.test, True)):
        for s, t, f in zip(data.sources, data.targets, data.info):
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", t)
            assert _parse(s, names[f]).isoformat() == t
            assert held(t, f) == want
    assert not set(a.test.sources) & set(a.train.sources)
    for s in a.train.sources + a.test.sources:
        a.src_vocab.encode(s)                                   # every character is in the vocabulary
    assert a.max_target_len == 11


def test_char_vocab_and_reverse_task():
    v = T.CharVocab("cab")
    assert v.itos[:3] == ["<pad>", "<s>", "</s>"] and len(v) == 6
    ids = v.encode("abca", eos=True, sos=True)
    assert ids.tolist() == [T.SOS, 3, 4, 5, 3, T.EOS]
    assert v.decode(ids) == "abca" and v.decode([3, T.EOS, 4]) == "a"
    with pytest.raises(KeyError, match="'z'"):
        v.encode("az")
    task = T.reverse_task(80, 30, 2, 4, alphabet="abc", seed=1)
    assert all(t == s[::-1] for s, t in zip(task.train.sources, task.train.targets))
    assert not set(task.train.sources) & set(task.test.sources)
    assert all(2 <= len(s) <= 4 for s in task.train.sources)
    with pytest.raises(ValueError, match="distinct strings"):
        T.reverse_task(100, 10, 1, 2, alphabet="ab")


def test_pad_batch_and_buckets():
    x, lens = T.pad_batch([[5, 6], [7], [8, 9, 10]])
    assert x.tolist() == [[5, 6, 0], [7, 0, 0], [8, 9, 10]] and lens.tolist() == [2, 1, 3]
    with pytest.raises(ValueError, match="longer than the padded length"):
        T.pad_batch([[1, 2, 3]], 2)
    rng = np.random.default_rng(0)
    src = [rng.integers(3, 9, rng.integers(1, 12)) for _ in range(100)]
    tgt = [np.append(rng.integers(3, 9, rng.integers(1, 6)), T.EOS) for _ in range(100)]
    bb = T.BucketBatcher(src, tgt, 8, n_buckets=3, seed=0, drop_last=False)
    seen = []
    for b in bb.batches(0):
        s_len = b["src"].shape[1]
        assert s_len in bb.edges and b["tgt_out"].shape[1] == bb.tgt_len
        assert (b["src_len"] <= s_len).all() and (b["src_len"] > (bb.edges[bb.edges.index(s_len) - 1]
                                                                  if bb.edges.index(s_len) else 0)).all()
        assert (b["tgt_in"][:, 0] == T.SOS).all()
        shifted = b["tgt_out"][:, :-1].copy()
        shifted[shifted == T.EOS] = T.PAD
        np.testing.assert_array_equal(b["tgt_in"][:, 1:], shifted)
        for row, i in enumerate(b["index"]):
            np.testing.assert_array_equal(b["src"][row, :len(src[i])], src[i])
            assert (b["src"][row, len(src[i]):] == T.PAD).all()
        seen.extend(b["index"].tolist())
    assert sorted(seen) == list(range(100)) and len(bb) == len(list(bb.batches(1)))
    order0 = [b["index"][0] for b in bb.batches(0)]
    assert order0 == [b["index"][0] for b in bb.batches(0)] != [b["index"][0] for b in bb.batches(1)]
    full = T.BucketBatcher(src, tgt, 8, n_buckets=2)
    assert all(len(b["index"]) == 8 for b in full.batches(0))


# ---- the fused primitives -------------------------------------------------------------------------------------------

def test_lstm_step_fused_matches_textbook_and_gradcheck():
    rng = np.random.default_rng(0)
    b, h = 3, 4
    xw, whh = rng.standard_normal((b, 4 * h)), rng.standard_normal((h, 4 * h)) * 0.5
    s = np.concatenate([rng.standard_normal((b, 2 * h)), np.zeros((b, 4 * h))], 1)
    mask = np.array([1, 0, 1], np.uint8)
    out = S.lstm_step_fused(_f64(xw), _f64(s), _f64(whh), jn.tensor(mask)).numpy()
    z = xw + s[:, :h] @ whh
    sig = lambda v: 1 / (1 + np.exp(-v))                                  # noqa: E731
    i, f, g, o = sig(z[:, :h]), sig(z[:, h:2 * h]), np.tanh(z[:, 2 * h:3 * h]), sig(z[:, 3 * h:])
    c2 = f * s[:, h:2 * h] + i * g
    h2 = o * np.tanh(c2)
    keep = mask[:, None] == 0
    np.testing.assert_allclose(out[:, :h], np.where(keep, s[:, :h], h2), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out[:, h:2 * h], np.where(keep, s[:, h:2 * h], c2), rtol=1e-12, atol=1e-12)
    out32 = S.lstm_step_fused(jn.tensor(xw, dtype=jn.float32), jn.tensor(s, dtype=jn.float32),
                              jn.tensor(whh, dtype=jn.float32)).numpy()
    np.testing.assert_allclose(out32[:, :2 * h], np.concatenate([h2, c2], 1), rtol=1e-5, atol=1e-6)
    wts = _f64(rng.standard_normal((b, 6 * h)))
    for m in (None, jn.tensor(mask)):
        assert gradcheck(lambda xw, s, whh: S.lstm_step_fused(xw, s, whh, m) * wts, _f64(xw), _f64(s), _f64(whh))
    with pytest.raises(ValueError, match="lstm_step_fused: inconsistent shapes"):
        S.lstm_step_fused(_f64(xw), _f64(s[:, :5]), _f64(whh))


def test_vectorized_tanh_and_sigmoid_float32_accuracy():
    x = np.concatenate([np.linspace(-20, 20, 4001), np.geomspace(1e-8, 0.2, 200), -np.geomspace(1e-8, 0.2, 200),
                        [0.0, np.inf, -np.inf, np.nan]]).astype(np.float32)
    n = x.size
    # through the production kernels: th = tanh(pk + 0); the LSTM's input gate = sigmoid(xw + 0 @ W_hh)
    t = AD._tanh_impl(np.zeros((1, n), np.float32), x.reshape(1, 1, n), np.ones((1, 1), np.uint8)).reshape(-1)
    xw = np.zeros((n, 4), np.float32)
    xw[:, 0] = x
    s = AD._lstm_fwd_impl(xw, np.zeros((n, 6), np.float32), np.zeros((1, 4), np.float32))[:, 2]
    x64 = x[:-1].astype(np.float64)
    np.testing.assert_allclose(t[:-1], np.tanh(x64), rtol=2e-6, atol=1e-30)
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(s[:-1], 1 / (1 + np.exp(-x64)), rtol=2e-6, atol=1e-30)
    assert np.isnan(t[-1]) and np.isnan(s[-1])


def _attention_reference(q, pk, v, mask, vals):
    e = jn.sum(jn.tanh(pk + jn.expand_dims(q, 1)) * v, axis=-1)
    m = jn.tensor(mask.astype(bool))
    w = jn.softmax(jn.where(m, e, jn.full_like(e, -1e30)), -1)
    w = w * jn.tensor(mask.any(1, keepdims=True).astype(np.float64))        # a row with no key: zeros
    return jn.sum(jn.expand_dims(w, -1) * vals, axis=1), w


def test_additive_attention_step_forward_and_gradcheck():
    rng = np.random.default_rng(1)
    b, s, u, d = 3, 4, 5, 2
    q, pk, v, vals = (rng.standard_normal(sh) for sh in ((b, u), (b, s, u), (u,), (b, s, d)))
    mask = np.ones((b, s), np.uint8)
    mask[1, 2:] = 0
    mask[2] = 0                                                  # a row with nothing to attend to
    ctx = S.additive_attention_step(_f64(q), _f64(pk), _f64(v), jn.tensor(mask), _f64(vals))
    w = S.additive_attention_weights(_f64(q), _f64(pk), _f64(v), jn.tensor(mask), _f64(vals))
    ctx_ref, w_ref = _attention_reference(_f64(q), _f64(pk), _f64(v), mask, _f64(vals))
    np.testing.assert_allclose(ctx.numpy(), ctx_ref.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(w.numpy(), w_ref.numpy(), rtol=1e-12, atol=1e-14)
    assert (w.numpy()[1, 2:] == 0).all() and (ctx.numpy()[2] == 0).all()
    gw = _f64(rng.standard_normal((b, d)))
    assert gradcheck(lambda q, pk, v, vals: S.additive_attention_step(q, pk, v, jn.tensor(mask), vals) * gw,
                     _f64(q), _f64(pk), _f64(v), _f64(vals))
    with pytest.raises(ValueError, match="additive_attention_step: inconsistent shapes"):
        S.additive_attention_step(_f64(q), _f64(pk), _f64(v[:3]), jn.tensor(mask), _f64(vals))


def test_attention_step_equals_bahdanau_layer():
    jn.random.seed(2)
    att = nn.BahdanauAttention(4, 4, 6, dtype=jn.float64)
    q, keys = jn.random.normal((3, 4), dtype=jn.float64), jn.random.normal((3, 5, 4), dtype=jn.float64)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.uint8)
    ctx_ref, w_ref = att(q, keys, mask=jn.tensor(mask))
    pk = jn.matmul(keys, att.key_proj.W) + att.key_proj.b
    qp = jn.matmul(q, att.query_proj.W)
    ctx = S.additive_attention_step(qp, pk, jn.reshape(att.v.W, (-1,)), jn.tensor(mask), keys)
    np.testing.assert_allclose(ctx.numpy(), ctx_ref.numpy(), rtol=1e-10, atol=1e-12)


# ---- the model -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rev():
    """A tiny reversal task, its batcher (one bucket) and a small LSTM trainer (shapes shared by the tests)."""
    jn.random.seed(0)
    task = T.reverse_task(960, 64, 2, 5, alphabet="abcd", seed=0)
    src, tgt = T.encode_pairs(task.train, task.src_vocab, task.tgt_vocab)
    batcher = T.BucketBatcher(src, tgt, 32, edges=[5], seed=0)
    net = S.Seq2Seq(len(task.src_vocab), len(task.tgt_vocab), embed=8, hidden=24)
    trainer = S.Seq2SeqTrainer(net, task.src_vocab, task.tgt_vocab, lr=1e-2, max_len=6, eval_batch=64)
    return task, batcher, trainer


def _twin_trainers(task, **kw):
    """Return (jitted, eager) trainers of two fixture-shaped models with the same initial weights."""
    jn.random.seed(3)
    nets = [S.Seq2Seq(len(task.src_vocab), len(task.tgt_vocab), embed=8, hidden=24, **kw) for _ in range(2)]
    nets[1].load_state_dict({k: v.numpy().copy() for k, v in nets[0].state_dict().items()})
    return (S.Seq2SeqTrainer(nets[0], task.src_vocab, task.tgt_vocab, lr=1e-2),
            S.Seq2SeqTrainer(nets[1], task.src_vocab, task.tgt_vocab, lr=1e-2, jit=False))


@pytest.mark.slow              # compiles the whole seq2seq step, ~45 s cold
def test_jitted_step_equals_eager_step(rev):
    task, batcher, _ = rev
    tj, te = _twin_trainers(task)
    for _, b in zip(range(3), batcher.batches(5)):          # forward, masked loss, backward, clip, Adam
        lj, nj = tj.train_step(b)
        le, ne = te.train_step(b)
        np.testing.assert_allclose(lj.numpy(), le.numpy(), rtol=1e-5)
        np.testing.assert_allclose(nj.numpy(), ne.numpy(), rtol=1e-4)
        for (name, pj), pe in zip(tj.net.named_parameters(), te.net.parameters()):
            np.testing.assert_allclose(pj.numpy(), pe.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


def test_masked_loss_and_padding_invariance(rev):
    task, _, _ = rev
    _, te = _twin_trainers(task, layers=2, reverse_source=True)
    net = te.net
    src, tgt = T.encode_pairs(task.train, task.src_vocab, task.tgt_vocab)
    batch = T.make_batch(src[:6], tgt[:6], 5, 6)
    args = te.step_inputs(batch)
    loss = net.loss(*args)
    # more PAD columns (masked) change nothing
    wide = T.make_batch(src[:6], tgt[:6], 8, 6)
    np.testing.assert_allclose(net.loss(*te.step_inputs(wide)).numpy(), loss.numpy(), rtol=1e-5)
    # the loss is the masked mean of the per-token cross entropy of the logits
    logits = net(*args[:3]).numpy().astype(np.float64)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    y = batch["tgt_out"]
    m = y != T.PAD
    want = -(np.take_along_axis(lp, y[..., None], -1)[..., 0] * m).sum() / m.sum()
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_model_gradients_match_central_differences(cell):
    jn.random.seed(4)
    net = S.Seq2Seq(6, 5, embed=3, hidden=4, cell=cell, layers=2, dtype=jn.float64)
    src = jn.tensor(np.array([[3, 4, 5], [5, 3, 0]]))
    mask = jn.tensor(np.array([[1, 1, 1], [1, 1, 0]], np.uint8))
    tin = jn.tensor(np.array([[1, 3, 4], [1, 4, 0]]))
    tout = jn.tensor(np.array([[3, 4, 2], [4, 2, 0]]))
    W_q = net.attention.query_proj.W
    for name, p in (("W_q", W_q), ("dec W_hh", net.decoder_1.W_hh), ("enc W_ih", net.encoder_0.W_ih),
                    ("W_out", net.out.W), ("embedding", net.src_embed.W)):
        for q in net.parameters():
            q.grad = None
        net.loss(src, mask, tin, tout).backward()
        analytic = p.grad.numpy().copy()
        base = p.numpy().copy()
        num = np.zeros_like(base)
        for idx in [(0, 0), (1, 2), (base.shape[0] - 1, base.shape[1] - 1)]:
            for sgn in (1, -1):
                p._data = base.copy()
                p._data[idx] += sgn * 1e-6
                num[idx] += sgn * float(net.loss(src, mask, tin, tout).numpy()) / 2e-6
            p._data = base
            np.testing.assert_allclose(analytic[idx], num[idx], rtol=1e-5, atol=1e-8, err_msg=name)


def test_source_arrays_reverse_only_the_valid_part():
    net = S.Seq2Seq(8, 5, embed=2, hidden=2, reverse_source=True)
    src, mask = net.source_arrays(np.array([[3, 4, 5, 0], [6, 7, 0, 0]]), [3, 2])
    assert src.tolist() == [[5, 4, 3, 0], [7, 6, 0, 0]] and mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]


def test_compiled_step_does_not_grow_with_the_length(rev, monkeypatch):
    task, _, tr = rev
    monkeypatch.setenv("JITNET_NATIVE", "0")                 # the graph is the point: skip native compiles
    src, tgt = T.encode_pairs(task.train, task.src_vocab, task.tgt_vocab)
    short = [i for i, x in enumerate(src) if len(x) <= 3][:32]
    sizes = set()
    for length in (3, 5, 9):                  # trace and plan only (lower): the scans keep the graph fixed
        batch = T.make_batch([src[i] for i in short], [tgt[i] for i in short], length, 6)
        g, plan = tr._step.lower(*tr.step_inputs(batch))
        sizes.add((len([n for n in g.nodes if n.alive]), len(plan.steps)))
    assert len(sizes) == 1, sizes


@pytest.mark.slow
def test_learns_reversal_in_a_few_hundred_steps(rev):
    task, batcher, tr = rev
    losses = []
    for epoch in range(8):
        for b in batcher.batches(epoch):
            loss, norm = tr.train_step(b)
            losses.append(float(loss.item()))
            assert np.isfinite(float(norm.item()))
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:10])
    assert len(tr._step._cache) == 1                        # one bucket: one compiled step for every batch
    m = tr.evaluate(task.test)
    assert m["exact_match"] >= 0.9, m
    # the jitted greedy decoder (a compiled scan) agrees with the eager one (a Python loop)
    src, mask = tr._source_batch(task.test.sources[:64], 5)
    toks_j, w_j = tr._greedy(jn.tensor(src), jn.tensor(mask), 6)
    toks_e, w_e = tr.net.greedy(jn.tensor(src), jn.tensor(mask), 6)
    np.testing.assert_array_equal(toks_j.numpy(), toks_e.numpy())
    np.testing.assert_allclose(w_j.numpy(), w_e.numpy(), rtol=1e-5, atol=1e-6)


def test_greedy_is_beam_one_and_beam_matches_exhaustive_search():
    jn.random.seed(5)
    net = S.Seq2Seq(7, 5, embed=4, hidden=6)                # target vocabulary: PAD SOS EOS + 2 tokens
    for p in (net.out.W, net.out.b):
        p._data *= 6.0                                     # peaky, varied next-token distributions
    tr = S.Seq2SeqTrainer(net, None, T.CharVocab("xy"), max_len=3, jit=False)     # eager decoder steps
    rng = np.random.default_rng(0)
    src = rng.integers(3, 7, (4, 5))
    src, mask = net.source_arrays(src, [5, 3, 4, 1])
    toks = net.greedy(jn.tensor(src), jn.tensor(mask), 3)[0].numpy()
    beam1 = S.beam_search(tr, src, mask, beam_size=1, max_len=3)
    for b in range(4):
        g = list(toks[b])
        g = g[:g.index(T.EOS) + 1] if T.EOS in g else g
        assert beam1[b][0] == g
        best, score = S.exhaustive_search(net, src[b:b + 1], mask[b:b + 1], 3)
        full = S.beam_search(tr, src[b:b + 1], mask[b:b + 1], beam_size=9, max_len=3)[0]
        assert full[0] == best and full[1] == pytest.approx(score, abs=1e-4)
        narrow = S.beam_search(tr, src[b:b + 1], mask[b:b + 1], beam_size=2, max_len=3)[0]
        assert narrow[1] == pytest.approx(S.sequence_log_prob(net, src[b:b + 1], mask[b:b + 1],
                                                              [narrow[0]])[0], abs=1e-4)
        assert narrow[1] <= score + 1e-6                     # the exhaustive search is the optimum


def test_sampled_softmax_loss_under_jit_with_accidental_hits():
    jn.random.seed(6)
    W, b = jn.Parameter(jn.random.normal((10, 4))), jn.Parameter(jn.zeros(10))
    x, y = jn.random.normal((6, 4)), jn.tensor(np.array([[1], [2], [3], [1], [0], [5]]))
    sv = (jn.tensor(np.array([1, 4, 6, 9])), jn.tensor(np.full((6, 1), 0.5, np.float32)),
          jn.tensor(np.full(4, 0.5, np.float32)))                  # label 1 is also a sampled class: a hit

    def f(x, y, *sv):
        return F.sampled_softmax_loss(W, b, y, x, 4, 10, sampled_values=sv)
    eager = f(x, y, *sv).numpy()
    np.testing.assert_allclose(jn.jit(f)(x, y, *sv).numpy(), eager, rtol=1e-6)
    logits = (x.numpy() @ W.numpy().T).astype(np.float64) - np.log(0.5)
    for i, label in enumerate(y.numpy()[:, 0]):                     # TensorFlow's definition, by hand
        row = [logits[i, label]] + [logits[i, c] if c != label else -np.inf for c in (1, 4, 6, 9)]
        assert eager[i] == pytest.approx(-row[0] + np.log(np.sum(np.exp(row))), rel=1e-5)


def test_sampled_softmax_training(rev):
    task, batcher, _ = rev
    jn.random.seed(6)
    net = S.Seq2Seq(len(task.src_vocab), len(task.tgt_vocab), embed=8, hidden=24)
    tr = S.Seq2SeqTrainer(net, task.src_vocab, task.tgt_vocab, lr=1e-2, num_sampled=4, jit=False)
    before = net.out.W.numpy().copy()
    losses = [float(tr.train_step(b)[0].item()) for _, b in zip(range(12), batcher.batches(0))]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert not np.array_equal(net.out.W.numpy(), before)
    with pytest.raises(ValueError, match="num_sampled"):
        S.Seq2SeqTrainer(net, task.src_vocab, task.tgt_vocab, num_sampled=len(task.tgt_vocab))


def test_attention_maps_and_plot(tmp_path, monkeypatch, rev):
    task, _, tr = rev
    out, ws = tr.greedy_decode(task.test.sources[:3], return_weights=True)
    assert len(out) == 3 and ws[0].shape == (6, max(len(s) for s in task.test.sources[:3]))
    np.testing.assert_allclose(ws[0].sum(-1), 1.0, rtol=1e-5)
    text = CLI.ascii_attention(ws[0], list(task.test.sources[0]), list(out[0]))
    assert len(text.splitlines()) == len(out[0]) + 1
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert CLI.plot_attention(ws[0], ["a"], ["b"], str(tmp_path / "a.png")) is None


@pytest.mark.slow
def test_cli_trains_checkpoints_and_resumes(tmp_path, capsys):
    from jitnet.models import get_trainer
    argv = ["--train-size", "320", "--test-size", "16", "--min-len", "2", "--max-len", "5", "--alphabet", "abcd",
            "--hidden", "24", "--embed", "8", "--batch-size", "32", "--buckets", "1", "--epochs", "1",
            "--eval-batch", "64", "--no-progress", "--no-plot", "--beam", "0", "--samples", "2",
            "--logdir", str(tmp_path)]
    assert get_trainer("seq2seq-reverse")(argv) == 0
    out = capsys.readouterr().out
    assert "held-out exact match" in out and (tmp_path / "metrics.csv").exists()
    assert list((tmp_path / "checkpoints").glob("*.safetensors"))
    _, m = CLI.run_reverse(argv[:-6] + ["--epochs", "2", "--resume", "--no-progress", "--no-plot", "--samples", "0",
                                      "--logdir", str(tmp_path)])
    assert "resumed from" in capsys.readouterr().out and m["step"] == 20
    from jitnet.models import trainers
    assert "seq2seq-dates" in trainers()


def test_smoke_option_trains_a_tiny_model_for_two_steps(tmp_path, capsys):
    trainer, m = CLI.run_reverse(["--smoke", "--no-progress", "--no-jit", "--logdir", str(tmp_path)])
    net = trainer.net
    assert (net.hidden, net.embed_dim, m["step"], m["epochs"]) == (4, 4, 2, 1)
    assert trainer.device.type == "cpu" and (tmp_path / "checkpoints").is_dir()
    assert "8 training / 2 held-out pairs" in capsys.readouterr().out
    from jitnet.models._train import UsageError
    with pytest.raises(UsageError, match="--device tpu: .*unknown device"):    # a usage error, with the reason
        CLI.run_reverse(["--device", "tpu", "--smoke"])


def test_attention_decoder_cell_equals_bahdanau_attention_and_an_lstm_cell():
    jn.random.seed(4)
    cell = nn.AttentionDecoderCell(3, 4, 5, units=6, dtype=jn.float64)
    rng = np.random.default_rng(4)
    x, h, c, vals = (_f64(rng.standard_normal(sh)) for sh in ((2, 3), (2, 4), (2, 4), (2, 3, 5)))
    mask = np.array([[1, 1, 0], [1, 1, 1]], np.uint8)
    new, ctx = cell(x, cell.initial_state(h, c), cell.prepare(vals, jn.tensor(mask)))
    ctx_ref, _ = cell.attention(h, vals, mask=jn.tensor(mask))
    h_ref, c_ref = cell.cell(jn.concatenate([x, ctx_ref], axis=1), (h, c))
    np.testing.assert_allclose(ctx.numpy(), ctx_ref.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(new.numpy()[:, :8], np.concatenate([h_ref.numpy(), c_ref.numpy()], 1), rtol=1e-10)
    loss = jn.sum(cell(x, cell.initial_state(h, c), cell.prepare(vals, mask))[0])
    loss.backward()
    assert all(p.grad is not None and np.any(p.grad.numpy() != 0) for p in cell.parameters())
    with pytest.raises(ValueError, match="AttentionDecoderCell: x"):
        cell(x[:, :2], cell.initial_state(h, c), cell.prepare(vals, mask))
