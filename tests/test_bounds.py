"""Index bounds fuzz: every primitive that reads indices, labels or ids raises IndexError naming the op, the bad
value, its position and the bound, on every path: eager, the first jitted call (tracing), later jitted calls
(the plan's Python steps), native drivers (from a plan's third run) and scan bodies.

The primitives come from the registry (rows marked by ``jitnet.bounds.mark``), so a new index primitive
without a case here fails ``test_every_index_primitive_has_a_case``.
"""
import re

import numpy as np
import pytest

import jitnet as jn
import jitnet.nn.functional as F
import jitnet.models.dnc  # noqa: F401  (registers its rows)
import jitnet.models.seq2seq  # noqa: F401
import jitnet.models.skipgram  # noqa: F401
from jitnet import ops
from jitnet.autodiff.core import REGISTRY, apply
from jitnet.compiler import native
from jitnet.nn.embedding_ops import embedding
from jitnet.optim import updates as U

N = 4                                        # the bound of every case
GOOD = np.array([0, 2], np.int64)            # index arrays are [0, value]: the bad one sits at position 1


def _c(a):
    return jn.tensor(np.asarray(a, np.float32))


def _row(i):
    return jn.reshape(i, (1, -1))


def _vars():
    v = {k: jn.Variable(np.ones((N, 3), np.float32)) for k in ("p", "s1", "s2")}
    v["w"] = jn.Variable(np.arange(12, dtype=np.float32).reshape(3, N) / 10)   # (a variable: never folded)
    return v


def _sparse(kind):
    def run(i, v):
        vals, lr, step = _c(np.ones((2, 3))), jn.tensor(np.float32(0.1)), jn.tensor(np.float32(1.0))
        if kind == "sgd":
            return U.sgd_sparse_update(v["p"], vals, i, None, lr)
        if kind == "sgd_momentum":
            return U.sgd_sparse_update(v["p"], vals, i, v["s1"], lr, momentum=0.9)
        if kind == "adagrad":
            return U.adagrad_sparse_update(v["p"], vals, i, v["s1"], lr)
        return U.adam_sparse_update(v["p"], vals, i, v["s1"], v["s2"], lr, step)
    return run


_LOGIT_X = np.ones((2, 3), np.float32)

# name -> (op in the message, negative policy, position of the bad value, run(index tensor, variables))
CASES = {
    "take": ("take", "wrap", "1", lambda i, v: jn.take(jn.arange(float(N)), i)),
    "scatter_add": ("scatter_add", "wrap", "1", lambda i, v: jn.scatter_add(jn.zeros((N,)), i, jn.ones((2,)))),
    "take_along_axis": ("take_along_axis", "wrap", "(0, 1)",
                        lambda i, v: jn.take_along_axis(jn.ones((1, N)), _row(i), axis=1)),
    "put_along_axis_add": ("put_along_axis_add", "wrap", "(0, 1)",
                           lambda i, v: apply(ops.PUT_ALONG_ADD, jn.ones((1, 2)), _row(i), shape=(1, N), axis=1)),
    "getitem": ("getitem", "wrap", "1", lambda i, v: jn.arange(float(N))[i]),
    "getitem_grad": ("getitem", "wrap", "1", lambda i, v: apply(ops.GETITEM_GRAD, jn.ones((2,)), i,
                                                                 template=(("__arr__", 0),), shape=(N,))),
    "one_hot": ("one_hot", "ignore", "1", lambda i, v: jn.one_hot(i, N)),
    "embedding": ("embedding", "error", "1", lambda i, v: embedding(jn.ones((N, 3)), i)),
    "cross_entropy_int": ("cross_entropy", "ignore", "1", lambda i, v: F.cross_entropy(
        jn.matmul(_c(_LOGIT_X), v["w"]), i, reduction="none")),
    "cross_entropy_int_grad": ("cross_entropy", "ignore", "1", lambda i, v: apply(
        F.XENT_INT_GRAD, jn.matmul(_c(_LOGIT_X), v["w"]), i, jn.ones((2,)))),
    "cross_entropy_int_reduced": ("cross_entropy", "ignore", "1", lambda i, v: F.cross_entropy(
        jn.matmul(_c(_LOGIT_X), v["w"]), i) * 2.0),
    "cross_entropy_int_reduced_grad": ("cross_entropy", "ignore", "1", lambda i, v: apply(
        F.XENT_INT_REDUCED_GRAD, jn.matmul(_c(_LOGIT_X), v["w"]), i, jn.ones(()), mean=False)),
    "sgd_sparse_update": ("sparse update", "error", "1", _sparse("sgd")),
    "sgd_momentum_sparse_update": ("sparse update", "error", "1", _sparse("sgd_momentum")),
    "adagrad_sparse_update": ("sparse update", "error", "1", _sparse("adagrad")),
    "adam_sparse_update": ("sparse update", "error", "1", _sparse("adam")),
}

