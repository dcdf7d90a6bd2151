"""The op suite on the GPU: every primitive's CUDA kernel forward against NumPy (or the CPU kernel, itself tested
against NumPy and central differences in tests/test_ops.py) and, for differentiable ops, its gradient on the GPU
against the CPU gradient (the VJPs are device-neutral jitnet ops). Broadcast and non-contiguous (transposed,
strided, reversed) operands included. Shapes are tiny: the simulator runs every GPU thread as a Python thread.
"""
import numpy as np
import pytest

import jitnet as jn
import jitnet.nn.functional as F
from jitnet.nn.embedding_ops import embedding

RNG = np.random.default_rng(1234)


def arr(*shape, dtype=np.float32, lo=-2.0, hi=2.0):
    return RNG.uniform(lo, hi, shape).astype(dtype)


def run(fn, arrays, prep=None, grad=True, rtol=1e-5, atol=1e-6, grad_rtol=1e-4):
    """Run fn on CPU and GPU tensors made from ``arrays``; compare outputs and (float) input gradients."""
    results = {}
    for dev in ("cpu", "cuda"):
        leaves = [jn.tensor(a, requires_grad=grad and a.dtype.kind == "f") for a in arrays]
        ins = [t.to(dev) for t in leaves]
        if prep is not None:
            ins = prep(*ins)
        out = fn(*ins)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            assert o.is_cuda == (dev == "cuda"), f"output on the wrong device ({dev})"
        vals = [o.numpy() for o in outs]
        grads = None
        if grad and outs[0].requires_grad:
            w = jn.tensor(np.linspace(0.5, 1.5, outs[0].size, dtype=outs[0].dtype).reshape(outs[0].shape)).to(dev)
            (outs[0] * w).sum().backward()
            grads = [None if t.grad is None else t.grad.numpy() for t in leaves]
        results[dev] = (vals, grads)
    (cv, cg), (gv, gg) = results["cpu"], results["cuda"]
    for a, b in zip(cv, gv):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, equal_nan=True)
        else:
            np.testing.assert_array_equal(b, a)
    if cg is not None:
        assert gg is not None
        for a, b in zip(cg, gg):
            if a is None:
                assert b is None
            else:
                np.testing.assert_allclose(b, a, rtol=grad_rtol, atol=1e-5)
    return gv


def transposed(*ts):
    return [t.T for t in ts]


# --------------------------------------------------------------------------------------------------------------
# Elementwise (generated from the templates)
# --------------------------------------------------------------------------------------------------------------

