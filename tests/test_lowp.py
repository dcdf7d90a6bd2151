"""float16 / bfloat16 storage: dtypes, conversion kernels, the float32 compute rule on every primitive, jit,
optimizers and safetensors files read and written by the ``safetensors`` package (NumPy and PyTorch).

The primitive sweep does not hand-write a case per row: it runs small float32 workloads (ops, layers, losses,
optimizers, models) while recording the first call of every primitive, replays each recorded call with its
float inputs rounded to float16/bfloat16, and checks the result against the float32 result rounded to the
storage type. Rows that no workload reaches must be listed in ``EXEMPT`` with a reason, so a new primitive
without a workload fails ``test_every_primitive_is_swept``.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import jitnet as jn
import jitnet.nn.functional as F
from jitnet import lowp
from jitnet.autodiff import core as ad
from jitnet.autodiff.core import REGISTRY, apply

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
LOWP = [pytest.param(F16, id="float16"), pytest.param(BF16, id="bfloat16")]


def _rng(seed=0):
    return np.random.default_rng(seed)


# ==============================================================================================================
# dtypes and conversions
# ==============================================================================================================

def test_dtypes_are_real_and_compare_equal():
    assert jn.float16 == F16 and jn.bfloat16 == BF16 and BF16 == jn.bfloat16
    assert np.dtype(jn.bfloat16) == BF16 and np.zeros(2, jn.bfloat16).dtype == BF16
    t = jn.tensor([1.0, 2.5], dtype=jn.bfloat16)
    assert t.dtype == jn.bfloat16 and t.numpy().dtype == BF16
    assert jn.tensor([1.0], dtype="bfloat16").dtype == BF16
    assert jn.tensor(np.ones(2, BF16)).dtype == BF16                # a bfloat16 array keeps its dtype
    assert jn.zeros((2, 3), dtype=jn.float16).dtype == F16
    assert jn.ones(3, dtype=jn.bfloat16).numpy().astype(np.float32).tolist() == [1.0, 1.0, 1.0]
    assert t.half().dtype == F16 and t.float().dtype == np.float32 and t.float().bfloat16().dtype == BF16
    assert t.requires_grad_().requires_grad                          # bfloat16 (NumPy kind 'V') is floating
    with pytest.raises(TypeError, match="unsupported dtype float8_e4m3fn"):
        jn.tensor([1.0], dtype=ml_dtypes.float8_e4m3fn)


_NO_ML_DTYPES = """
import sys
import jitnet as jn
assert "ml_dtypes" not in sys.modules                  # importing jitnet does not load it
x = jn.tensor([1.0], dtype=jn.float16) + 1             # neither does float16
assert "ml_dtypes" not in sys.modules and x.dtype == jn.float16
print(repr(jn.bfloat16))
sys.modules["ml_dtypes"] = None                        # now as if it were not installed
for use in (lambda: jn.tensor([1.0], dtype=jn.bfloat16), lambda: jn.load(sys.argv[1])):
    try:
        use()
    except ImportError as e:
        print(e)
