"""The DNC: addressing equations against NumPy, the fused memory step against the composed one, gradients by
central differences (float64), the jitted step against eager, tasks and data, and the copy task learning."""
import time

import numpy as np
import pytest

import jitnet as jn
from jitnet.data import babi as BB
from jitnet.models import dnc as D
from jitnet.models import dnc_cli as DC
from jitnet.testing import gradcheck

F64 = jn.float64


def _t(a):
    return jn.tensor(np.asarray(a, np.float64))


# ----------------------------------------------------------------------------------------------------------
# NumPy references written from the paper's equations
# ----------------------------------------------------------------------------------------------------------

def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_content(mem, keys, beta, eps=D.EPS):
    """mem (N, W), keys (K, W), beta (K,) -> (K, N)."""
    out = np.zeros((keys.shape[0], mem.shape[0]))
    for k in range(keys.shape[0]):
        for n in range(mem.shape[0]):
            kn = np.sqrt(np.sum(keys[k] ** 2) + eps)
            mn = np.sqrt(np.sum(mem[n] ** 2) + eps)
            out[k, n] = beta[k] * np.dot(keys[k], mem[n]) / (kn * mn + eps)
    return _np_softmax(out)


def _np_allocation(u):
    order = sorted(range(len(u)), key=lambda n: (u[n], n))
    a, prod = np.zeros(len(u)), 1.0
    for n in order:
        a[n] = (1 - u[n]) * prod
        prod *= u[n]
    return a


def _np_link(L, w, p):
    N = len(w)
    out = np.zeros((N, N))
    for i in range(N):
        for j in range(N):
            if i != j:
                out[i, j] = (1 - w[i] - w[j]) * L[i, j] + w[i] * p[j]
    return out


def _sig(x):
    return 1 / (1 + np.exp(-x))


def _np_memory_step(st, xi, R, W):
    """One example: st = (M, u, L, p, wr, ww, r) NumPy arrays, xi raw interface -> the new state."""
    M0, u0, L0, p0, wr0, ww0, _ = st
    o = 0

    def take(k):
        nonlocal o
        o += k
        return xi[o - k:o]
    kr = take(R * W).reshape(R, W)
    br = 1 + np.log1p(np.exp(take(R)))
    kw = take(W)
    bw = 1 + np.log1p(np.exp(take(1)))
    e = _sig(take(W))
    v = take(W)
    f = _sig(take(R))
    ga = _sig(take(1))[0]
    gw = _sig(take(1))[0]
    pi = _np_softmax(take(3 * R).reshape(R, 3))
    psi = np.prod(1 - f[:, None] * wr0, axis=0)
    u = (u0 + ww0 - u0 * ww0) * psi
    ww = gw * (ga * _np_allocation(u) + (1 - ga) * _np_content(M0, kw[None], bw)[0])
    M = M0 * (1 - np.outer(ww, e)) + np.outer(ww, v)
    L = _np_link(L0, ww, p0)
    p = (1 - ww.sum()) * p0 + ww
    fwd = wr0 @ L.T
    bwd = wr0 @ L
    wr = pi[:, :1] * bwd + pi[:, 1:2] * _np_content(M, kr, br) + pi[:, 2:] * fwd
    return M, u, L, p, wr, ww, wr @ M


def _random_state(rng, B, N, W, R):
    return D.MemoryState(rng.normal(size=(B, N, W)), rng.uniform(size=(B, N)), rng.uniform(size=(B, N, N)) * 0.2,
                         rng.uniform(size=(B, N)) * 0.2, rng.dirichlet(np.ones(N), size=(B, R)),
                         rng.dirichlet(np.ones(N), size=B) * 0.5, rng.normal(size=(B, R, W)))