UNARY = {
    "negative": (jn.negative, {}), "exp": (jn.exp, {}), "log": (jn.log, {"lo": 0.1}),
    "log1p": (jn.log1p, {"lo": -0.5}), "sqrt": (jn.sqrt, {"lo": 0.1}), "abs": (jn.abs, {}),
    "square": (jn.square, {}), "reciprocal": (jn.reciprocal, {"lo": 0.5}), "sin": (jn.sin, {}),
    "cos": (jn.cos, {}), "tanh": (jn.tanh, {}), "sigmoid": (jn.sigmoid, {"lo": -30, "hi": 30}),
    "relu": (jn.relu, {}), "softplus": (jn.softplus, {"lo": -30, "hi": 30}),
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_forward_and_gradient(name):
    fn, kw = UNARY[name]
    run(fn, [arr(3, 4, **kw)], prep=transposed)          # a transposed (non-contiguous) operand


@pytest.mark.parametrize("fn", [jn.sign, jn.floor, jn.ceil, jn.isnan, jn.isfinite],
                         ids=["sign", "floor", "ceil", "isnan", "isfinite"])
def test_nondifferentiable_unary(fn):
    a = np.array([[-1.5, 0.0, 2.5], [np.nan, -np.inf, 0.4]], np.float32)
    if fn in (jn.floor, jn.ceil, jn.sign):
        a = np.array([[-1.5, 0.0, 2.5], [3.0, -0.2, 0.4]], np.float32)
    run(fn, [a], grad=False)


BINARY = {"add": jn.add, "subtract": jn.subtract, "multiply": jn.multiply, "divide": jn.divide,
          "maximum": jn.maximum, "minimum": jn.minimum, "power": jn.power, "remainder": jn.remainder}


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_broadcast_forward_and_gradient(name):
    a = arr(2, 1, 3, lo=0.5, hi=2.0)
    b = arr(4, 1, lo=0.5, hi=2.0)
    run(BINARY[name], [a, b])


def test_binary_with_python_scalars_and_strided_views():
    a = arr(4, 6)
    run(lambda x: (x[::2, 1::2] * 3.0 - 1) / 2 + x[1::2, ::2], [a])
    run(lambda x: 2.0 ** x[::-1], [arr(5)])                 # a reversed view (negative stride) is gathered


def test_comparisons_logic_and_where():
    a, b = arr(3, 4), arr(1, 4)
    b[0, 0] = a[0, 0]
    for f in (jn.less, jn.less_equal, jn.greater, jn.greater_equal, jn.equal, jn.not_equal):
        run(f, [a, b], grad=False)
    m = a > 0
    run(lambda x, y: jn.logical_xor(jn.logical_and(x, ~y), jn.logical_or(x, y)), [m, b > 0], grad=False)
    run(lambda c, x, y: jn.where(c, x, y), [m, a, b])


def test_integer_ops():
    a = np.array([[7, -7, 5], [0, 9, -3]], np.int64)
    b = np.array([2, -3, 0], np.int64)
    for f in (jn.floor_divide, jn.remainder, jn.add, jn.multiply, jn.maximum):
        run(f, [a, b], grad=False)
    run(lambda x, y: (x & y) | (x ^ ~y), [a, b], grad=False)
    run(lambda x: x.astype(jn.float32) * 0.5, [a.astype(np.int32)], grad=False)


def test_clip_cast_copy():
    a = arr(3, 5)
    run(lambda x: jn.clip(x, -0.5, 0.7), [a])
    run(lambda x: x.astype(jn.float64) * 2, [a])
    run(lambda x: jn.copy(x.T), [a])
    run(lambda x: x.astype(jn.bool_), [a], grad=False)


# --------------------------------------------------------------------------------------------------------------
# Reductions, softmax family
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["sum", "mean", "max", "min", "prod"])
@pytest.mark.parametrize("axis", [None, 0, 1, (0, 2)], ids=["all", "first", "middle", "outer"])
def test_reductions(op, axis):
    a = arr(3, 4, 5, lo=0.5, hi=1.5) if op == "prod" else arr(3, 4, 5)
    run(lambda x: getattr(jn, op)(x, axis=axis, keepdims=axis == 1), [a], grad_rtol=2e-4)


def test_long_rows_and_columns_take_two_passes():
    # rows longer than ROW_CHUNK and columns longer than COL_CHUNK reduce in two kernel passes
    import jitnet.kernels_gpu as KG
    a = arr(2, KG.ROW_CHUNK * 2 + 3)
    run(lambda x: x.sum(axis=1), [a])
    run(lambda x: x.max(axis=1), [a])
    b = arr(KG.COL_CHUNK * 3 + 1, 3)
    run(lambda x: x.sum(axis=0), [b])
    run(lambda x: x.min(axis=0), [b])


def test_reduction_nan_ints_bools_and_empty():
    a = np.array([[1.0, np.nan, 3.0], [2.0, 5.0, -1.0]], np.float32)
    run(lambda x: (x.max(axis=1), x.min(axis=1), x.sum(axis=1)), [a], grad=False)
    i = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    run(lambda x: (x.sum(axis=0), x.prod(), x.max(axis=1)), [i], grad=False)
    m = np.array([[True, False], [True, True]])
    run(lambda x: (jn.all(x, axis=1), jn.any(x, axis=0), jn.any(x)), [m], grad=False)
    run(lambda x: x.sum(axis=0), [np.zeros((0, 3), np.float32)], grad=False)
    with pytest.raises(ValueError, match="zero-size reduction"):
        jn.zeros((0, 3)).to("cuda").max(axis=0)


