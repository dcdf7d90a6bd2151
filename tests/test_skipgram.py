"""Skip-gram word2vec: vocabulary, subsampling, pairs, noise table, fast kernel, NCE path, queries, files."""
from __future__ import annotations

import math

import numpy as np
import pytest

import jitnet as jn
from jitnet import kernels_skipgram as K
from jitnet.data import word2vec as W
from jitnet.data import word_eval as E
from jitnet.models import skipgram as S
from jitnet.models import skipgram_cli as CLI


# ---- vocabulary ----------------------------------------------------------------------------------------------

def test_vocab_min_count_and_unk():
    toks = "a b a c a b d e a".split()
    v = W.Vocab.build(toks, min_count=2, unk="UNK")
    assert v.words == ["UNK", "a", "b"]
    assert list(v.counts) == [3, 4, 2]                  # c, d, e are UNK
    assert list(v.encode(["a", "zzz", "b", "c"])) == [1, 0, 2, 0]
    assert v.decode([1, 2]) == ["a", "b"]


def test_vocab_top_v_and_drop_unknown():
    toks = "a b a c a b d e a c c".split()
    v = W.Vocab.build(toks, min_count=1, max_size=3, unk="UNK")
    assert v.words == ["UNK", "a", "c"]                  # top 2 (ties by first appearance) + UNK
    assert v.counts.sum() == len(toks)
    w = W.Vocab.build(toks, min_count=2)
    assert "UNK" not in w and w.words == ["a", "c", "b"]
    assert list(w.encode("a d b e c".split())) == [0, 2, 1]


# ---- subsampling ---------------------------------------------------------------------------------------------

def test_keep_probabilities_formula():
    counts = np.array([1000, 10, 1])
    p = W.keep_probabilities(counts, 1e-3)
    t = 1e-3 * 1011
    assert p[0] == pytest.approx((math.sqrt(1000 / t) + 1) * t / 1000)
    assert p[1] == pytest.approx((math.sqrt(10 / t) + 1) * t / 10)
    assert p[2] == 1.0                                   # capped
    assert np.all(W.keep_probabilities(counts, 0) == 1.0)


def test_subsample_rate_matches_probability():
    keep = np.array([0.25, 1.0])
    ids = np.repeat([0, 1], 20000)
    out = W.subsample(ids, keep, rng=0)
    assert (out == 1).sum() == 20000
    assert abs((out == 0).sum() / 20000 - 0.25) < 0.02


# ---- pairs ---------------------------------------------------------------------------------------------------

def test_generate_batch_hand_computed():
    data = np.arange(10)
    batch, labels, idx = W.generate_batch(data, 8, 2, 1, 0, rng=0)
    assert list(batch) == [1, 1, 2, 2, 3, 3, 4, 4]
    for i in range(4):
        assert set(labels[2 * i:2 * i + 2, 0]) == {batch[2 * i] - 1, batch[2 * i] + 1}
    assert idx == 4                                      # the next batch centers on data[5]
    batch2, labels2, _ = W.generate_batch(data, 4, 2, 1, idx, rng=0)
    assert list(batch2) == [5, 5, 6, 6]


def test_generate_batch_num_skips_one_and_wraparound():
    data = np.arange(5)
    batch, labels, idx = W.generate_batch(data, 6, 1, 2, 3, rng=1)
    # span 5 starting at 3 wraps: buffer 3 4 0 1 2 -> centers 0, 1, 2, 3, 4, 0
    assert list(batch) == [0, 1, 2, 3, 4, 0]
    for c, l in zip(batch, labels[:, 0]):
        ring = {(c + d) % 5 for d in (-2, -1, 1, 2)}
        assert l in ring
    with pytest.raises(ValueError):
        W.generate_batch(data, 6, 4, 1)


def test_skipgram_pairs_fixed_and_dynamic_window():
    c, x = W.skipgram_pairs([10, 11, 12], 1, dynamic=False)
    assert sorted(zip(c.tolist(), x.tolist())) == [(10, 11), (11, 10), (11, 12), (12, 11)]
    c, x = W.skipgram_pairs([1, 2, 3, 4], 2, dynamic=False, bounds=[0, 2, 4])
    assert sorted(zip(c.tolist(), x.tolist())) == [(1, 2), (2, 1), (3, 4), (4, 3)]
    ids = np.arange(200)
    c, x = W.skipgram_pairs(ids, 3, dynamic=True, rng=0)
    assert np.all(np.abs(c - x) <= 3) and np.all(c != x)
    assert np.any(np.abs(c - x) == 3) and np.any(np.abs(c - x) == 1)
    full = len(W.skipgram_pairs(ids, 3, dynamic=False)[0])
    assert len(c) < full                                 # shrunk windows drop some pairs


# ---- noise distribution --------------------------------------------------------------------------------------