# ----------------------------------------------------------------------------------------------------------
# cumprod's gradient where the input has zeros (allocation takes an exclusive cumprod of usages in [0, 1])
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_cumprod_gradient_with_zeros(exclusive, reverse):
    x = np.array([[0.5, 0.0, 0.3, 0.0, 2.0], [0.0, 0.0, 1.5, 2.0, 0.0], [0.7, -1.2, 0.0, 0.4, 0.9]])
    weights = _t(np.arange(1.0, 16.0).reshape(3, 5))
    assert gradcheck(lambda a: jn.cumprod(a, axis=1, exclusive=exclusive, reverse=reverse) * weights, x)
    g = jn.grad(lambda a: jn.sum(jn.cumprod(a, axis=1, exclusive=exclusive, reverse=reverse)))(_t(x))
    assert np.isfinite(g.numpy()).all()


# ----------------------------------------------------------------------------------------------------------
# the addressing equations
# ----------------------------------------------------------------------------------------------------------

def test_allocation_paper_example_composed_and_fused():
    u = np.array([[1.0, 0.7, 0.2, 0.4]])
    want = np.array([[0.0, 0.024, 0.8, 0.12]])
    np.testing.assert_allclose(D.allocation_weights(_t(u)).numpy(), want, atol=1e-12)
    # the fused step: last step wrote nothing, free gates shut, allocation and write gates open -> w^w = a
    N, W, R = 4, 2, 1
    st = D.initial_memory_state(1, N, W, R, F64)._replace(usage=_t(u))
    xi = np.zeros((1, D.interface_size(R, W)))
    o_f = R * W + R + 3 * W + 1
    xi[0, o_f:o_f + R] = -60.0                # free gates ~ 0
    xi[0, o_f + R:o_f + R + 2] = 60.0         # allocation gate, write gate ~ 1
    out = D.unpack_state(D.dnc_memory_step(D.pack_state(st), _t(xi), N, W, R), N, W, R)
    np.testing.assert_allclose(out.usage.numpy(), u, atol=1e-12)
    np.testing.assert_allclose(out.write_weights.numpy(), want, atol=1e-12)


def test_allocation_matches_numpy_with_ties_and_gradient():
    rng = np.random.default_rng(0)
    u = np.concatenate([rng.uniform(size=(3, 6)), [[0.0, 0.5, 1.0, 0.5, 0.25, 0.0]]])
    got = D.allocation_weights(_t(u)).numpy()
    np.testing.assert_allclose(got, np.stack([_np_allocation(r) for r in u]), atol=1e-12)
    assert gradcheck(D.allocation_weights, rng.uniform(0.05, 0.95, size=(2, 5)))
    assert gradcheck(D.allocation_weights, np.array([[0.0, 0.4, 1.0, 0.7]]))      # usages 0 and 1 exactly


def test_link_update_zero_diagonal_against_numpy():
    rng = np.random.default_rng(1)
    B, N = 3, 5
    L, p = rng.uniform(size=(B, N, N)) * 0.3, rng.dirichlet(np.ones(N), size=B) * 0.8
    w = rng.dirichlet(np.ones(N), size=B) * 0.9
    got = D.update_link(_t(L), _t(w), _t(p)).numpy()
    want = np.stack([_np_link(L[b], w[b], p[b]) for b in range(B)])
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert np.all(np.diagonal(got, axis1=1, axis2=2) == 0)
    np.testing.assert_allclose(D.update_precedence(_t(p), _t(w)).numpy(),
                               (1 - w.sum(1, keepdims=True)) * p + w, atol=1e-12)
    fwd, bwd = D.directional_weights(_t(got), _t(rng.dirichlet(np.ones(N), size=(B, 2))))
    assert fwd.shape == bwd.shape == (B, 2, N)


def test_content_weights_against_numpy():
    rng = np.random.default_rng(2)
    B, N, W, K = 2, 6, 4, 3
    mem, keys, beta = rng.normal(size=(B, N, W)), rng.normal(size=(B, K, W)), 1 + rng.uniform(size=(B, K)) * 5
    mem[0, 2] = 0.0                                        # an empty row: cosine 0, not NaN
    got = D.content_weights(_t(mem), _t(keys), _t(beta)).numpy()
    want = np.stack([_np_content(mem[b], keys[b], beta[b]) for b in range(B)])
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-12)
    wts = _t(rng.normal(size=(B, K, N)))
    assert gradcheck(lambda m, k, s: D.content_weights(m, k, s) * wts, mem, keys, beta)