def test_argmax_argmin_ties_and_nan():
    a = np.array([[1.0, 3.0, 3.0, -1.0], [np.nan, 2.0, np.nan, 0.0], [0.0, -2.0, -2.0, 5.0]], np.float32)
    run(lambda x: (jn.argmax(x, 1), jn.argmin(x, 1), jn.argmax(x), jn.argmin(x, 0, keepdims=True)), [a],
        grad=False)
    import jitnet.kernels_gpu as KG
    long = arr(2, KG.SMALL_ROW * 3)                          # the block-per-row kernel
    run(lambda x: (jn.argmax(x, 1), jn.argmin(x, 1)), [long], grad=False)


@pytest.mark.parametrize("fn", [jn.softmax, jn.log_softmax, lambda x, axis: jn.logsumexp(x, axis)],
                         ids=["softmax", "log_softmax", "logsumexp"])
@pytest.mark.parametrize("n,axis", [(5, -1), (20, -1), (5, 0)], ids=["short-rows", "block-rows", "axis0"])
def test_softmax_family(fn, n, axis):
    a = arr(3, n, lo=-5, hi=5)
    a[1, 2] = -np.inf          # (not first in its row: the CPU kernels give NaN there, see the report)
    run(lambda x: fn(x, axis=axis), [a], rtol=2e-5, grad_rtol=2e-4)


def test_softmax_special_rows():
    a = np.array([[-np.inf, -np.inf, -np.inf], [np.nan, 0.0, 1.0], [1e30, 0.0, -1e30]], np.float32)
    run(lambda x: (jn.softmax(x), jn.log_softmax(x)), [a], grad=False)
    # logsumexp of a row of -inf is -inf (NumPy/SciPy); a NaN row gives NaN
    lse = jn.logsumexp(jn.tensor(a).to("cuda"), -1).numpy()
    assert lse[0] == -np.inf and np.isnan(lse[1]) and lse[2] == np.float32(1e30)
    # a masked (-inf) first logit: the GPU kernels start their sums from zero, not from x[0] * 0
    m = jn.tensor([[-np.inf, 1.0, 2.0]]).to("cuda")
    np.testing.assert_allclose(jn.softmax(m).numpy(), [[0.0, 0.26894143, 0.7310586]], rtol=1e-6)
    np.testing.assert_allclose(jn.logsumexp(m, -1).numpy(), [np.log(np.exp(1.0) + np.exp(2.0))], rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Matmul
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sa,sb", [((5, 7), (7, 3)), ((2, 1, 3, 4), (2, 4, 5)), ((4,), (4, 3)), ((3, 4), (4,)),
                                   ((9, 17), (17, 10)), ((19, 6), (6, 21))],
                         ids=["2d", "batched-broadcast", "vec-mat", "mat-vec", "multi-tile", "large-tiles"])
def test_matmul(sa, sb):
    run(jn.matmul, [arr(*sa), arr(*sb)], rtol=1e-5, atol=1e-5)


def test_matmul_transposed_operands_float64_and_ints():
    run(lambda a, b: a.T @ b.T, [arr(4, 3), arr(5, 4)], atol=1e-5)
    run(jn.matmul, [arr(3, 2, dtype=np.float64), arr(2, 4, dtype=np.float64)], rtol=1e-12)
    i = np.array([[1, 2], [3, 4]], np.int64)
    run(jn.matmul, [i, i], grad=False)
    run(jn.matmul, [np.zeros((2, 0), np.float32), np.zeros((0, 3), np.float32)], grad=False)


# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [4, 20], ids=["short-rows", "block-rows"])
def test_cross_entropy_int_labels(classes):
    x = arr(5, classes, lo=-3, hi=3)
    y = np.array([0, classes - 1, 2, 1, 3])
    run(lambda a, b: F.cross_entropy(a, b), [x, y], rtol=1e-5)
    y2 = y.copy()
    y2[2] = -1                                           # ignored
    run(lambda a, b: F.cross_entropy(a, b), [x, y2], rtol=1e-5)
    run(lambda a, b: F.cross_entropy(a, b, label_smoothing=0.1), [x, y], rtol=1e-5)


def test_cross_entropy_probabilities_and_bce():
    x = arr(4, 3)
    p = RNG.dirichlet(np.ones(3), 4).astype(np.float32)
    run(lambda a, b: F.cross_entropy(a, b), [x, p])
    run(lambda a, b: F.binary_cross_entropy_with_logits(a, b), [x, (p > 0.3).astype(np.float32)])
    run(lambda a, b: F.mse_loss(a, b), [x, p])


def test_cross_entropy_label_out_of_range_is_reported():
    x = jn.ones((2, 3)).to("cuda")
    loss = F.cross_entropy(x, jn.tensor([0, 3]).to("cuda"))
    with pytest.raises(IndexError, match="cross_entropy: label 3 is out of bounds for size 3"):
        loss.item()


# --------------------------------------------------------------------------------------------------------------
# Gathers, scatters, indexing, shape ops
# --------------------------------------------------------------------------------------------------------------

def test_take_scatter_add_embedding_duplicates():
    x = arr(4, 3)
    idx = np.array([[0, 3], [3, -1]])
    run(lambda a, i: jn.take(a, i, axis=0), [x, idx])
    run(lambda a, i: jn.take(a, i, axis=1), [x, np.array([2, 0, 2])])
    run(lambda a, i, u: jn.scatter_add(a, i, u, axis=0), [x, np.array([1, 1, 3]), arr(3, 3)])
    run(lambda w, i: embedding(w, i),
        [x, np.array([[1, 1], [0, 3]])])
    run(lambda i: jn.one_hot(i, 4), [np.array([0, 3, -1, 2])], grad=False)


def test_take_along_axis_sort_topk():
    x = np.array([[3.0, 1.0, 2.0, 1.0], [0.5, np.nan, -1.0, 0.5], [2.0, 2.0, 2.0, -3.0]], np.float32)
    run(lambda a: (jn.argsort(a, -1), jn.argsort(a, 0), jn.argsort(a, -1, descending=True)), [x], grad=False)
    y = arr(3, 5)
    run(lambda a: jn.sort(a, -1), [y])
    run(lambda a: jn.sort(a, 0, descending=True), [y])
    run(lambda a: jn.top_k(a, 2)[0], [y])
    run(lambda a: jn.top_k(a, 3)[1], [y], grad=False)
    run(lambda a, i: jn.take_along_axis(a, i, 1), [y, np.array([[0, 4], [1, 1], [3, 2]])])


def test_getitem_basic_and_advanced_with_gradients():
    x = arr(4, 5, 3)
    run(lambda a: a[1:3, ::2, -1], [x])
    run(lambda a: a[::-1, 1, None], [x])
    run(lambda a: a[..., 0], [x])
    run(lambda a: a[2, 3, 1], [x])
    run(lambda a, i: a[i], [x, np.array([3, 0, 3])])                    # duplicates accumulate in the gradient
    run(lambda a, i: a[:, i, 1:], [x, np.array([[4, -1], [0, 2]])])
    run(lambda a, i, j: a[i, j], [x, np.array([0, 3, 3]), np.array([1, 4, 4])])
    run(lambda a, i: a[1, :, i], [x, np.array([2, 0])])                 # int and array apart: dims go first
    run(lambda a: a[[2, 0]], [x])                                        # a list index moves to the GPU