def test_unigram_table_power():
    t = W.unigram_table([16, 1, 81], power=0.75, domain=1000)
    f = np.array([8.0, 1.0, 27.0])
    assert list(t) == list(np.round(np.cumsum(f) / f.sum() * 1000).astype(int))
    draws = W.sample_negatives(t, 60000, rng=0)
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, f / f.sum(), atol=0.01)


def test_noise_guide_draws_match_searchsorted():
    cum = W.unigram_table(np.random.default_rng(0).integers(1, 5000, 300))
    guide = W.noise_guide(cum)
    v = np.random.default_rng(1).integers(0, cum[-1], 5000)
    v = np.concatenate([v, cum[:-1], cum[:-1] - 1, [0, cum[-1] - 1]])
    got = np.array([K.draw(cum, guide, int(x)) for x in v])
    assert np.array_equal(got, np.searchsorted(cum, v, side="right"))


# ---- fast kernel ---------------------------------------------------------------------------------------------

def _two_topic_corpus(rng, n_sent=600, length=12):
    a = [f"a{i}" for i in range(8)]
    b = [f"b{i}" for i in range(8)]
    return [list(rng.choice(a if k % 2 else b, length)) for k in range(n_sent)], a, b


def test_fast_kernel_moves_cooccurring_words_closer():
    sents, a, b = _two_topic_corpus(np.random.default_rng(0))
    v = W.Vocab.build(sents, min_count=1)
    ids, bounds, raw = W.encode_sentences(v, sents)
    assert raw == 600 * 12 and bounds[-1] == raw
    sg = S.SkipGram(v, dim=16, seed=0)

    def gap():
        e = sg.normalized()
        ia = [v.index[w] for w in a]
        ib = [v.index[w] for w in b]
        within = (e[ia] @ e[ia].T).mean() + (e[ib] @ e[ib].T).mean()
        across = (e[ia] @ e[ib].T).mean()
        return within / 2 - across
    before = gap()
    st = sg.train_fast(ids, bounds, raw, epochs=5, window=3, negative=3, sample=0, threads=2, alpha=0.05)
    assert st["words"] == 5 * raw and st["effective_words"] == 5 * raw     # sample=0 keeps every word
    assert gap() > before + 0.3
    assert sg.nearest("a0", 3)[0][0].startswith("a")


def test_fast_kernel_one_part_is_the_serial_walk():
    # the chunk kernel with one generator state walks its sentences as sg_ns_sentences does, to the bit
    rng = np.random.default_rng(4)
    counts = rng.integers(1, 40, 15)
    bounds = np.array([0, 7, 9, 20, 26], np.int64)
    ids = rng.integers(0, 15, bounds[-1]).astype(np.int32)
    cum = W.unigram_table(counts)
    guide = W.noise_guide(cum)
    sample_int = W.sample_ints(W.keep_probabilities(counts, 0.005))
    w_in = (rng.random((15, 6), dtype=np.float32) - 0.5)
    w_out = (rng.random((15, 6), dtype=np.float32) - 0.5)
    a_in, a_out, states = w_in.copy(), w_out.copy(), np.array([11], np.uint64)
    kept = K.sg_ns_train_chunk(ids, bounds, 1, 4, a_in, a_out, cum, guide, sample_int, 2, 3, 0.1, 0.01, 5, 60, states)
    b_in, b_out, done = w_in.copy(), w_out.copy(), np.zeros(1, np.int64)
    r, k = K.sg_ns_sentences(ids, bounds, 1, 4, b_in, b_out, cum, guide, sample_int, 2, 3, 0.1, 0.01, 5, 60, done,
                             np.uint64(11))
    assert 0 < kept < bounds[4] - bounds[1] and k == kept and states[0] == r
    assert done[0] == bounds[4] - bounds[1]                 # the shared counter: every word of the walk
    assert not np.array_equal(a_in, w_in) and np.array_equal(a_in, b_in) and np.array_equal(a_out, b_out)
    outside = np.setdiff1d(np.arange(15), ids[bounds[1]:bounds[4]])     # words of none of the walked sentences
    assert outside.size and np.array_equal(a_in[outside], w_in[outside])


# ---- model path ----------------------------------------------------------------------------------------------