"""


def test_without_ml_dtypes_bfloat16_exists_and_errors_name_the_extra(tmp_path):
    path = tmp_path / "bf16.safetensors"
    jn.save({"w": jn.tensor([1.0, 2.0], dtype=jn.bfloat16)}, path)
    out = subprocess.run([sys.executable, "-c", _NO_ML_DTYPES, str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "jitnet.bfloat16" and len(lines) == 3
    assert all("ml_dtypes" in ln and 'pip install "jitnet[interop]"' in ln for ln in lines[1:])
    assert "tensor 'w' is BF16" in lines[2]


@pytest.mark.parametrize("dt", LOWP)
def test_conversions_are_exact_and_round_to_nearest_even(dt):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dt)        # every 16-bit pattern
    ref = bits.astype(np.float32)
    nan = np.isnan(ref)
    wide = lowp.convert(bits, np.float32)
    assert wide.dtype == np.float32
    assert np.array_equal(wide.view(np.uint32)[~nan], ref.view(np.uint32)[~nan]) and np.isnan(wide[nan]).all()
    back = lowp.convert(wide, dt)
    assert np.array_equal(back.view(np.uint16)[~nan], bits.view(np.uint16)[~nan])
    assert np.isnan(back[nan].astype(np.float32)).all()
    # midpoints between neighbours (ties), one float32 ulp either side, and random float32 bit patterns
    fin = np.unique(ref[np.isfinite(ref)].astype(np.float64))
    mid = ((fin[1:] + fin[:-1]) / 2).astype(np.float32)
    rnd = _rng(3).integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf)), rnd,
                        np.float32([65504, 65519.99, 65520, 1e30, -np.inf, 2 ** -25, 3 * 2 ** -26])])
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(dt)                                       # NumPy / ml_dtypes: correctly rounded
    got = lowp.convert(x, dt)
    ok = ~np.isnan(x)
    assert np.array_equal(got.view(np.uint16)[ok], want.view(np.uint16)[ok])
    assert np.isnan(got[~ok].astype(np.float32)).all()


@pytest.mark.parametrize("dt", LOWP)
def test_astype_both_ways_and_other_dtypes(dt):
    x = np.array([[1.0, -2.5, 1e-3], [3.14159, 60000.0, -0.0]], np.float32)
    t = jn.tensor(x).astype(dt)
    with np.errstate(over="ignore"):
        assert np.array_equal(t.numpy().view(np.uint16), x.astype(dt).view(np.uint16))
    assert np.array_equal(t.astype(jn.float32).numpy(), x.astype(dt).astype(np.float32))
    assert t.astype(jn.float64).dtype == np.float64
    assert t.astype(jn.int32).numpy().tolist() == x.astype(dt).astype(np.float32).astype(np.int32).tolist()
    assert jn.tensor([1, 2, 300], dtype=jn.int64).astype(dt).numpy().astype(np.float32).tolist() == [1, 2, 300]
    assert t.astype(jn.bool_).numpy().tolist() == (x != 0).tolist()
    t64 = jn.tensor(np.float64(1 + 2 ** -9 + 2 ** -30)[None], dtype=jn.float64)    # a single rounding from f64
    assert t64.astype(dt).numpy().view(np.uint16) == np.float64(1 + 2 ** -9 + 2 ** -30).astype(dt).view(np.uint16)
    other = BF16 if dt == F16 else F16
    assert t.astype(other).dtype == other
    v = t[0, 1:]                                                    # a strided view converts too
    assert v.astype(jn.float32).numpy().tolist() == x.astype(dt).astype(np.float32)[0, 1:].tolist()


# ==============================================================================================================
# the compute rule on common ops, gradients, jit and optimizers
# ==============================================================================================================

def _round(a, dt):
    return np.asarray(a, np.float32).astype(dt).astype(np.float32)


@pytest.mark.parametrize("dt", LOWP)
def test_ops_compute_in_float32_and_round_back(dt):
    rng = _rng(1)
    a32, b32 = _round(rng.standard_normal((3, 4)), dt), _round(rng.standard_normal((4, 2)), dt)
    a, b = jn.tensor(a32, dtype=dt), jn.tensor(b32, dtype=dt)
    cases = [(a * 2.5 + 1, a32 * np.float32(2.5) + 1), (jn.exp(a), None), (a @ b, a32 @ b32),
             (a.sum(axis=1), a32.sum(axis=1)), (F.softmax(a), None), (a.mean(), a32.mean())]
    for got, want in cases:
        assert got.dtype == dt
        if want is not None:
            np.testing.assert_allclose(got.numpy().astype(np.float32), _round(want, dt), rtol=1e-2, atol=1e-2)
    # one op: exactly the float32 result rounded once
    assert np.array_equal(jn.exp(a).numpy().view(np.uint16),
                          jn.exp(jn.tensor(a32)).numpy().astype(dt).view(np.uint16))
    assert np.array_equal((a @ b).numpy().view(np.uint16), (a32 @ b32).astype(dt).view(np.uint16))
    # mixing: with float32 the result is float32; float16 with bfloat16 gives float32; comparisons give bool
    assert (a + jn.tensor(a32)).dtype == np.float32
    assert (jn.tensor([1.0], dtype=jn.float16) + jn.tensor([1.0], dtype=jn.bfloat16)).dtype == np.float32
    assert (a > 0).dtype == np.bool_ and jn.argmax(a, axis=1).dtype == np.int64
    assert (a + 1).dtype == dt and (a + jn.tensor([1, 2, 3, 4])).dtype == dt       # ints do not widen
    # views act on the stored data, strided ones included (eagerly and jitted)
    def views(x):
        return jn.broadcast_to(jn.flip(x.T.reshape(2, 6), 0).reshape(-1)[2:9].reshape(1, 7), (2, 7)).T.reshape(-1)
    want = views(jn.tensor(a32)).numpy()
    for got in (views(a), jn.jit(views)(a)):
        assert got.dtype == dt and np.array_equal(got.numpy().astype(np.float32), want)


@pytest.mark.parametrize("dt", LOWP)
def test_backward_gives_low_precision_gradients(dt):
    rng = _rng(2)
    w32 = _round(rng.standard_normal((4, 3)) * 0.5, dt)
    x32 = _round(rng.standard_normal((5, 4)), dt)
    w = jn.tensor(w32, dtype=dt, requires_grad=True)
    x = jn.tensor(x32, dtype=dt)
    loss = F.cross_entropy(jn.tanh(x @ w), jn.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    w_ref = jn.tensor(w32, requires_grad=True)
    F.cross_entropy(jn.tanh(jn.tensor(x32) @ w_ref), jn.tensor([0, 1, 2, 0, 1])).backward()
    assert w.grad.dtype == dt and loss.dtype == dt
    tol = 2e-2 if dt == BF16 else 2e-3
    np.testing.assert_allclose(w.grad.numpy().astype(np.float32), w_ref.grad.numpy(), rtol=tol, atol=tol)
    g = jn.grad(lambda v: (v.astype(jn.float32) ** 2).sum())(jn.tensor([1.5, -2.0], dtype=dt))
    assert g.dtype == dt and g.numpy().astype(np.float32).tolist() == [3.0, -4.0]


@pytest.mark.parametrize("dt", LOWP)
def test_non_finite_checks_see_low_precision(dt, tmp_path):
    x = jn.tensor([1.0, -1.0], dtype=dt)
    with pytest.raises(FloatingPointError, match=r"sqrt:f32 produced NaN.*\n.*sqrt:f32\(%s\[2\]\)" % dt.name):
        with jn.debug_nans():
            jn.sqrt(x)
    with pytest.raises(ValueError, match="non-finite.*tensor 'w'"):
        jn.io.Saver(tmp_path).save({"w": jn.tensor([1.0, np.inf], dtype=dt)}, 1)


@pytest.mark.parametrize("dt", LOWP)
def test_optimizer_updates_compute_in_float32_and_write_back_rounded(dt):
    p32 = _round(_rng(3).standard_normal(5), dt)
    g32 = _round(_rng(4).standard_normal(5), dt)
    p = jn.Variable(p32, dtype=dt)
    arr = p.numpy()
    p.grad = jn.tensor(g32, dtype=dt)
    jn.optim.SGD([p], lr=0.1).step()
    assert p.dtype == dt and p.numpy() is arr                      # updated in place, in its own array
    want = (p32 - np.float32(0.1) * g32).astype(dt)
    assert np.array_equal(p.numpy().view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("dt, opt", [pytest.param(F16, "sgd", id="float16-sgd"),
                                     pytest.param(BF16, "adam", id="bfloat16-adam"),
                                     pytest.param(F16, "adam", id="float16-adam", marks=pytest.mark.slow),
                                     pytest.param(BF16, "sgd", id="bfloat16-sgd", marks=pytest.mark.slow)])
def test_training_step_eager_and_jit_agree(dt, opt):
    rng = _rng(4)
    x = jn.tensor(rng.standard_normal((6, 4)), dtype=dt)
    y = jn.tensor(rng.integers(0, 3, 6))
    models, losses = [], []
    for jitted in (False, True):
        jn.random.seed(0)
        m = jn.nn.Sequential(jn.nn.Linear(4, 8, dtype=dt), jn.nn.ReLU(), jn.nn.Linear(8, 3, dtype=dt))
        o = jn.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) if opt == "sgd" else \
            jn.optim.Adam(m.parameters(), lr=0.01)

        def step(x, y, m=m, o=o):
            o.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            o.step()
            return loss

        f = jn.jit(step) if jitted else step
        ls = [float(f(x, y).astype(jn.float32)) for _ in range(4)]
        losses.append(ls)
        models.append(m)
        assert all(p.dtype == dt for p in m.parameters())
    assert losses[1][-1] < losses[1][0]                                 # it learns
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)          # the same rule eagerly and jitted
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert np.array_equal(p.numpy().view(np.uint16), q.numpy().view(np.uint16))


@pytest.mark.parametrize("dt", [pytest.param(BF16, id="bfloat16"),
                                pytest.param(F16, id="float16", marks=pytest.mark.slow)])
def test_loops_on_low_precision(dt):
    rng = _rng(8)
    w = jn.tensor(rng.standard_normal((3, 3)) * 0.5, dtype=dt)
    xs = jn.tensor(rng.standard_normal((4, 2, 3)), dtype=dt)

    def f(w, xs):
        def body(c, x):
            c = jn.tanh(c @ w + x)
            return c, c.sum()
        c, ys = jn.scan(body, jn.zeros((2, 3), dtype=dt), xs)
        assert c.dtype == dt and ys.dtype == dt
        return c.astype(jn.float32).sum() + ys.astype(jn.float32).sum()

    eager, jitted = f(w, xs), jn.jit(f)(w, xs)
    assert float(eager) == float(jitted)
    ge, gj = jn.grad(f)(w, xs), jn.jit(jn.grad(f))(w, xs)
    assert ge.dtype == gj.dtype == dt
    np.testing.assert_allclose(gj.numpy().astype(np.float32), ge.numpy().astype(np.float32), rtol=2e-2, atol=2e-2)

    def g(c):
        return jn.while_loop(lambda c: c.sum() < 100, lambda c: c * 1.5, c)
    start = jn.tensor([1.0, 2.0], dtype=dt)
    out_e, out_j = g(start), jn.jit(g)(start)
    assert out_e.dtype == out_j.dtype == dt and out_e.numpy().tolist() == out_j.numpy().tolist()
    assert float(out_e.sum().astype(jn.float32)) >= 100


# ==============================================================================================================
# every primitive: recorded float32 calls replayed on float16 / bfloat16
# ==============================================================================================================

class _Recorder:
    """Records the first call of every primitive (through the ``apply`` hook) with copies of its arrays."""

    def __init__(self):
        self.calls = {}

    def __call__(self, prim, inputs, params):
        if prim.name not in self.calls and all(isinstance(t._data, np.ndarray) for t in inputs):
            self.calls[prim.name] = (prim, [np.array(t._data) for t in inputs], dict(params))
        return prim

    def __enter__(self):
        self.prev, ad._LOWP = ad._LOWP, self
        return self

    def __exit__(self, *exc):
        ad._LOWP = self.prev


def _t(a, grad=False):
    return jn.tensor(np.asarray(a, np.float32), requires_grad=grad)


def _work_ops():
    rng = _rng(5)
    x, y = _t(rng.uniform(0.5, 2, (2, 3)), True), _t(rng.uniform(0.5, 2, (2, 3)), True)
    outs = [x + y, x - y, x * y, x / y, x ** y, jn.maximum(x, y), jn.minimum(x, y), jn.exp(x), jn.log(x),
            jn.log1p(x), jn.sqrt(x), jn.abs(x), jn.sign(x), jn.square(x), jn.reciprocal(x), jn.sin(x), jn.cos(x),
            jn.tanh(x), jn.sigmoid(x), jn.relu(x), jn.softplus(x), -x, jn.clip(x, 0.7, 1.5),
            jn.where(x > y, x, y), x % y, x.copy() if hasattr(x, "copy") else jn.copy(x), x.astype(jn.float64)]
    outs += [jn.floor(x), jn.ceil(x), x // y, jn.isnan(x), jn.isfinite(x), x < y, x <= y, x > y, x >= y,
             x == y, x != y, jn.logical_and(x, y), jn.logical_or(x, y), jn.logical_xor(x, y), jn.logical_not(x)]
    outs += [x.sum(axis=1), x.max(), jn.logsumexp(x, axis=1), x.argmax(axis=1), jn.cumsum(x, axis=1),
             jn.cumprod(x, axis=0), F.softmax(x), F.log_softmax(x), x @ y.T, jn.concatenate([x, y], 0),
             jn.pad(x, ((1, 0), (0, 1))), jn.take(x, jn.tensor([1, 0])), jn.sort(x, axis=1), jn.argsort(x),
             jn.take_along_axis(x, jn.tensor([[0], [2]]), axis=1), jn.broadcast_to(x[:1], (2, 3)), jn.flip(x, 0),
             x[jn.tensor([1, 0])], x.T.reshape(-1), jn.stop_gradient(x), jn.scatter_add(jn.zeros((4,)), jn.tensor(
                 [0, 3]), jn.tensor([1.0, 2.0])), jn.one_hot(jn.tensor([0, 2]), 3)]
    if hasattr(jn, "top_k"):
        outs.append(jn.top_k(x, 2)[0])
    loss = sum((o.astype(jn.float32) * 0.1).sum() for o in outs if o.dtype.kind == "f")
    loss.backward()


def _work_nn():
    rng = _rng(6)
    jn.random.seed(0)
    img = _t(rng.standard_normal((2, 2, 6, 6)), True)
    conv = jn.nn.Conv2d(2, 3, 3, padding=1)
    bn = jn.nn.BatchNorm2d(3)
    h = jn.nn.MaxPool2d(2)(bn(conv(img)))
    h = jn.nn.AvgPool2d(3)(h.reshape(2, 3, 3, 3))
    lab = jn.tensor([0, 2])
    logits = h.reshape(2, 3)
    loss = F.cross_entropy(logits, lab) + F.cross_entropy(logits, F.softmax(logits * 0.5).detach()) + (
        F.cross_entropy(logits, lab, reduction="none").sum())          # the per-row rows (the mean is one row)
    seq = _t(rng.standard_normal((2, 3, 4)), True)
    out = jn.nn.LSTM(4, 3)(seq)
    out = out[0] if isinstance(out, tuple) else out
    emb = jn.nn.Embedding(5, 3)(jn.tensor([[1, 4]]))
    drop = F.dropout(seq, 0.5, training=True)
    hd = 3
    st = F.lstm_step(_t(rng.standard_normal((2, 4 * hd)), True), F.lstm_state(_t(np.zeros((2, hd)), True), _t(
        np.ones((2, hd)), True)), _t(rng.standard_normal((hd, 4 * hd)), True), _t(np.zeros(4 * hd), True))
    loss = loss + st.sum() + jn.ops.identity(seq).sum()
    loss = loss + out.sum() + emb.sum() + drop.sum() + jn.random.normal((2,)).sum()
    loss.backward()


def _work_optim():
    for name, make in [("sgd", lambda ps: jn.optim.SGD(ps, lr=0.1)),
                       ("mom", lambda ps: jn.optim.SGD(ps, lr=0.1, momentum=0.9)),
                       ("adagrad", lambda ps: jn.optim.Adagrad(ps, lr=0.1)),
                       ("rms", lambda ps: jn.optim.RMSprop(ps, lr=0.1)),
                       ("rmsm", lambda ps: jn.optim.RMSprop(ps, lr=0.1, momentum=0.9)),
                       ("rmsc", lambda ps: jn.optim.RMSprop(ps, lr=0.1, centered=True)),
                       ("rmscm", lambda ps: jn.optim.RMSprop(ps, lr=0.1, centered=True, momentum=0.9)),
                       ("adam", lambda ps: jn.optim.Adam(ps, lr=0.1)),
                       ("adamw", lambda ps: jn.optim.AdamW(ps, lr=0.1))]:
        jn.random.seed(0)
        dense = jn.nn.Linear(3, 2)
        emb = jn.nn.Embedding(4, 2) if name in ("sgd", "mom", "adagrad", "adam") else None
        ps = list(dense.parameters()) + (list(emb.parameters()) if emb is not None else [])
        o = make(ps)
        loss = dense(_t(np.ones((2, 3)))).sum()
        if emb is not None:
            loss = loss + emb(jn.tensor([0, 3])).sum()
        loss.backward()
        o.step()


def _work_models():
    from jitnet.models import dnc as D
    from jitnet.models import seq2seq as S
    rng = _rng(7)
    N, W, R = 4, 2, 1
    st = D.pack_state(D.initial_memory_state(1, N, W, R))
    xi = _t(rng.standard_normal((1, D.interface_size(R, W))), True)
    D.dnc_memory_step(st, xi, N, W, R).sum().backward()
    b, h = 2, 3
    xw, whh = _t(rng.standard_normal((b, 4 * h)), True), _t(rng.standard_normal((h, 4 * h)) * 0.5, True)
    s = _t(np.concatenate([rng.standard_normal((b, 2 * h)), np.zeros((b, 4 * h))], 1), True)
    S.lstm_step_fused(xw, s, whh, jn.tensor(np.array([1, 0], np.uint8))).sum().backward()
    q, pk, v, vals = (_t(rng.standard_normal(sh), True) for sh in ((b, 4), (b, 3, 4), (4,), (b, 3, 2)))
    mask = jn.tensor(np.ones((b, 3), np.uint8))
    (S.additive_attention_step(q, pk, v, mask, vals).sum()
     + S.additive_attention_weights(q, pk, v, mask, vals).sum()).backward()


WORKLOADS = {"ops": _work_ops, "nn": _work_nn, "optim": _work_optim}
SLOW_WORKLOADS = {"models": _work_models}

#: rows no float workload reaches, and why
EXEMPT = {
    "ifloor_divide": "integer-only", "iremainder": "integer-only", "bitwise_and": "integer-only",
    "bitwise_or": "integer-only", "bitwise_xor": "integer-only", "bitwise_not": "integer-only",
    "to_device": "moves data between devices (GPU-only)", "convert": "the conversion itself",
    "assign": "compiler-only (jit writes to variables; covered by the jitted training test)",
    "scan": "loops: test_loops_on_low_precision", "while_loop": "loops: test_loops_on_low_precision",
    "tuple_get": "loops: test_loops_on_low_precision",
}


def _record(workloads):
    with _Recorder() as rec:
        for w in workloads.values():
            w()
    return rec.calls


def _floatish(a):
    return isinstance(a, np.ndarray) and a.dtype == np.float32


def _replay(prim, arrays, params, dt):
    """Run a recorded call with its float32 inputs rounded to ``dt``; return (got, want) output arrays."""
    low = [lowp.convert(a, dt) if _floatish(a) else np.array(a) for a in arrays]
    wide = [lowp.convert(lo, np.float32) if _floatish(a) else np.array(a) for a, lo in zip(arrays, low)]
    p_low = {k: (dt if isinstance(v, np.dtype) and v == np.float32 else v) for k, v in params.items()}
    if prim.extra.get("random"):
        jn.random.seed(0)
    want = prim.impl["cpu"](*wide, **params)
    if prim.extra.get("random"):
        jn.random.seed(0)
    with jn.no_grad():
        got = apply(prim, *[jn.Tensor._wrap(a) for a in low], **p_low)._data
    inplace = prim.extra.get("inplace", ())
    pairs = [(got, want)] + [(low[i], wide[i]) for i in inplace]
    if prim.vjp is not None and not prim.nondiff and isinstance(got, np.ndarray) and got.dtype == dt:
        _check_vjp(prim, low, got, p_low, dt, [_floatish(a) for a in arrays])
    return pairs, any(_floatish(a) for a in arrays) or any(isinstance(v, np.dtype) and v == np.float32
                                                          for v in params.values())


def _check_vjp(prim, low, got, params, dt, needs):
    """The VJP runs on the low-precision tensors (through the rule) and gives gradients of their dtype."""
    ins = [jn.Tensor._wrap(a) for a in low]
    ans = jn.Tensor._wrap(got)
    try:
        grads = prim.vjp(jn.ones_like(ans), ans, ins, needs, **params)
    except (NotImplementedError, TypeError) as e:          # backward kernels refuse second-order gradients,
        assert str(e).split(":")[0] in (prim.name, prim.name.replace("_grad", "")), (prim.name, str(e))
        return
    for i, gr in enumerate(grads):
        if gr is None or not needs[i]:
            continue
        gr = getattr(gr, "values", gr)                        # IndexedSlices: the rows
        assert gr.dtype == dt, f"{prim.name}: gradient {i} has dtype {gr.dtype}, expected {dt}"
        assert np.isfinite(gr.numpy().astype(np.float32)).all(), prim.name


def _check_pairs(name, pairs, dt):
    for got, want in pairs:
        gs = got if isinstance(got, tuple) else (got,)
        ws = want if isinstance(want, tuple) else (want,)
        for g, w in zip(gs, ws):
            if w.dtype == np.float32:
                assert g.dtype == dt, f"{name}: output dtype {g.dtype}, expected {dt}"
                with np.errstate(over="ignore", invalid="ignore"):
                    wr = w.astype(dt).astype(np.float32)
                np.testing.assert_array_equal(g.astype(np.float32), wr, err_msg=name)
            else:
                assert g.dtype == w.dtype, f"{name}: output dtype {g.dtype}, expected {w.dtype}"
                np.testing.assert_array_equal(g, w, err_msg=name)


def _sweep(workloads, dts=(F16, BF16)):
    calls = _record(workloads)
    swept = set()
    for name, (prim, arrays, params) in sorted(calls.items()):
        for dt in dts:
            pairs, floaty = _replay(prim, arrays, params, dt)
            if floaty:
                _check_pairs(name, pairs, dt)
                swept.add(name)
    return calls, swept


@pytest.mark.slow
def test_every_primitive_is_swept():
    calls, swept = _sweep({**WORKLOADS, **SLOW_WORKLOADS})
    float_rows = set(calls) - swept              # recorded, but no float input (argsort of ints, one_hot ...)
    missing = sorted(set(REGISTRY) - set(calls) - set(EXEMPT) - {n for n in REGISTRY if ":" in n})
    assert not missing, f"primitives no workload reaches (add a workload or an EXEMPT reason): {missing}"
    assert len(swept) > 80 and float_rows.isdisjoint({"matmul", "add"})
    assert {"add", "matmul", "reduce", "softmax", "conv2d", "adam_update", "sgd_sparse_update", "lstm_seq",
            "dnc_memory_step", "additive_attention_context"} <= swept


# ==============================================================================================================
# safetensors: BF16, F16, F64 and the integer dtypes, both ways with the safetensors package
# ==============================================================================================================

def _examples():
    rng = _rng(9)
    x = rng.standard_normal((3, 4)) * 100
    out = {"BF16": x.astype(BF16), "F16": x.astype(np.float16), "F32": x.astype(np.float32), "F64": x,
           "BOOL": x > 0}
    for code, dt in [("I8", np.int8), ("U8", np.uint8), ("I16", np.int16), ("I32", np.int32), ("I64", np.int64)]:
        info = np.iinfo(dt)
        out[code] = rng.integers(info.min, info.max, (2, 5), dtype=dt, endpoint=True)
    return out


def test_safetensors_numpy_both_ways(tmp_path):
    st_np = pytest.importorskip("safetensors.numpy")
    arrays = _examples()
    mine, theirs = tmp_path / "jitnet.safetensors", tmp_path / "theirs.safetensors"
    jn.save({k: jn.tensor(v) for k, v in arrays.items()}, mine)
    st_np.save_file(arrays, str(theirs))
    back_theirs = st_np.load_file(str(mine))                        # jitnet's file read by safetensors
    back_mine = jn.load(theirs)                                     # safetensors' file read by jitnet
    for k, v in arrays.items():
        assert back_theirs[k].dtype == v.dtype and np.array_equal(back_theirs[k], v), k
        assert back_mine[k].dtype == v.dtype and np.array_equal(back_mine[k].numpy(), v), k
    import json
    with open(mine, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {k: header[k]["dtype"] for k in arrays} == {k: k for k in arrays}


def test_safetensors_torch_bfloat16_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    ref = {"w": torch.randn(4, 3, generator=g).to(torch.bfloat16), "h": torch.randn(5, generator=g).half(),
           "i": torch.arange(6, dtype=torch.int64).reshape(2, 3), "m": torch.tensor([True, False])}
    path = tmp_path / "torch.safetensors"
    st_torch.save_file(ref, str(path))
    got = jn.load(path)
    assert got["w"].dtype == jn.bfloat16 and got["h"].dtype == jn.float16 and got["m"].dtype == jn.bool_
    for k, v in ref.items():
        assert np.array_equal(got[k].astype(jn.float32).numpy(), v.float().numpy()), k
    y = got["w"].T @ got["w"]                                        # computes (float32, rounded to bfloat16)
    want = (ref["w"].float().T @ ref["w"].float()).to(torch.bfloat16).float().numpy()
    np.testing.assert_allclose(y.astype(jn.float32).numpy(), want, rtol=1e-2)
    out = tmp_path / "jitnet.safetensors"
    jn.save({k: v * 2 if v.dtype.kind != "b" else v for k, v in got.items()}, out)
    back = st_torch.load_file(str(out))
    assert back["w"].dtype == torch.bfloat16 and back["h"].dtype == torch.float16
    for k, v in ref.items():
        want = v if v.dtype == torch.bool else v * 2
        assert back[k].dtype == v.dtype and torch.equal(back[k], want), k