# rows whose names look like index ops but take no index input (they produce indices)
NOT_INDEX_INPUTS = {"argsort", "top_k_indices", "argreduce"}
_LOOKS_LIKE_INDEX = re.compile(r"take|scatter|gather|embed|one_hot|index|indic|label|sparse|getitem|put_along|_int")


def _bad_values(negative):
    vals = [N, 10 ** 8, 2 ** 40]
    if negative == "wrap":
        vals += [-N - 1, -(2 ** 40)]
    elif negative == "error":
        vals += [-1, -(2 ** 40)]
    return vals


def _idx(v):
    return jn.tensor(np.array([0, v], np.int64))


def _check(ei, op, v, pos):
    msg = str(ei.value)
    assert msg.startswith(f"{op}: "), msg
    assert f" {v} is out of bounds" in msg and str(N) in msg, msg
    assert f"at position {pos} of the" in msg, msg
    assert "numba" not in msg.lower()


def _total(name, i, v):
    return jn.sum(CASES[name][3](i, v))


def test_every_index_primitive_has_a_case():
    marked = {n for n, p in REGISTRY.items() if p.extra.get("indices")}
    assert marked == set(CASES), (marked ^ set(CASES))
    unmarked = {n for n in REGISTRY if _LOOKS_LIKE_INDEX.search(n) and n not in marked}
    assert unmarked <= NOT_INDEX_INPUTS | {"cross_entropy_prob", "cross_entropy_prob_grad"}, unmarked
    for name in CASES:
        (pos, (what, neg)), = REGISTRY[name].extra["indices"].items()
        assert neg == CASES[name][1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bounds_on_every_path(name):
    op, negative, pos, run = CASES[name]
    bads = _bad_values(negative)
    v = _vars()
    # eager
    for b in bads:
        with pytest.raises(IndexError) as ei:
            run(_idx(b), v)
        _check(ei, op, b, pos)
    # the first jitted call traces (and computes) eagerly
    with pytest.raises(IndexError) as ei:
        jn.jit(lambda i: _total(name, i, v))(_idx(bads[0]))
    _check(ei, op, bads[0], pos)
    # later calls run the plan's steps; from the third run, native drivers where the primitive has an emitter
    jf = jn.jit(lambda i: _total(name, i, v))
    ref = jf(_idx(GOOD[1])).numpy()
    for b in bads:
        with pytest.raises(IndexError) as ei:
            jf(_idx(b))
        _check(ei, op, b, pos)
    for _ in range(native.NATIVE_AFTER + 1):
        got = jf(_idx(GOOD[1])).numpy()
    if "sparse" not in name:        # (updates move their parameter each call)
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    for b in bads:
        with pytest.raises(IndexError) as ei:
            jf(_idx(b))
        _check(ei, op, b, pos)
    if name.startswith("cross_entropy"):
        (comp,) = jf._cache.values()
        segs = [s for s in getattr(comp.plan, "segments", []) if "nn_xent_int" in s.source]
        assert segs and all(s._fn is not None and not s.failed for s in segs)
    if negative == "ignore":        # a negative value is valid: no error on any path
        for b in (-1, -(2 ** 40)):
            run(_idx(b), v)
            jf(_idx(b))


@pytest.mark.parametrize("name", ["take", "embedding", "cross_entropy_int", "one_hot", "scatter_add"])
def test_bounds_in_scan_bodies(name):
    op, negative, pos, run = CASES[name]
    v = _vars()

    def f(I):
        def body(c, i):
            return c + _total(name, i, v), c
        return jn.scan(body, jn.zeros(()), I)[0]
    jf = jn.jit(f)
    good = jn.tensor(np.stack([GOOD, GOOD]))
    ref = f(good).numpy()
    for _ in range(native.NATIVE_AFTER + 2):
        np.testing.assert_allclose(jf(good).numpy(), ref, rtol=1e-6)
    for b in _bad_values(negative):
        bad = jn.tensor(np.stack([GOOD, np.array([0, b])]))
        with pytest.raises(IndexError) as ei:
            f(bad)
        _check(ei, op, b, pos)
        with pytest.raises(IndexError) as ei:
            jf(bad)
        _check(ei, op, b, pos)
    if name.startswith("cross_entropy"):       # the errors above came out of a native loop
        (comp,) = jf._cache.values()
        loops = [n.params["body"].native for n in comp.graph.live_nodes() if n.prim.name == "scan"]
        assert loops and all(nl is not None and nl._fns and not nl.failed for nl in loops)


def test_cross_entropy_label_out_of_range_under_jit_is_an_error_not_a_number():
    x = jn.tensor(np.zeros((2, 10), np.float32))
    step = jn.jit(lambda x, y: F.cross_entropy(x, y))
    assert step(x, jn.tensor(np.array([1, 2]))).item() == pytest.approx(np.log(10), rel=1e-6)
    for _ in range(3):
        with pytest.raises(IndexError, match=r"label 10 is out of bounds for 10 classes"):
            step(x, jn.tensor(np.array([1, 10])))