def test_nce_model_loss_decreases():
    jn.random.seed(0)
    sents, _, _ = _two_topic_corpus(np.random.default_rng(1), n_sent=100)
    v = W.Vocab.build(sents, min_count=1)
    ids, bounds, _ = W.encode_sentences(v, sents)
    sg = S.SkipGram(v, dim=8, seed=0, init="tf")
    m = S.SkipGramModel(sg, loss="nce", num_sampled=4, lr=0.5, jit=False)
    losses = S.train_model(m, ids, epochs=1, batch_size=32, window=2, sample=0, seed=0, max_steps=60)
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_negative_sampling_model_loss_decreases():
    sents, _, _ = _two_topic_corpus(np.random.default_rng(2), n_sent=100)
    v = W.Vocab.build(sents, min_count=1)
    ids, _, _ = W.encode_sentences(v, sents)
    sg = S.SkipGram(v, dim=8, seed=0, init="tf")
    m = S.SkipGramModel(sg, loss="neg", negative=3, lr=0.2, jit=False)
    losses = S.train_model(m, ids, epochs=1, batch_size=64, window=2, sample=0, seed=0, max_steps=40)
    assert np.mean(losses[-8:]) < np.mean(losses[:8])


# ---- queries and evaluation files ----------------------------------------------------------------------------

def _handcrafted():
    words = ["man", "woman", "king", "queen", "apple"]
    v = W.Vocab(words, [5, 4, 3, 2, 1])
    sg = S.SkipGram(v, dim=4)
    sg.embeddings.numpy()[:] = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0],
                                         [0, 0, 0, 1]], np.float32)
    sg._normed = None
    return sg


def test_nearest_and_analogy():
    sg = _handcrafted()
    near = sg.nearest("king", 2)
    assert {w for w, _ in near} == {"man", "queen"}
    assert near[0][1] == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert sg.nearest("apple", 1)[0][1] == pytest.approx(0.0, abs=1e-6)
    assert sg.analogy("man", "king", "woman")[0][0] == "queen"
    assert sg.analogy("king", "man", "queen")[0][0] == "woman"
    with pytest.raises(KeyError):
        sg.nearest("pear")


def test_similarity_file_parser_and_spearman(tmp_path):
    p = tmp_path / "sim.tsv"
    p.write_text("# comment\n# Word 1\tWord 2\tHuman (mean)\nKing\tqueen\t9.0\nking\tman\t8.5\n"
                 "man\tapple\t0.5\nman\tpear\t3.0\n")
    pairs = E.read_similarity_file(str(p))
    assert pairs == [("King", "queen", 9.0), ("king", "man", 8.5), ("man", "apple", 0.5), ("man", "pear", 3.0)]
    r = _handcrafted().evaluate_similarity(str(p))
    assert r["covered"] == 3 and r["pairs"] == 4 and r["coverage"] == 0.75
    assert r["spearman"] == pytest.approx(0.5)          # cosines 0.5, 0.71, 0: ranks 2 3 1 vs 3 2 1
    assert E.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert E.spearman([1, 2, 2, 3], [3, 2, 2, 1]) == pytest.approx(-1.0)


def test_analogy_file_parser_and_accuracy(tmp_path):
    p = tmp_path / "q.txt"
    p.write_text(": royalty\nman king woman queen\nMan King Woman Queen\n: family\nman woman king pear\n"
                 "king man queen apple\n")
    qs = E.read_analogy_file(str(p))
    assert qs[0] == ("royalty", "man", "king", "woman", "queen") and len(qs) == 4 and qs[2][0] == "family"
    r = _handcrafted().evaluate_analogies(str(p))
    assert r["questions"] == 4 and r["covered"] == 3 and r["coverage"] == 0.75
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert r["sections"] == {"royalty": 1.0, "family": 0.0}


def test_pca_2d_and_cli_registry():
    x = np.random.default_rng(0).normal(size=(50, 6)) * np.array([10, 5, 1, 1, 1, 1])
    xy = CLI.pca_2d(x)
    assert xy.shape == (50, 2) and xy[:, 0].var() > xy[:, 1].var() > 0
    from jitnet.models import get_trainer
    assert get_trainer("skipgram") is CLI.train_skipgram


@pytest.mark.parametrize("init,bound", [("word2vec", 0.5), ("gensim", 1.0)])
def test_embedding_initialisations(init, bound):
    v = W.Vocab([f"w{i}" for i in range(400)], np.ones(400, np.int64))
    sg = S.SkipGram(v, dim=10, seed=3, init=init)
    w = sg.vectors
    assert np.abs(w).max() <= bound / 10 and np.abs(w).max() > 0.9 * bound / 10     # uniform(-b/D, b/D)
    assert not sg.out_weights.numpy().any()


def test_command_smoke_and_device_option(tmp_path, capsys):
    from jitnet.models._train import UsageError
    assert CLI.train_skipgram(["--smoke", "--no-progress", "--threads", "1", "--logdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "smoke" in out and "128 words" in out and "(128 after subsampling)" in out
    vec = (tmp_path / "vectors.txt").read_text().splitlines()
    assert vec[0] == "12 8" and len(vec) == 13
    with pytest.raises(UsageError, match="--device"):
        CLI.train_skipgram(["--smoke", "--device", "tpu", "--logdir", str(tmp_path)])
