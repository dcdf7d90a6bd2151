"""Skip-gram word2vec on CUDA: the negative-sampling SGD kernel (kernels_skipgram_gpu) against its CPU form
(kernels_skipgram.sg_ns_train_chunk), ``SkipGram.train_fast`` on the GPU, and ``train skipgram --device cuda``
(the model path: first losses equal to the CPU run's, no transfer inside a step). Tiny shapes: the simulator
runs every GPU thread as Python.

The CPU kernel is Hogwild (threads race on shared rows without locks), so the kernels are compared where the
result does not depend on the schedule: with one part (one thread each side: the same serial walk), and with
several parts whose sentences use disjoint words and draw no noise words (negative 0, constant learning rate),
so that no two parts touch the same row. The CUDA kernel is the CPU kernel's Python bodies compiled for the
device, and it launches on jitnet's current stream."""
import numpy as np
import pytest

import jitnet as jn
from jitnet import cuda as jcuda
from jitnet import cuda_runtime as R
from jitnet import kernels_skipgram as K
from jitnet.data import word2vec as W
from jitnet.models import skipgram as S
from jitnet.models import skipgram_cli as CLI

V, D = 12, 4


def _setup(seed, n_sent, length, vocab_of_sentence=None):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 50, V)
    if vocab_of_sentence is None:
        ids = rng.integers(0, V, n_sent * length).astype(np.int32)
    else:
        ids = np.concatenate([rng.choice(vocab_of_sentence(s), length) for s in range(n_sent)]).astype(np.int32)
    bounds = np.arange(0, n_sent * length + 1, length, dtype=np.int64)
    cum = W.unigram_table(counts)
    guide = W.noise_guide(cum)
    w_in = (rng.random((V, D), dtype=np.float32) - 0.5)
    w_out = (rng.random((V, D), dtype=np.float32) - 0.5) * 0.5
    return ids, bounds, cum, guide, counts, w_in, w_out


def _both(ids, bounds, cum, guide, sample_int, w_in, w_out, window, negative, alpha0, alpha1, nparts, stream=None):
    """Run both kernels from the same start; return (CPU results, GPU results, the launch counters right after the
    GPU launch, made inside ``jn.cuda.stream(stream)``)."""
    from jitnet import kernels_skipgram_gpu as G
    states = np.arange(nparts, dtype=np.uint64) * np.uint64(7919) + np.uint64(3)
    total = int(bounds[-1])
    a_in, a_out, a_st = w_in.copy(), w_out.copy(), states.copy()
    kept_cpu = K.sg_ns_train_chunk(ids, bounds, 0, len(bounds) - 1, a_in, a_out, cum, guide, sample_int, window,
                                   negative, alpha0, alpha1, 0, total, a_st)
    d = jcuda.to_device
    g_in, g_out, g_st = d(w_in), d(w_out), d(states)
    kept, done = d(np.zeros(nparts, np.int64)), d(np.zeros(1, np.int64))
    maxlen = int(np.diff(bounds).max())
    buf, work = jcuda.empty((nparts, maxlen), np.int32), jcuda.empty((nparts, D), np.float32)
    args = (d(ids), d(bounds), 0, len(bounds) - 1, g_in, g_out, d(cum), d(guide), d(sample_int), window, negative,
            alpha0, alpha1, 0, total, g_st, kept, done, buf, work)
    R.reset_launch_stats()
    with jn.cuda.stream(stream):
        G.train_chunk(*args)
    stats = R.launch_stats()
    h = jcuda.to_host
    return (a_in, a_out, a_st, kept_cpu), (h(g_in), h(g_out), h(g_st), int(h(kept).sum())), stats


def test_one_part_equals_the_cpu_kernel_with_subsampling_and_noise_words():
    ids, bounds, cum, guide, counts, w_in, w_out = _setup(0, 3, 6)
    sample_int = W.sample_ints(W.keep_probabilities(counts, 0.05))
    (c_in, c_out, c_st, c_kept), (g_in, g_out, g_st, g_kept), _ = _both(
        ids, bounds, cum, guide, sample_int, w_in, w_out, 2, 2, 0.1, 0.01, 1)
    assert 0 < c_kept < len(ids) and g_kept == c_kept               # the same words subsampled away
    assert np.array_equal(g_st, c_st)                               # the same draws from the generator
    assert not np.allclose(c_in, w_in) and not np.allclose(c_out, w_out)
    np.testing.assert_allclose(g_in, c_in, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_out, c_out, rtol=1e-5, atol=1e-6)


def test_parts_on_disjoint_rows_equal_the_cpu_kernel():
    # sentence s uses words of group s % 2 only, parts get one sentence each: no row is shared between parts
    ids, bounds, cum, guide, counts, w_in, w_out = _setup(1, 2, 5, lambda s: np.arange(s % 2, V, 2))
    sample_int = W.sample_ints(np.ones(V))
    (c_in, c_out, _, c_kept), (g_in, g_out, _, g_kept), _ = _both(
        ids, bounds, cum, guide, sample_int, w_in, w_out, 2, 0, 0.2, 0.2, 2)
    assert g_kept == c_kept == len(ids)
    assert not np.allclose(c_in, w_in)
    np.testing.assert_allclose(g_in, c_in, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_out, c_out, rtol=1e-5, atol=1e-6)


def test_launches_go_to_the_current_stream():
    ids, bounds, cum, guide, counts, w_in, w_out = _setup(2, 2, 6)
    sample_int = W.sample_ints(W.keep_probabilities(counts, 0.05))
    s = jn.cuda.Stream()
    (c_in, c_out, c_st, c_kept), (g_in, g_out, g_st, g_kept), stats = _both(
        ids, bounds, cum, guide, sample_int, w_in, w_out, 2, 2, 0.1, 0.01, 1, stream=s)
    # the arrays were copied on the default stream; both launches (zeroing the counter, training) go to s
    assert stats["stream_switches"] == 1
    assert g_kept == c_kept and np.array_equal(g_st, c_st)
    np.testing.assert_allclose(g_in, c_in, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_out, c_out, rtol=1e-5, atol=1e-6)