@pytest.mark.parametrize("fused", [False, True])
def test_memory_step_against_numpy(fused):
    rng = np.random.default_rng(3)
    B, N, W, R = 2, 5, 3, 2
    st = _random_state(rng, B, N, W, R)
    xi = rng.normal(size=(B, D.interface_size(R, W))) * 2
    tst = D.MemoryState(*[_t(a) for a in st])
    if fused:
        out = D.unpack_state(D.dnc_memory_step(D.pack_state(tst), _t(xi), N, W, R), N, W, R)
    else:
        out = D.memory_step(tst, _t(xi))
    for b in range(B):
        want = _np_memory_step([a[b] for a in st], xi[b], R, W)
        for name, g, w in zip(D.MemoryState._fields, out, want):
            np.testing.assert_allclose(g.numpy()[b], w, atol=1e-12, err_msg=name)


def test_fused_step_gradient_matches_composed_and_central_differences():
    rng = np.random.default_rng(4)
    B, N, W, R = 2, 5, 3, 2
    packed = D.pack_state(D.MemoryState(*[_t(a) for a in _random_state(rng, B, N, W, R)])).numpy()
    xi = rng.normal(size=(B, D.interface_size(R, W)))
    wts = _t(rng.normal(size=packed.shape))

    def fused(p, x):
        return D.dnc_memory_step(p, x, N, W, R) * wts

    def composed(p, x):
        return D.pack_state(D.memory_step(D.unpack_state(p, N, W, R), x)) * wts

    gf = jn.grad(lambda p, x: jn.sum(fused(p, x)), argnums=(0, 1))(_t(packed), _t(xi))
    gc = jn.grad(lambda p, x: jn.sum(composed(p, x)), argnums=(0, 1))(_t(packed), _t(xi))
    for a, b in zip(gf, gc):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-12)
    assert gradcheck(fused, packed, xi)


# ----------------------------------------------------------------------------------------------------------
# the model end to end
# ----------------------------------------------------------------------------------------------------------

def _tiny(fused=True, seed=0):
    jn.random.seed(seed)
    return D.DNC(3, 2, hidden_size=4, memory_size=4, word_size=3, num_reads=1, fused=fused, dtype=F64)


def test_dnc_end_to_end_gradcheck_tiny_memory():
    net = _tiny()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 3))
    wts = _t(rng.normal(size=(2, 3, 2)))
    assert gradcheck(lambda a: net(a) * wts, x)
    # parameter gradients against central differences, and the composed model's gradients
    xt = _t(x)
    loss = jn.sum(net(xt) * wts)
    loss.backward()
    composed = _tiny(fused=False)
    jn.sum(composed(xt) * wts).backward()
    for (name, p), q in zip(net.named_parameters(), composed.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), atol=1e-10, err_msg=name)
    for p in (net.interface.W, net.controller.W_hh):
        flat = p._data.reshape(-1)
        for i in rng.choice(flat.size, 6, replace=False):
            old = flat[i]
            vals = []
            for s in (1e-6, -1e-6):
                flat[i] = old + s
                vals.append(float(jn.sum(net(xt) * wts).item()))
            flat[i] = old
            num = (vals[0] - vals[1]) / 2e-6
            assert abs(p.grad.numpy().reshape(-1)[i] - num) < 1e-6 + 1e-5 * abs(num)


_COPY = dict(bits=3, hidden_size=16, memory_size=4, word_size=4, lr=1e-2, dtype=F64)