def test_shape_ops_concat_pad_flip():
    a, b = arr(2, 3), arr(2, 4)
    run(lambda x, y: jn.concatenate([x, y], axis=1), [a, b])
    run(lambda x: jn.stack([x, x * 2], axis=0), [a])
    run(lambda x: jn.split(x, [1, 2], axis=1)[1], [a])
    run(lambda x: jn.pad(x, ((1, 0), (2, 1)), constant_values=-1.0), [a])
    run(lambda x: jn.flip(x, 1), [a])
    run(lambda x: jn.reshape(x.T, (3, 2)), [a])
    run(lambda x: jn.broadcast_to(x[:, :1], (2, 5)), [a])
    run(lambda x: jn.moveaxis(x[None], 0, 2), [a])


def test_cumsum_cumprod():
    x = arr(3, 4, lo=0.5, hi=1.5)
    run(lambda a: jn.cumsum(a, 1), [x])
    run(lambda a: jn.cumsum(a, 0, exclusive=True, reverse=True), [x])
    run(lambda a: jn.cumprod(a, 1, reverse=True), [x], grad_rtol=2e-4)
    run(lambda a: jn.cumsum(a, 0), [np.array([[1, 2], [3, 4]], np.int32)], grad=False)


# --------------------------------------------------------------------------------------------------------------
# Convolution, pooling
# --------------------------------------------------------------------------------------------------------------

def test_conv2d_forward_and_gradients():
    x, w, b = arr(2, 2, 5, 4), arr(3, 2, 3, 2), arr(3)
    run(lambda a, k, c: F.conv2d(a, k, c, stride=(2, 1), padding=1), [x, w, b], atol=1e-5, grad_rtol=2e-4)
    run(lambda a, k: F.conv2d(a, k, padding="same", dilation=(1, 2)), [x, arr(2, 2, 3, 2)], atol=1e-5,
        grad_rtol=2e-4)


def test_pooling_forward_and_gradients():
    x = arr(1, 2, 5, 5)
    run(lambda a: F.max_pool2d(a, 2), [x])
    run(lambda a: F.max_pool2d(a, 3, stride=2, padding=1), [x])
    run(lambda a: F.avg_pool2d(a, 3, stride=2, padding=1), [x])
    run(lambda a: F.avg_pool2d(a, 2, count_include_pad=False), [x])


# --------------------------------------------------------------------------------------------------------------
# Random numbers
# --------------------------------------------------------------------------------------------------------------

def test_random_on_device_is_seeded_and_has_the_right_distribution():
    with jn.device("cuda"):
        jn.random.seed(5)
        u1 = jn.random.uniform((256,), -1.0, 3.0)
        n1 = jn.random.normal((256,), 2.0, 0.5)
        jn.random.seed(5)
        u2 = jn.random.uniform((256,), -1.0, 3.0)
        t = jn.random.truncated_normal((256,), 0.0, 1.0)
        b = jn.random.bernoulli(0.25, (256,))
        r = jn.random.randint(3, 7, (256,))
    assert u1.is_cuda and n1.is_cuda and t.is_cuda and b.is_cuda and r.is_cuda
    u1, u2, n1, t, b, r = (v.numpy() for v in (u1, u2, n1, t, b, r))
    np.testing.assert_array_equal(u1, u2)
    assert u1.dtype == np.float32 and -1 <= u1.min() and u1.max() < 3 and abs(u1.mean() - 1.0) < 0.25
    assert abs(n1.mean() - 2.0) < 0.15 and 0.35 < n1.std() < 0.65
    assert np.abs(t).max() <= 2.0 and 0.6 < t.std() < 1.1
    assert set(np.unique(b)) <= {0.0, 1.0} and 0.1 < b.mean() < 0.4
    assert r.dtype == np.int64 and set(np.unique(r)) == {3, 4, 5, 6}
    assert len(np.unique(u1)) > 250                    # no repeated counters


def test_dropout_on_the_gpu():
    x = jn.ones((64,)).to("cuda")
    jn.random.seed(0)
    y = F.dropout(x, 0.5).numpy()
    assert set(np.unique(y)) <= {0.0, 2.0} and 10 < (y == 0).sum() < 54