def test_device_functions_are_the_cpu_kernels_bodies():
    from jitnet import kernels_skipgram_gpu as G
    for gpu, cpu in ((G._pair, K._sg_ns_pair), (G._walk, K._sg_ns_walk), (G._part, K._sg_ns_part),
                     (G._draw, K._draw)):
        assert gpu.py_func.__code__ is cpu.py_func.__code__, cpu.py_func.__name__


def test_scratch_of_the_wrong_size_is_refused():
    from jitnet import kernels_skipgram_gpu as G
    d = jcuda.to_device
    z = d(np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="parts"):
        G.train_chunk(z, z, 0, 0, jcuda.empty((3, D), np.float32), jcuda.empty((3, D), np.float32), z, z, z, 1, 1,
                      0.1, 0.1, 0, 1, d(np.ones(2, np.uint64)), d(np.zeros(2, np.int64)), z,
                      jcuda.empty((3, 2), np.int32), jcuda.empty((2, D), np.float32))


def _corpus():
    rng = np.random.default_rng(3)
    a, b = [f"a{i}" for i in range(4)], [f"b{i}" for i in range(4)]
    sents = [list(rng.choice(a if k % 2 else b, 5)) for k in range(4)]
    vocab = W.Vocab.build(sents, min_count=1)
    ids, bounds, raw = W.encode_sentences(vocab, sents)
    return vocab, ids, bounds, raw


def test_train_fast_on_cuda_with_one_part_equals_the_cpu():
    vocab, ids, bounds, raw = _corpus()
    cpu = S.SkipGram(vocab, dim=D, seed=0)
    gpu = S.SkipGram(vocab, dim=D, seed=0).to("cuda")
    assert gpu.embeddings.is_cuda
    kw = dict(epochs=1, window=2, negative=1, sample=0, alpha=0.1, threads=1)
    st_c = cpu.train_fast(ids, bounds, raw, **kw)
    jcuda.reset_transfer_stats()
    st_g = gpu.train_fast(ids, bounds, raw, **kw)
    t = jcuda.transfer_stats()
    assert t["d2h"] == 1                                   # the kept-word count, read once after training
    assert st_g["effective_words"] == st_c["effective_words"] == raw
    np.testing.assert_allclose(gpu.vectors, cpu.vectors, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gpu.out_weights.numpy(), cpu.out_weights.numpy(), rtol=1e-5, atol=1e-6)


def _model_losses(dev, loss, jit, vocab, ids, bounds):
    jn.random.seed(0)
    sg = S.SkipGram(vocab, dim=D, seed=0, init="tf")
    m = S.SkipGramModel(sg, loss=loss, num_sampled=3, negative=2, lr=0.5, jit=jit).to(dev)
    inner, seen = m._step, []

    def step(*batch):
        assert all(t.device == jn.device(dev) for t in batch)
        jcuda.reset_transfer_stats()
        out = inner(*batch)
        seen.append(jcuda.transfer_stats())
        return out
    m._step = step
    losses = S.train_model(m, ids, epochs=1, batch_size=2, window=2, sample=0, seed=0, max_steps=2, bounds=bounds)
    return losses, seen, sg


@pytest.mark.parametrize("loss,jit", [("nce", True), ("neg", False)], ids=["nce-jit", "neg-eager"])
def test_model_path_on_cuda_first_losses_equal_the_cpu_without_transfers_in_a_step(loss, jit):
    vocab, ids, bounds, _ = _corpus()
    cpu, _, sg_c = _model_losses("cpu", loss, jit, vocab, ids, bounds)
    gpu, seen, sg_g = _model_losses("cuda", loss, jit, vocab, ids, bounds)
    assert len(cpu) == len(gpu) == 2 and cpu[0] != cpu[-1]
    np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-6)
    assert all(t["h2d"] == 0 and t["d2h"] == 0 for t in seen), seen
    assert sg_g.embeddings.is_cuda
    np.testing.assert_allclose(sg_g.vectors, sg_c.vectors, rtol=1e-5, atol=1e-6)


def _cli(tmp_path, name, *extra):
    out = tmp_path / name
    assert CLI.train_skipgram(["--smoke", "--no-progress", "--logdir", str(out), *extra]) == 0
    return np.loadtxt(out / "vectors.txt", skiprows=1, usecols=range(1, 9), dtype=np.float64)


def test_command_fast_path_on_cuda_equals_the_cpu_with_one_part(tmp_path):
    cpu = _cli(tmp_path, "cpu", "--threads", "1")
    gpu = _cli(tmp_path, "gpu", "--threads", "1", "--device", "cuda")
    assert cpu.shape == (12, 8) and np.abs(cpu).max() > 0
    np.testing.assert_allclose(gpu, cpu, atol=3e-6)


def test_command_model_path_on_cuda_first_losses_equal_the_cpu(tmp_path, capsys):
    cpu = _cli(tmp_path, "cpu", "--model")
    out_cpu = capsys.readouterr().out
    gpu = _cli(tmp_path, "gpu", "--model", "--device", "cuda")
    out_gpu = capsys.readouterr().out
    line = [ln for ln in out_cpu.splitlines() if " steps in " in ln][0]
    assert "2 steps" in line and line.split(", ", 1)[1] in out_gpu        # "loss a -> b", both runs
    np.testing.assert_allclose(gpu, cpu, atol=3e-6)