@pytest.mark.slow
def test_jitted_step_matches_eager_compiles_once_and_learns_copy():
    rng = np.random.default_rng(6)
    models = []
    for jit in (False, True):
        jn.random.seed(7)
        models.append(D.CopyModel(jit=jit, **_COPY))
    stats0 = jn.compiler.stats()["traces"]
    first = None
    for _ in range(3):
        batch = models[0].batch(rng, 8, 1, 2)                     # lengths vary, padded to 5 steps
        le, lj = (float(m.train_step(*batch).item()) for m in models)
        assert abs(le - lj) < 1e-10
        first = lj if first is None else first
    for p, q in zip(models[0].net.parameters(), models[1].net.parameters()):
        np.testing.assert_allclose(p.numpy(), q.numpy(), atol=1e-10)
    # the copy task learns within seconds (the compiled step, one trace for every batch)
    t0 = time.perf_counter()
    losses = [float(models[1].train_step(*models[1].batch(rng, 8, 1, 2)).item()) for _ in range(150)]
    seconds = time.perf_counter() - t0
    assert jn.compiler.stats()["traces"] - stats0 == 1
    assert np.mean(losses[-20:]) < 0.5 * first, (first, losses[-20:])
    assert seconds < 30


def test_trace_and_state_continuation():
    net = _tiny()
    x = _t(np.random.default_rng(8).normal(size=(2, 4, 3)))
    y, state, trace = net(x, return_state=True, return_trace=True)
    assert trace["usage"].shape == (4, 2, 4) and trace["read_weights"].shape == (4, 2, 1, 4)
    assert np.all(trace["usage"].numpy() >= 0) and np.all(trace["usage"].numpy() <= 1 + 1e-12)
    wr = trace["read_weights"].numpy()             # content weights sum to 1, link-following ones to at most 1
    assert np.all(wr >= 0) and np.all(wr.sum(-1) <= 1 + 1e-12)
    y1, s1 = net(x[:, :2], return_state=True)
    y2 = net(x[:, 2:], state=s1)
    np.testing.assert_allclose(np.concatenate([y1.numpy(), y2.numpy()], 1), y.numpy(), atol=1e-12)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"dnc_memory_step: .*4x3 memory with 1 read heads.*\(batch, 47\).*\(batch, 20\)"):
        D.dnc_memory_step(_t(np.zeros((2, 5))), _t(np.zeros((2, 15))), 4, 3, 1)
    with pytest.raises(TypeError, match="share a float dtype"):
        D.dnc_memory_step(_t(np.zeros((2, D.packed_size(4, 3, 1)))),
                          jn.zeros((2, D.interface_size(1, 3)), dtype=jn.float32), 4, 3, 1)
    with pytest.raises(ValueError, match=r"split_interface: expected an interface of shape \(batch, 20\)"):
        D.split_interface(_t(np.zeros((2, 19))), 1, 3)
    with pytest.raises(ValueError, match=r"DNC: expected input of shape \(batch, time, 3\), got \(2, 4\)"):
        _tiny()(_t(np.zeros((2, 4))))
    with pytest.raises(ValueError, match="min_len"):
        D.copy_batch(np.random.default_rng(0), 2, 3, 2, 4)
    assert D.interface_size(4, 16) == 4 * 16 + 3 * 16 + 5 * 4 + 3
    p = _t(np.full((1, D.packed_size(4, 3, 1)), 0.1))
    g = jn.grad(lambda x: jn.sum(D.dnc_memory_step(p, x, 4, 3, 1) ** 2))
    with pytest.raises(TypeError, match="first-order gradients only"):
        jn.grad(lambda x: jn.sum(g(x) ** 2))(_t(np.ones((1, D.interface_size(1, 3)))))


def test_copy_and_repeat_copy_batches():
    rng = np.random.default_rng(9)
    x, y, mask = D.copy_batch(rng, 6, 1, 4, 5)
    assert x.shape == (6, 9, 6) and y.shape == (6, 9, 5) and mask.shape == (6, 9)
    for b in range(6):
        L = int(np.argmax(x[b, :, 5]))                         # the delimiter step
        assert 1 <= L <= 4 and x[b, :, 5].sum() == 1 and mask[b].sum() == L
        np.testing.assert_array_equal(y[b, L + 1:2 * L + 1], x[b, :L, :5])
        assert not x[b, L:, :5].any() and not y[b, mask[b] == 0].any()
    x, y, mask = D.repeat_copy_batch(rng, 5, 1, 3, 4, 1, 3)
    assert x.shape == (5, 14, 6) and y.shape == (5, 14, 5)
    for b in range(5):
        L = int(np.argmax(x[b, :, 4]))
        n = int(round(x[b, L, 5] * 3))
        np.testing.assert_array_equal(y[b, L + 1:L + 1 + n * L, :4], np.tile(x[b, :L, :4], (n, 1)))
        assert y[b, L + 1 + n * L, 4] == 1 and mask[b].sum() == n * L + 1
    logits = np.where(y > 0.5, 3.0, -3.0)
    logits[0, np.nonzero(mask[0])[0][0], 0] *= -1               # one wrong bit
    assert D.bit_errors(logits, y, mask) == (1, int(mask.sum()) * 5)


def test_babi_sequences_from_generated_and_file_stories(tmp_path):
    stories = BB.generated_babi_stories(4, seed=2)
    vocab = BB.BabiVocab.build(stories)
    assert vocab.words[0] == BB.PAD and BB.ANSWER in vocab
    toks, answers = BB.story_tokens(stories[0])
    assert toks.count(BB.ANSWER) == len(answers) == len(stories[0])
    assert [q.answer for q in stories[0]] == answers
    # the slot follows its question, and every sentence of the context comes before it, in order
    first_slot = toks.index(BB.ANSWER)
    assert toks[first_slot - 1] == "?" and toks[:first_slot].count(".") == len(stories[0][0].context)
    data = BB.encode_stories(stories, vocab)
    x, y, mask = next(BB.babi_batches(data, vocab, 3, shuffle=False))
    T = BB.pad_length(data)
    assert x.shape == (3, T, len(vocab)) and T % 8 == 0
    np.testing.assert_array_equal(x[0].argmax(-1)[:len(toks)], vocab.encode(toks))
    assert vocab.decode(y[0][mask[0] > 0]) == answers
    # the file reader: the real format, a multi-word answer gets one slot per word
    p = tmp_path / "qa8_lists-sets_train.txt"
    p.write_text("1 Mary took the apple.\n2 Mary got the football there.\n3 What is Mary carrying?\tapple,football\t1 2\n")
    (story,) = BB.babi_stories(path=str(p))
    toks, answers = BB.story_tokens(story)
    assert answers == ["apple", "football"] and toks[-3:] == ["?", "-", "-"]
    assert BB.babi_stories(task=1, path=str(tmp_path / "missing")) is None
    with pytest.raises(KeyError, match="not in the vocabulary"):
        vocab.encode(["zebra"])


def test_babi_model_step_and_evaluation():
    stories = BB.generated_babi_stories(4, seed=3, questions_per_story=2)
    vocab = BB.BabiVocab.build(stories)
    data = BB.encode_stories(stories, vocab)
    jn.random.seed(0)
    m = D.BabiModel(len(vocab), hidden_size=8, memory_size=4, word_size=4, num_reads=1, jit=False, dtype=F64)
    x, y, mask = next(BB.babi_batches(data, vocab, 4, shuffle=False))
    loss = float(m.train_step(x, y, mask).item())
    assert np.isfinite(loss) and abs(loss - np.log(len(vocab))) < 1.0
    ev = m.evaluate(BB.babi_batches(data, vocab, 4, shuffle=False))
    assert ev["answers"] == 8 and 0.0 <= ev["answer_accuracy"] <= 1.0


def test_training_commands_are_registered():
    from jitnet.models import get_trainer
    assert get_trainer("dnc-copy") is DC.train_dnc_copy and get_trainer("dnc-babi") is DC.train_dnc_babi
    args = DC.copy_parser().parse_args(["--max-len", "5", "--repeat-copy"])
    assert args.max_len == 5 and args.repeat_copy and args.hidden == 64


def test_plot_memory_writes_a_file(tmp_path):
    net = _tiny()
    _, trace = net(_t(np.ones((1, 3, 3))), return_trace=True)
    path = DC.plot_memory(trace, str(tmp_path / "m.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
