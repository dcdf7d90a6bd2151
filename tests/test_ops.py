"""Every primitive forward against NumPy and backward against central differences (float64), on random
shapes with broadcasting and non-contiguous (transposed, step-sliced, broadcast) operands; dtypes; random.

One suite for every device: each test takes the ``device`` fixture ("cpu" here; tests/cuda/test_ops_cuda.py runs
the same functions with "cuda", tiny shapes and fewer hypothesis examples), creates its tensors with
``.to(device)``, checks that results stay on the device and reads them with ``.numpy()``.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import (Operand, PerDevice, assert_close, dev_nonscalar_shapes, dev_pair_shapes, dev_shapes, devtype,
                     given_on, gradcheck, layouts, sample, seeds, to_device)
from hypothesis import strategies as st

import jitnet as jn
from jitnet import kernels_cpu as K, ops
from jitnet.compiler import native


def T(data, device, dtype=None, requires_grad=False):
    """Return ``data`` as a tensor on ``device`` (created on the CPU and moved with ``.to``)."""
    t = to_device(data, device, dtype)
    return t.requires_grad_() if requires_grad else t


def on_cuda(device):
    return devtype(device) == "cuda"


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# name, jitnet function, NumPy reference, input domain
UNARY = [
    ("negative", jn.negative, np.negative, "any"),
    ("exp", jn.exp, np.exp, "any"),
    ("log", jn.log, np.log, "pos"),
    ("log1p", jn.log1p, np.log1p, "gt-1"),
    ("sqrt", jn.sqrt, np.sqrt, "pos"),
    ("abs", jn.abs, np.abs, "nz"),
    ("sign", jn.sign, np.sign, "nz"),
    ("square", jn.square, np.square, "any"),
    ("reciprocal", jn.reciprocal, np.reciprocal, "nz"),
    ("sin", jn.sin, np.sin, "any"),
    ("cos", jn.cos, np.cos, "any"),
    ("tanh", jn.tanh, np.tanh, "any"),
    ("sigmoid", jn.sigmoid, _sigmoid, "any"),
    ("relu", jn.relu, lambda x: np.maximum(x, 0), "nz"),
    ("softplus", jn.softplus, lambda x: np.logaddexp(0, x), "any"),
]
NONDIFF_UNARY = {"sign"}


@pytest.mark.parametrize("name,f,ref,domain", UNARY, ids=[u[0] for u in UNARY])
@given_on("some", shape=dev_shapes, layout=layouts, seed=seeds)
def test_unary_forward(device, name, f, ref, domain, shape, layout, seed):
    op = Operand(shape, layout, seed, domain)
    for dt in (np.float32, np.float64):
        out = f(op.tensor(dt, device))
        assert_close(out, ref(op.array(np.float64)), rtol=2e-6 if dt == np.float32 else 1e-12,
                     atol=1e-6 if dt == np.float32 else 1e-12, dtype=dt, device=device)


@pytest.mark.parametrize("name,f,ref,domain", [u for u in UNARY if u[0] not in NONDIFF_UNARY],
                         ids=[u[0] for u in UNARY if u[0] not in NONDIFF_UNARY])
@given_on("few", shape=dev_shapes, layout=layouts, seed=seeds)
def test_unary_grad(device, name, f, ref, domain, shape, layout, seed):
    op = Operand(shape, layout, seed, domain)
    gradcheck(lambda x: f(op.view(x)), op.base, device=device)


def test_sign_has_no_gradient(device):
    x = T([-2.0, 3.0], device, requires_grad=True)
    y = (jn.sign(x) * x).sum()
    y.backward()
    assert_close(x.grad, [-1.0, 1.0], rtol=0, atol=0, device=device)


def test_unary_on_integers(device):
    i = T([-2, 0, 3], device)
    assert jn.negative(i).dtype == jn.int64 and jn.negative(i).tolist() == [2, 0, -3]
    assert_close(jn.abs(i), [2, 0, 3], device=device)
    assert jn.sign(i).tolist() == [-1, 0, 1]
    assert jn.square(i).tolist() == [4, 0, 9]
    assert jn.relu(i).tolist() == [0, 0, 3]
    e = jn.exp(i)
    assert e.dtype == jn.float32            # float functions of integers give the default float
    assert_close(e, np.exp([-2.0, 0.0, 3.0]), device=device)


@pytest.mark.parametrize("f,ref", [(jn.floor, np.floor), (jn.ceil, np.ceil)], ids=["floor", "ceil"])
def test_floor_ceil(device, f, ref):
    a = np.array([[-1.5, 0.0, 2.5], [3.0, -0.2, 0.4]])
    for dt in (np.float32, np.float64):
        assert_close(f(T(a, device, dt).T), ref(a.astype(dt)).T, rtol=0, atol=0, dtype=dt, device=device)


def test_unary_edge_values(device):
    x = T([0.0, -1.0, np.inf, np.nan], device)
    assert_close(jn.log(x), [-np.inf, np.nan, np.inf, np.nan], device=device)
    assert_close(jn.sqrt(x), [0.0, np.nan, np.inf, np.nan], device=device)
    assert_close(jn.log1p(T([-1.0, -2.0], device)), [-np.inf, np.nan], device=device)
    assert_close(jn.sign(x), [0.0, -1.0, 1.0, np.nan], device=device)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_sigmoid_softplus_stable(device, dt):
    x = T([-1000.0, -50.0, 0.0, 50.0, 1000.0], device, dt)
    s = jn.sigmoid(x).numpy()
    sp = jn.softplus(x).numpy()
    assert np.isfinite(s).all() and np.isfinite(sp).all()
    np.testing.assert_allclose(s, [0.0, _sigmoid(-50.0), 0.5, 1.0, 1.0], rtol=1e-6, atol=0)
    np.testing.assert_allclose(sp, [0.0, np.log1p(np.exp(-50.0)), np.log(2), 50.0, 1000.0], rtol=1e-6, atol=0)
    xg = T([-1000.0, 1000.0], device, dt, requires_grad=True)
    (jn.sigmoid(xg).sum() + jn.softplus(xg).sum()).backward()
    assert np.isfinite(xg.grad.numpy()).all()
    assert_close(xg.grad, [0.0, 1.0], atol=1e-6, device=device)


# ---------------------------------------------------------------------------------------------------------
# Binary elementwise
# ---------------------------------------------------------------------------------------------------------

BINARY = [
    ("add", jn.add, np.add, "any", "any"),
    ("subtract", jn.subtract, np.subtract, "any", "any"),
    ("multiply", jn.multiply, np.multiply, "any", "any"),
    ("divide", jn.divide, np.divide, "any", "nz"),
    ("power", jn.power, np.power, "pos", "any"),
    ("maximum", jn.maximum, np.maximum, "any", "any"),
    ("minimum", jn.minimum, np.minimum, "any", "any"),
]


@pytest.mark.parametrize("name,f,ref,da,db", BINARY, ids=[b[0] for b in BINARY])
@given_on("some", shp=dev_pair_shapes, la=layouts, lb=layouts, seed=seeds)
def test_binary_forward(device, name, f, ref, da, db, shp, la, lb, seed):
    (sa, sb), _ = shp
    a, b = Operand(sa, la, seed, da), Operand(sb, lb, seed + 1, db)
    for dt in (np.float32, np.float64):
        out = f(a.tensor(dt, device), b.tensor(dt, device))
        assert_close(out, ref(a.array(np.float64), b.array(np.float64)),
                     rtol=1e-5 if dt == np.float32 else 1e-12, atol=1e-6 if dt == np.float32 else 1e-12, dtype=dt,
                     device=device)


@pytest.mark.parametrize("name,f,ref,da,db", BINARY, ids=[b[0] for b in BINARY])
@given_on("few", shp=dev_pair_shapes, la=layouts, lb=layouts, seed=seeds)
def test_binary_grad(device, name, f, ref, da, db, shp, la, lb, seed):
    (sa, sb), _ = shp
    a, b = Operand(sa, la, seed, da), Operand(sb, lb, seed + 1, db)
    gradcheck(lambda x, y: f(a.view(x), b.view(y)), a.base, b.base, device=device)


@pytest.mark.parametrize("name,f,ref,da,db", BINARY, ids=[b[0] for b in BINARY])
def test_binary_with_python_scalars(device, name, f, ref, da, db):
    rng = np.random.default_rng(0)
    a = sample(rng, (3, 2), da)
    s = 1.5 if db != "nz" else -0.75
    t = T(a, device, jn.float32)
    assert_close(f(t, s), ref(a.astype(np.float32), np.float32(s)), dtype=jn.float32, device=device)
    if name != "power":
        assert_close(f(s, t), ref(np.float32(s), a.astype(np.float32)), dtype=jn.float32, device=device)
    gradcheck(lambda x: f(x, s), a, device=device)


def test_binary_operators_and_reflected(device):
    a = T([1.0, 2.0, 4.0], device)
    assert_close(2 - a, [1.0, 0.0, -2.0], device=device)
    assert_close(2 / a, [2.0, 1.0, 0.5], device=device)
    assert_close(2 ** a, [2.0, 4.0, 16.0], device=device)
    assert_close(a ** 2, [1.0, 4.0, 16.0], device=device)
    assert_close(-a + 1, [0.0, -1.0, -3.0], device=device)
    assert_close(a @ a, 21.0, device=device)
    assert_close(T([7, -7], device) // 2, [3, -4], device=device)
    assert_close(T([7, -7], device) % 3, [1, 2], device=device)
    assert_close(T([7.5, -7.5], device) % 2.0, [1.5, 0.5], device=device)


def test_integer_division_bitwise_and_int32(device):
    a = np.array([[7, -7, 5], [0, 9, -3]], np.int64)
    b = np.array([2, -3, 1], np.int64)
    ta, tb = T(a, device), T(b, device)
    assert_close(jn.floor_divide(ta, tb), a // b, dtype=jn.int64, device=device)
    assert_close(jn.remainder(ta, tb), a % b, dtype=jn.int64, device=device)
    assert_close(jn.maximum(ta, tb), np.maximum(a, b), dtype=jn.int64, device=device)
    assert_close((ta & tb) | (ta ^ ~tb), (a & b) | (a ^ ~b), dtype=jn.int64, device=device)
    i32 = T(a.astype(np.int32), device)
    assert_close(i32 * 3 - 1, a.astype(np.int32) * 3 - 1, dtype=jn.int32, device=device)
    assert_close(i32.astype(jn.float32) * 0.5, a.astype(np.float32) * 0.5, dtype=jn.float32, device=device)


def test_maximum_minimum_gradient_at_ties_is_not_doubled(device):
    x = T([1.0, 2.0], device, requires_grad=True)
    y = T([1.0, 3.0], device, requires_grad=True)
    jn.maximum(x, y).sum().backward()
    # a tie sends the whole gradient to one operand (the sum of both is the true total, 1)
    np.testing.assert_array_equal(x.grad.numpy() + y.grad.numpy(), [1.0, 1.0])


@given_on("few", shp=dev_pair_shapes, seed=seeds)
def test_comparisons_and_logical(device, shp, seed):
    (sa, sb), _ = shp
    rng = np.random.default_rng(seed)
    a = rng.integers(-2, 3, sa).astype(np.float32)
    b = rng.integers(-2, 3, sb).astype(np.float32)
    ta, tb = T(a, device), T(b, device)
    for f, ref in [(jn.less, np.less), (jn.less_equal, np.less_equal), (jn.greater, np.greater),
                   (jn.greater_equal, np.greater_equal), (jn.equal, np.equal), (jn.not_equal, np.not_equal)]:
        assert_close(f(ta, tb), ref(a, b), dtype=jn.bool_, device=device)
    assert_close(ta < tb, a < b, dtype=jn.bool_, device=device)
    assert_close(ta == tb, a == b, dtype=jn.bool_, device=device)
    assert_close(ta != 0.0, a != 0, dtype=jn.bool_, device=device)
    pa, pb = a > 0, b > 0
    qa, qb = T(pa, device), T(pb, device)
    for f, ref in [(jn.logical_and, np.logical_and), (jn.logical_or, np.logical_or),
                   (jn.logical_xor, np.logical_xor)]:
        assert_close(f(qa, qb), ref(pa, pb), dtype=jn.bool_, device=device)
    assert_close(qa & qb, pa & pb, dtype=jn.bool_, device=device)
    assert_close(qa | qb, pa | pb, dtype=jn.bool_, device=device)
    assert_close(qa ^ qb, pa ^ pb, dtype=jn.bool_, device=device)
    assert_close(~qa, ~pa, dtype=jn.bool_, device=device)
    assert_close(jn.logical_not(qa), ~pa, dtype=jn.bool_, device=device)
    ia, ib = a.astype(np.int64), b.astype(np.int64)
    assert_close(T(ia, device) & T(ib, device), ia & ib, dtype=jn.int64, device=device)
    assert_close(jn.isnan(T([np.nan, 1.0], device)), [True, False], device=device)
    assert_close(jn.isfinite(T([np.inf, np.nan, 1.0, -np.inf], device)), [False, False, True, False], device=device)


def test_comparison_int_with_float_scalar_is_exact(device):
    # the comparison runs in float64 (not in the scalar's float32, which cannot hold 2**24 + 1)
    t = T([2 ** 24 + 1], device)
    assert (t > float(2 ** 24)).tolist() == [True]
    assert (T([1, 2, 3], device) < 2.5).tolist() == [True, True, False]


@given_on("some", shape=dev_shapes, layout=layouts, seed=seeds)
def test_clip(device, shape, layout, seed):
    op = Operand(shape, layout, seed)
    assert_close(jn.clip(op.tensor(device=device), -0.5, 0.7), np.clip(op.array(), -0.5, 0.7), device=device)
    assert_close(jn.clip(op.tensor(device=device), None, 0.7), np.clip(op.array(), None, 0.7), device=device)
    assert_close(jn.clip(op.tensor(device=device), -0.5, None), np.clip(op.array(), -0.5, None), device=device)
    gradcheck(lambda x: jn.clip(op.view(x), -0.5, 0.7), op.base, device=device)


@given_on("some", shp=PerDevice(*(st.tuples(dev_pair_shapes.on(d), st.booleans()) for d in ("cpu", "cuda"))),
          la=layouts, seed=seeds)
def test_where(device, shp, la, seed):
    ((sa, sb), _), cond_first = shp
    rng = np.random.default_rng(seed)
    a = Operand(sa, la, seed)
    b = Operand(sb, "c", seed + 1)
    c = rng.random(sa if cond_first else sb) > 0.5
    out = jn.where(T(c, device), a.tensor(device=device), b.tensor(device=device))
    assert_close(out, np.where(c, a.array(), b.array()), device=device)
    gradcheck(lambda x, y: jn.where(T(c, device), a.view(x), b.view(y)), a.base, b.base, device=device)
    assert_close(jn.where(T(c, device), a.tensor(device=device), 0.0), np.where(c, a.array(), np.float32(0)),
                 dtype=jn.float32, device=device)


# ---------------------------------------------------------------------------------------------------------
# dtypes and casting
# ---------------------------------------------------------------------------------------------------------

def test_default_dtypes(device):
    assert T([1.0], device).dtype == jn.float32
    assert T(1.0, device).dtype == jn.float32
    assert T([1, 2], device).dtype == jn.int64
    assert T([True], device).dtype == jn.bool_
    assert T(np.array([1.0]), device).dtype == jn.float64       # NumPy arrays keep their dtype
    assert T([1.0], device, jn.float64).dtype == jn.float64
    assert T([1], device, jn.int32).dtype == jn.int32
    assert jn.zeros((2,)).to(device).dtype == jn.float32 and jn.ones((2,)).to(device).dtype == jn.float32
    assert jn.arange(3).to(device).dtype == jn.int64 and jn.arange(0.0, 1.0, 0.5).to(device).dtype == jn.float32


def test_python_scalars_do_not_widen(device):
    f32 = T([1.0, 2.0], device)
    assert (f32 * 2.0).dtype == jn.float32
    assert (2.0 * f32).dtype == jn.float32
    assert (f32 + 1).dtype == jn.float32
    assert (f32 ** 2).dtype == jn.float32
    assert (f32 / 3).dtype == jn.float32
    assert (T([1.0], device, jn.float64) * 2.0).dtype == jn.float64
    i64 = T([1, 2], device)
    r = i64 + 1.5
    assert r.dtype == jn.float32
    assert_close(r, [2.5, 3.5], device=device)
    assert (i64 * 1.5).dtype == jn.float32
    assert (i64 + 1).dtype == jn.int64
    i32 = T([1, 2], device, jn.int32)
    assert (i32 + 1).dtype == jn.int32
    assert (i32 * 2).dtype == jn.int32
    assert (T([True, False], device) + 1).dtype == jn.int64
    assert (i32 / 2).dtype == jn.float32          # true division of integers gives the default float
    assert_close(i32 / 2, [0.5, 1.0], device=device)
    assert (T([1.0], device) < 2).dtype == jn.bool_


def test_mixed_tensor_promotion(device):
    a = T([1.0], device, jn.float32)
    b = T([1.0], device, jn.float64)
    assert (a + b).dtype == jn.float64
    assert (T([1], device, jn.int32) + T([1], device)).dtype == jn.int64
    # integers meeting floats take the float's dtype (PyTorch/JAX rule; NumPy would give float64)
    assert (T([1], device) + a).dtype == jn.float32


@pytest.mark.parametrize("src", [np.float32, np.float64, np.int32, np.int64, np.bool_])
@pytest.mark.parametrize("dst", [np.float32, np.float64, np.int32, np.int64, np.bool_])
def test_astype(device, src, dst):
    a = np.array([[0, 1.5, -2.25], [3, 0, 7]])[:, ::-1].astype(src)   # non-contiguous source
    if on_cuda(device):                                                  # a reversed view on the GPU
        t, ref = T(a, device)[:, ::-1], a[:, ::-1]
    else:
        t, ref = (jn.tensor(a) if a.flags.c_contiguous else jn.as_tensor(a)), a
    out = jn.astype(t, dst)
    assert_close(out, ref.astype(dst), dtype=dst, device=device)
    assert_close(t.astype(dst), ref.astype(dst), dtype=dst, device=device)


def test_cast_and_copy_gradient(device):
    # a float32 round trip: differences need a step well above float32's resolution
    gradcheck(lambda x: jn.astype(x, jn.float32).astype(jn.float64) * 3, np.array([1.0, 2.0]), eps=1e-3, atol=1e-3,
              device=device)
    x = T([1.5, 2.5], device, requires_grad=True)
    y = (x.astype(jn.float64) * 2).sum()
    y.backward()
    assert x.grad.dtype == jn.float32
    assert_close(x.grad, [2.0, 2.0], rtol=0, atol=0, device=device)
    z = x.astype(jn.int64)
    assert not z.requires_grad
    a = np.arange(6.0).reshape(2, 3)
    c = jn.copy(T(a, device).T)
    assert_close(c, a.T, rtol=0, atol=0, device=device)
    gradcheck(lambda v: jn.copy(v.T) * T(np.arange(6.0).reshape(3, 2), device), a, device=device)


def test_tensor_python_protocols(device):
    sfx = ", device='cuda:0'" if on_cuda(device) else ""
    x = T([[2.0]], device)
    assert repr(jn.matmul(x, x)) == f"Tensor([[4.]], shape=(1, 1), dtype=float32{sfx})"
    r = T([[2.0]], device, requires_grad=True)
    assert repr(r) == f"Tensor([[2.]], shape=(1, 1), dtype=float32{sfx}, requires_grad=True)"
    assert repr(jn.matmul(r, r)) == f"Tensor([[4.]], shape=(1, 1), dtype=float32{sfx}, requires_grad=True)"
    t = T([[1.0, 2.0], [3.0, 4.0]], device)
    if not on_cuda(device):                      # NumPy functions read a CPU tensor's memory directly
        sq = np.square(t)
        assert isinstance(sq, np.ndarray) and sq.tolist() == [[1.0, 4.0], [9.0, 16.0]]
        assert np.asarray(t).dtype == np.float32
        assert np.asarray(t, dtype=np.float64).dtype == np.float64
    rows = list(t)
    assert len(rows) == 2 and all(isinstance(rw, jn.Tensor) and rw.device.type == devtype(device) for rw in rows)
    assert rows[1].tolist() == [3.0, 4.0]
    assert [float(v) for v in T([1.0, 2.0], device)] == [1.0, 2.0]
    assert [v + 1 for v in T([1.0, 2.0], device)][1].item() == 3.0
    assert t[1, 0].item() == 3.0 and isinstance(t[1, 0].item(), float)
    assert T([5], device).item() == 5 and isinstance(T([5], device).item(), int)
    with pytest.raises(ValueError):
        t.item()
    assert len(t) == 2 and t.shape == (2, 2) and t.ndim == 2 and t.size == 4
    with pytest.raises(TypeError):
        iter(T(1.0, device)).__next__()
    g = T([1.0], device, requires_grad=True)
    d = (g * 2).detach()
    assert not d.requires_grad and d.is_leaf
    assert d.tolist() == [2.0]
    assert bool(T([1.0], device)) and not bool(T(0.0, device))
    with pytest.raises(ValueError):
        bool(t)
    assert_close(t.T, [[1.0, 3.0], [2.0, 4.0]], device=device)


# ---------------------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------------------

@st.composite
def shape_and_axis(draw, shapes, multi=True, allow_none=True):
    shape = draw(shapes)
    nd = len(shape)
    opts = [st.integers(-nd, nd - 1)]
    if allow_none:
        opts.append(st.none())
    if multi:
        opts.append(st.lists(st.integers(0, nd - 1), min_size=1, max_size=nd, unique=True).map(tuple))
    return shape, draw(st.one_of(*opts)), draw(st.booleans())


dev_shape_and_axis = PerDevice(shape_and_axis(dev_nonscalar_shapes.on("cpu")),
                               shape_and_axis(dev_nonscalar_shapes.on("cuda")))


def _np_reduce(name, a, axis, keepdims):
    ax = tuple(axis) if isinstance(axis, tuple) else axis
    if name == "logsumexp":
        m = np.max(a, axis=ax, keepdims=True)
        r = np.log(np.sum(np.exp(a - m), axis=ax, keepdims=True)) + m
        return r if keepdims else np.squeeze(r, axis=ax if ax is not None else None) if r.ndim else r
    return getattr(np, name)(a, axis=ax, keepdims=keepdims)


REDUCTIONS = [
    ("sum", jn.sum, "any"), ("mean", jn.mean, "any"), ("max", jn.max, "distinct"), ("min", jn.min, "distinct"),
    ("prod", jn.prod, "nz"), ("var", jn.var, "any"), ("std", jn.std, "distinct"),
    ("logsumexp", jn.logsumexp, "any"),
]


@pytest.mark.parametrize("name,f,domain", REDUCTIONS, ids=[r[0] for r in REDUCTIONS])
@given_on("some", sak=dev_shape_and_axis, layout=st.sampled_from(["c", "t", "s", "r"]), seed=seeds)
def test_reduction_forward(device, name, f, domain, sak, layout, seed):
    shape, axis, keepdims = sak
    op = Operand(shape, layout, seed, domain)
    for dt in (np.float32, np.float64):
        out = f(op.tensor(dt, device), axis=axis, keepdims=keepdims)
        ref = _np_reduce(name, op.array(np.float64), axis, keepdims)
        assert_close(out, ref, rtol=2e-5 if dt == np.float32 else 1e-10, atol=2e-6 if dt == np.float32 else 1e-12,
                     dtype=dt, device=device)
    m = getattr(op.tensor(device=device), name, None)
    if m is not None:
        assert_close(m(axis=axis, keepdims=keepdims), _np_reduce(name, op.array(np.float64), axis, keepdims),
                     rtol=2e-5, atol=2e-6, device=device)


@pytest.mark.parametrize("name,f,domain", REDUCTIONS, ids=[r[0] for r in REDUCTIONS])
@given_on("few", sak=dev_shape_and_axis, layout=st.sampled_from(["c", "t", "s", "r"]), seed=seeds)
def test_reduction_grad(device, name, f, domain, sak, layout, seed):
    shape, axis, keepdims = sak
    op = Operand(shape, layout, seed, domain)
    if name == "std" and (int(np.prod(shape)) == 1 or axis is not None and all(
            shape[a] == 1 for a in ((axis,) if isinstance(axis, int) else axis))):
        return                                          # std of one element: sqrt at 0, no derivative
    gradcheck(lambda x: f(op.view(x), axis=axis, keepdims=keepdims), op.base, device=device)


def test_reduction_broadcast_input_and_ties(device):
    # a broadcast (zero-stride) input reduces correctly, and max's gradient is shared among ties
    b = jn.broadcast_to(T([[1.0], [2.0]], device), (2, 3))
    assert_close(jn.sum(b, axis=1), [3.0, 6.0], device=device)
    x = T([1.0, 3.0, 3.0], device, requires_grad=True)
    jn.max(x).backward()
    assert_close(x.grad, [0.0, 0.5, 0.5], device=device)


def test_reductions_ints_bools_and_ddof(device):
    i = T([[1, 2], [3, 4]], device, jn.int32)
    assert jn.sum(i).dtype == jn.int64 and jn.sum(i).item() == 10
    assert_close(jn.sum(i, axis=0), [4, 6], dtype=jn.int64, device=device)
    assert jn.prod(i, axis=0).tolist() == [3, 8]
    assert jn.max(i, axis=1).dtype == jn.int32 and jn.max(i, axis=1).tolist() == [2, 4]
    assert jn.mean(i).dtype == jn.float32 and jn.mean(i).item() == 2.5
    bl = T([[True, False], [True, True]], device)
    assert_close(jn.all(bl, axis=1), [False, True], device=device)
    assert jn.any(bl, axis=0).tolist() == [True, True]
    assert jn.any(bl).item() is True and jn.all(bl).item() is False
    assert jn.sum(bl).item() == 3
    a = np.array([1.0, 2.0, 4.0, 7.0])
    assert_close(jn.var(T(a, device), ddof=1), np.var(a.astype(np.float32), ddof=1), device=device)
    assert_close(jn.std(T(a, device), ddof=1), np.std(a.astype(np.float32), ddof=1), device=device)
    assert_close(jn.sum(T(3.0, device)), 3.0, device=device)
    assert_close(jn.sum(jn.zeros((0, 3)).to(device), axis=0), np.zeros(3), device=device)
    with pytest.raises(ValueError, match="zero-size"):
        jn.zeros((0, 3)).to(device).max(axis=0)


def test_max_min_propagate_nan(device):
    a = np.array([[1.0, np.nan, 3.0], [2.0, 5.0, -1.0]], np.float32)
    t = T(a, device)
    for f, ref in [(jn.max, np.max), (jn.min, np.min), (jn.sum, np.sum)]:
        assert_close(f(t, axis=1), ref(a, axis=1), device=device)
        assert_close(f(t, axis=0), ref(a, axis=0), device=device)


def test_prod_gradient_with_zeros(device):
    # the product of the others, not prod / x (which is NaN at a zero)
    g = jn.grad(lambda x: jn.prod(x))(T([0.0, 2.0, 3.0], device))
    assert_close(g, [6.0, 0.0, 0.0], rtol=0, atol=0, device=device)
    a = np.arange(12.0).reshape(2, 3, 2) - 4.0
    g2 = jn.grad(lambda x: jn.prod(x, axis=(0, 2)).sum())(T(a, device))
    expect = np.zeros_like(a)
    for j in range(3):
        blk = a[:, j, :].reshape(-1)
        for i in range(4):
            expect[i // 2, j, i % 2] = np.prod(np.delete(blk, i))
    assert_close(g2, expect, rtol=1e-7, atol=0, device=device)
    gradcheck(lambda x: jn.prod(x, axis=1), np.array([[0.0, 1.5, -2.0], [0.5, 0.0, 0.0]]), device=device)


def test_large_reductions_use_parallel_kernels(device):
    if on_cuda(device):
        pytest.skip("the CPU's parallel kernels; the GPU's multi-pass reductions: tests/cuda/test_cuda_kernels.py")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 400))
    t = jn.tensor(a)
    for axis in (0, 1, None, (0, 1)):
        assert_close(jn.sum(t, axis=axis), a.sum(axis=axis), rtol=1e-10)
        assert_close(jn.max(t, axis=axis), a.max(axis=axis))
    assert_close(jn.sum(t.T, axis=0), a.T.sum(axis=0), rtol=1e-10)


def test_small_leading_sums_in_numpy_equal_the_kernel_bit_for_bit(device):
    """Float sums over leading axes of at most ops._NUMPY_SUM_MAX elements run in NumPy (no kernel to compile
    on a cold start): the same bits as kernels_cpu.reduce_first, eagerly, in a plan step and in a native
    driver."""
    if on_cuda(device):
        pytest.skip("the CPU's reduction paths")
    rng = np.random.default_rng(5)
    for shape, axes in (((128, 256), (0,)), ((1000, 3), (0,)), ((4, 6, 5), (0, 1)), ((7, 5), (0,))):
        for dt in (np.float32, np.float64):
            a = rng.standard_normal(shape).astype(dt)
            m = a.size // int(np.prod([shape[i] for i in axes]))
            ref = np.empty(m, dt)
            K.reduce_first(a.reshape(-1, m), ref, ops._RED_CODE["sum"])
            ref = ref.reshape(shape[len(axes):])
            assert a.size <= ops._NUMPY_SUM_MAX
            np.testing.assert_array_equal(jn.sum(jn.tensor(a), axis=axes).numpy(), ref)
            jf = jn.jit(lambda x: jn.sum(x * 1.0, axis=axes) + 0.0)
            for _ in range(native.NATIVE_AFTER + 2):         # trace, plan steps, native driver
                np.testing.assert_array_equal(jf(jn.tensor(a)).numpy(), ref)


@pytest.mark.parametrize("shape,axes", [((4, 3, 5, 6), (0, 2, 3)), ((2, 3, 4), (0, 2)), ((5, 2, 3, 4), (0, 3)),
                                        ((3, 4, 5, 6, 2), (0, 1, 4)), ((64, 8, 20, 20), (0, 2, 3))])
def test_reductions_over_leading_and_trailing_axes(device, shape, axes):
    """Kept axes in the middle (batch-norm statistics over (0, 2, 3)) reduce in place, serial and parallel,
    eagerly and jitted, with NaN propagation for max/min like NumPy."""
    if on_cuda(device):
        shape = tuple(min(s, 3) for s in shape)
    a = np.random.default_rng(1).standard_normal(shape)
    a.flat[7] = np.nan
    for op in ("sum", "max", "min", "prod"):
        f = getattr(jn, op)
        ref = getattr(np, op)(a, axis=axes)
        assert_close(f(T(a, device), axis=axes), ref, rtol=1e-10, device=device)
        assert_close(jn.jit(lambda x: f(x, axis=axes) * 2.0)(T(a, device)), ref * 2, rtol=1e-10, device=device)
    b = a.astype(np.float32)
    b.flat[7] = 0
    assert_close(jn.sum(T(b, device), axis=axes), b.astype(np.float64).sum(axis=axes), rtol=1e-4, atol=1e-3,
                 dtype=np.float32, device=device)


@given_on("some", shape=dev_nonscalar_shapes, layout=st.sampled_from(["c", "t", "s", "r"]), seed=seeds,
          data=st.data())
def test_argmax_argmin(device, shape, layout, seed, data):
    op = Operand(shape, layout, seed, "distinct")
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    keepdims = data.draw(st.booleans())
    a = op.array()
    for f, ref in [(jn.argmax, np.argmax), (jn.argmin, np.argmin)]:
        out = f(op.tensor(device=device), axis=axis, keepdims=keepdims)
        assert_close(out, ref(a, axis=axis, keepdims=keepdims), dtype=jn.int64, device=device)


def test_argmax_argmin_ties_and_nan(device):
    ties = T([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]], device)
    assert jn.argmax(ties, axis=1).tolist() == [1, 0]          # the first maximum, as in NumPy
    assert jn.argmin(ties, axis=1).tolist() == [0, 2]
    a = np.array([[1.0, 3.0, 3.0, -1.0], [np.nan, 2.0, np.nan, 0.0], [0.0, -2.0, -2.0, 5.0]], np.float32)
    t = T(a, device)
    assert_close(jn.argmax(t, 1), np.argmax(a, 1), dtype=jn.int64, device=device)     # NaN wins, as in NumPy
    assert_close(jn.argmin(t, 1), np.argmin(a, 1), dtype=jn.int64, device=device)
    assert_close(jn.argmax(t), np.argmax(a), dtype=jn.int64, device=device)
    assert_close(jn.argmin(t, 0, keepdims=True), np.argmin(a, 0, keepdims=True), dtype=jn.int64, device=device)


def _np_cum(a, axis, op, exclusive, reverse):
    x = np.flip(a, axis) if reverse else a
    c = np.cumsum(x, axis) if op == "sum" else np.cumprod(x, axis)
    if exclusive:
        ident = np.full_like(np.take(c, [0], axis), 0 if op == "sum" else 1)
        c = np.concatenate([ident, np.take(c, np.arange(c.shape[axis] - 1), axis)], axis)
    return np.flip(c, axis) if reverse else c


@pytest.mark.parametrize("op", ["sum", "prod"])
@given_on("some", shape=dev_nonscalar_shapes, layout=layouts, seed=seeds, data=st.data())
def test_cumulative(device, op, shape, layout, seed, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    exclusive, reverse = data.draw(st.booleans()), data.draw(st.booleans())
    o = Operand(shape, layout, seed, "nz")
    f = jn.cumsum if op == "sum" else jn.cumprod
    out = f(o.tensor(jn.float64, device), axis, exclusive=exclusive, reverse=reverse)
    assert_close(out, _np_cum(o.array(np.float64), axis, op, exclusive, reverse), rtol=1e-12, atol=1e-12,
                 device=device)
    gradcheck(lambda x: f(o.view(x), axis, exclusive=exclusive, reverse=reverse), o.base, device=device)


def test_cumulative_references_and_ints(device):
    a = T([1, 2, 3, 4], device)
    assert_close(jn.cumsum(a), [1, 3, 6, 10], dtype=jn.int64, device=device)
    assert jn.cumsum(a, exclusive=True).tolist() == [0, 1, 3, 6]
    assert jn.cumsum(a, reverse=True).tolist() == [10, 9, 7, 4]
    assert jn.cumsum(a, exclusive=True, reverse=True).tolist() == [9, 7, 4, 0]
    assert jn.cumprod(a).tolist() == [1, 2, 6, 24]
    assert jn.cumprod(a, exclusive=True).tolist() == [1, 1, 2, 6]
    assert jn.cumprod(a, reverse=True).tolist() == [24, 24, 12, 4]
    assert jn.cumprod(a, exclusive=True, reverse=True).tolist() == [24, 12, 4, 1]
    assert jn.cumsum(T([True, True], device)).dtype == jn.int64
    assert_close(jn.cumsum(T([[1, 2], [3, 4]], device, jn.int32), 0), [[1, 2], [4, 6]], device=device)


# ---------------------------------------------------------------------------------------------------------
# Matmul
# ---------------------------------------------------------------------------------------------------------

MATMUL_SHAPES = [((3,), (3,)), ((2, 3), (3,)), ((3,), (3, 4)), ((2, 3), (3, 4)), ((2, 2, 3), (3, 4)),
                 ((2, 3), (5, 3, 4)), ((4, 1, 2, 3), (5, 3, 2)), ((5, 2, 3), (5, 3, 1)), ((1, 3), (3, 1)),
                 ((2, 3, 4), (4,)), ((4,), (2, 4, 3)), ((3, 2, 3, 4), (4, 2))]


@pytest.mark.parametrize("sa,sb", MATMUL_SHAPES, ids=[f"{a}@{b}" for a, b in MATMUL_SHAPES])
@given_on("few", la=st.sampled_from(["c", "t", "s", "r"]), lb=st.sampled_from(["c", "t", "s", "r"]), seed=seeds)
def test_matmul(device, sa, sb, la, lb, seed):
    a, b = Operand(sa, la, seed), Operand(sb, lb, seed + 1)
    for dt in (np.float32, np.float64):
        out = jn.matmul(a.tensor(dt, device), b.tensor(dt, device))
        assert_close(out, np.matmul(a.array(np.float64), b.array(np.float64)), rtol=1e-5, atol=1e-5, dtype=dt,
                     device=device)
    assert_close(a.tensor(device=device) @ b.tensor(device=device), np.matmul(a.array(), b.array()), rtol=1e-5,
                 atol=1e-5, device=device)
    gradcheck(lambda x, y: jn.matmul(a.view(x), b.view(y)), a.base, b.base, device=device)


# several output tiles, and sides that are not multiples of a tile (the GPU kernels' 16x16 tiles)
TILED_SHAPES = [((9, 17), (17, 10)), ((19, 6), (6, 21))]


@pytest.mark.parametrize("sa,sb", TILED_SHAPES, ids=["multi-tile", "large-tiles"])
def test_matmul_tiles(device, sa, sb):
    rng = np.random.default_rng(3)
    a, b = rng.uniform(-2, 2, sa), rng.uniform(-2, 2, sb)
    assert_close(jn.matmul(T(a, device, jn.float32), T(b, device, jn.float32)), a @ b, rtol=1e-5, atol=1e-5,
                 dtype=jn.float32, device=device)
    gradcheck(jn.matmul, a, b, device=device)


def test_matmul_ints_and_empty(device):
    a = np.arange(6).reshape(2, 3)
    out = jn.matmul(T(a, device), T(a.T.copy(), device))
    assert out.dtype == jn.int64
    assert_close(out, a @ a.T, device=device)
    assert_close(jn.matmul(jn.zeros((2, 0)).to(device), jn.zeros((0, 3)).to(device)), np.zeros((2, 3)),
                 device=device)
    big = np.random.default_rng(0).standard_normal(PerDevice((64, 128), (17, 20)).on(device))
    assert_close(jn.matmul(T(big, device), T(big.T, device)), big @ big.T, rtol=1e-10, atol=1e-10, device=device)


# ---------------------------------------------------------------------------------------------------------
# Shape ops
# ---------------------------------------------------------------------------------------------------------

@given_on("some", shape=dev_shapes, layout=layouts, seed=seeds, data=st.data())
def test_reshape_transpose(device, shape, layout, seed, data):
    op = Operand(shape, layout, seed)
    n = int(np.prod(shape))
    new = data.draw(st.sampled_from([(n,), (1, n), (n, 1), (-1,), ()] if n == 1 else [(n,), (1, n), (-1, 1), (n, 1, 1)]))
    assert_close(jn.reshape(op.tensor(device=device), new), op.array().reshape(new), device=device)
    assert_close(op.tensor(device=device).reshape(*new) if new else op.tensor(device=device).reshape(new), op.array().reshape(new), device=device)
    gradcheck(lambda x: jn.reshape(op.view(x), new) * T(np.arange(n, dtype=np.float64).reshape(
        np.empty(n).reshape(new).shape), device), op.base, device=device)
    perm = data.draw(st.permutations(range(len(shape))))
    assert_close(jn.transpose(op.tensor(device=device), perm), np.transpose(op.array(), perm), device=device)
    w = np.arange(n, dtype=np.float64).reshape(np.transpose(np.empty(shape), perm).shape)
    gradcheck(lambda x: jn.transpose(op.view(x), perm) * T(w, device), op.base, device=device)
    assert_close(jn.transpose(op.tensor(device=device)), op.array().T, device=device)


@given_on("some", shp=dev_pair_shapes, layout=layouts, seed=seeds)
def test_broadcast_to(device, shp, layout, seed):
    (sa, _), target = shp
    op = Operand(sa, layout, seed)
    assert_close(jn.broadcast_to(op.tensor(device=device), target), np.broadcast_to(op.array(), target), device=device)
    w = np.arange(int(np.prod(target)), dtype=np.float64).reshape(target)
    gradcheck(lambda x: jn.broadcast_to(op.view(x), target) * T(w, device), op.base, device=device)


def test_expand_dims_squeeze(device):
    a = np.arange(6.0).reshape(2, 1, 3)
    t = T(a, device)
    assert jn.expand_dims(t, 0).shape == (1, 2, 1, 3)
    assert jn.expand_dims(t, -1).shape == (2, 1, 3, 1)
    assert jn.expand_dims(t, (0, 2)).shape == np.expand_dims(a, (0, 2)).shape
    assert t.unsqueeze(1).shape == (2, 1, 1, 3)
    assert jn.expand_dims(t, np.int64(0)).shape == (1, 2, 1, 3)
    assert jn.squeeze(t).shape == (2, 3)
    assert jn.squeeze(t, 1).shape == (2, 3)
    assert_close(jn.squeeze(t, 1), a.squeeze(1), device=device)
    gradcheck(lambda x: jn.squeeze(x, 1) * T(np.arange(6.0).reshape(2, 3), device), a, device=device)
    gradcheck(lambda x: jn.expand_dims(x.T, 0) * 3, a, device=device)


@given_on("some", shape=dev_nonscalar_shapes, layout=layouts, seed=seeds, data=st.data())
def test_concatenate_stack_split(device, shape, layout, seed, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    ax = axis % len(shape)
    other = tuple(s + 1 if i == ax else s for i, s in enumerate(shape))
    a, b = Operand(shape, layout, seed), Operand(other, "c", seed + 1)
    c = jn.concatenate([a.tensor(device=device), b.tensor(device=device)], axis)
    assert_close(c, np.concatenate([a.array(), b.array()], axis), device=device)
    w = np.arange(c.size, dtype=np.float64).reshape(c.shape)
    gradcheck(lambda x, y: jn.concatenate([a.view(x), b.view(y)], axis) * T(w, device), a.base, b.base, device=device)
    a2 = Operand(shape, "t" if len(shape) > 1 else "r", seed + 2)
    sax = data.draw(st.integers(-len(shape) - 1, len(shape)))
    s = jn.stack([a.tensor(device=device), a2.tensor(device=device)], sax)
    assert_close(s, np.stack([a.array(), a2.array()], sax), device=device)
    ws = np.arange(s.size, dtype=np.float64).reshape(s.shape)
    gradcheck(lambda x, y: jn.stack([a.view(x), a2.view(y)], sax) * T(ws, device), a.base, a2.base, device=device)
    cn = c.numpy()
    n = cn.shape[ax]
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3)))
    parts = jn.split(c, cuts, axis)
    ref = np.split(cn, cuts, axis)
    assert len(parts) == len(ref)
    for p, r in zip(parts, ref):
        assert_close(p, r, device=device)
    if n % 2 == 0:
        for p, r in zip(jn.split(c, 2, axis), np.split(cn, 2, axis)):
            assert_close(p, r, device=device)
    gradcheck(lambda x: jn.split(x, cuts, axis)[-1] * 2, cn, device=device)


def test_concatenate_mixed_dtypes(device):
    c = jn.concatenate([T([1, 2], device), T([0.5], device)])
    assert_close(c, [1.0, 2.0, 0.5], device=device)


@given_on("some", shape=dev_nonscalar_shapes, layout=layouts, seed=seeds, data=st.data())
def test_pad_flip(device, shape, layout, seed, data):
    op = Operand(shape, layout, seed)
    pw = tuple(data.draw(st.tuples(st.integers(0, 2), st.integers(0, 2))) for _ in shape)
    cv = data.draw(st.sampled_from([0, 1.5]))
    p = jn.pad(op.tensor(device=device), pw, constant_values=cv)
    assert_close(p, np.pad(op.array(), pw, constant_values=cv), device=device)
    w = np.arange(p.size, dtype=np.float64).reshape(p.shape)
    gradcheck(lambda x: jn.pad(op.view(x), pw) * T(w, device), op.base, device=device)
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1),
                               st.lists(st.integers(0, len(shape) - 1), unique=True).map(tuple)))
    assert_close(jn.flip(op.tensor(device=device), axis), np.flip(op.array(), axis), device=device)
    wf = np.arange(op.array().size, dtype=np.float64).reshape(shape)
    gradcheck(lambda x: jn.flip(op.view(x), axis) * T(wf, device), op.base, device=device)


def test_pad_int_width(device):
    assert jn.pad(jn.ones((2, 3)).to(device), 1).shape == (4, 5)
    assert_close(jn.pad(T([1, 2], device), (1, 0)), [0, 1, 2], device=device)


# ---------------------------------------------------------------------------------------------------------
# Indexing
# ---------------------------------------------------------------------------------------------------------

_I = np.array
GETITEM_CASES = [
    (1,), (-1,), (slice(1, 3),), (slice(None, None, -1),), (slice(3, 0, -2),), (slice(None, None, 2), 1),
    (Ellipsis, 2), (None, 1, Ellipsis), (slice(None), None, slice(None, None, -2)), (1, 2, 3), (-1, -2, -3),
    (Ellipsis,), (_I([0, 2, 2, 1]),), (_I([[0, 1], [3, 3]]), slice(1, 4)), (slice(None), _I([4, 0, 4])),
    (_I([0, 0, 1]), _I([1, 1, 2])), (_I([True, False, True, True]),), (slice(None), _I([1, -1, 1]), 0),
    (Ellipsis, _I([5, 0, 5, 5])), (_I([0, 3]), slice(None), _I([1, 2])), (_I(2),), (_I([-4, 3]),),
    ((np.arange(4 * 5).reshape(4, 5) % 3 == 0),), (slice(None, None, 3), slice(4, None, -3), slice(-1, None)),
    (slice(10, 20),), (None,),
]


@pytest.mark.parametrize("index", GETITEM_CASES, ids=[str(i) for i in range(len(GETITEM_CASES))])
def test_getitem(device, index):
    a = np.random.default_rng(0).standard_normal((4, 5, 6))
    t = T(a, device)
    if on_cuda(device) and any(isinstance(v, np.ndarray) and v.dtype == bool for v in index):
        with pytest.raises(NotImplementedError, match="boolean mask indexing of a cuda tensor"):
            t[index]                        # the result's shape depends on the mask's values: refused on the GPU
        return
    assert_close(t[index], a[index], rtol=1e-12, atol=0, device=device)
    assert_close(jn.getitem(T(a, device), index), a[index], rtol=1e-12, atol=0, device=device)
    tidx = tuple(T(v, device) if isinstance(v, np.ndarray) else v for v in index)
    assert_close(t[tidx], a[index], rtol=1e-12, atol=0, device=device)
    # gradient: duplicates in integer indices accumulate
    w = np.arange(a[index].size, dtype=np.float64).reshape(a[index].shape) + 1
    gradcheck(lambda x: x[index] * T(w, device), a, device=device)
    x = T(a, device, requires_grad=True)
    (x[index] * T(w, device)).sum().backward()
    expect = np.zeros_like(a)
    np.add.at(expect, index, w)
    np.testing.assert_allclose(x.grad.numpy(), expect)


@given_on("few", layout=layouts, seed=seeds, data=st.data())
def test_getitem_on_views(device, layout, seed, data):
    op = Operand((3, 4), layout, seed)
    sl = data.draw(st.tuples(st.slices(3), st.slices(4)))
    assert_close(op.tensor(device=device)[sl], op.array()[sl], device=device)
    gradcheck(lambda x: op.view(x)[sl] * 2, op.base, device=device)


def test_getitem_list_index_and_second_order(device):
    t = T([[1.0, 2.0], [3.0, 4.0]], device)
    assert t[[1, 1, 0]].tolist() == [[3.0, 4.0], [3.0, 4.0], [1.0, 2.0]]
    if on_cuda(device):
        with pytest.raises(NotImplementedError, match="boolean mask"):
            t[[True, False]]
    else:
        assert t[[True, False]].tolist() == [[1.0, 2.0]]
    # the gradient of the scatter is differentiable again (a gather)
    gradcheck(lambda x: jn.grad(lambda y: (y[T([0, 0, 1], device)] ** 3).sum())(x), np.array([1.0, 2.0, 3.0]), device=device)


@given_on("some", shape=dev_nonscalar_shapes, layout=layouts, seed=seeds, data=st.data())
def test_take(device, shape, layout, seed, data):
    op = Operand(shape, layout, seed)
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    n = int(np.prod(shape)) if axis is None else shape[axis]
    ishape = data.draw(st.sampled_from([(), (3,), (2, 2)]))
    idx = np.random.default_rng(seed).integers(-n, n, ishape)
    out = jn.take(op.tensor(device=device), T(idx, device), axis=axis)
    assert_close(out, np.take(op.array(), idx, axis=axis), device=device)
    w = np.arange(out.size, dtype=np.float64).reshape(out.shape) + 1
    gradcheck(lambda x: jn.take(op.view(x), T(idx, device), axis=axis) * T(w, device), op.base, device=device)


def test_take_gradient_is_scatter_add_with_duplicates(device):
    x = T([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], device, requires_grad=True)
    y = jn.take(x, T([2, 0, 2, 2], device), axis=0)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[1.0, 1.0], [0.0, 0.0], [3.0, 3.0]])
    assert x.take(T([1], device), axis=1).tolist() == [[2.0], [4.0], [6.0]]


def test_scatter_add(device):
    base = np.arange(12.0).reshape(3, 4)
    idx = np.array([0, 2, 0, -1])
    upd = np.ones((3, 4)) * np.arange(1.0, 5.0)
    ref = base.copy()
    np.add.at(ref, (slice(None), idx), upd)
    out = jn.scatter_add(T(base, device), T(idx, device), T(upd, device), axis=1)
    assert_close(out, ref, device=device)
    gradcheck(lambda x, u: jn.scatter_add(x, T(idx, device), u, axis=1) * T(np.arange(12.0).reshape(3, 4), device),
              base, upd, device=device)
    r0 = np.zeros((3, 2))
    np.add.at(r0, np.array([1, 1]), np.ones((2, 2)))
    assert_close(jn.scatter_add(jn.zeros((3, 2), jn.float64).to(device), T([1, 1], device), jn.ones((2, 2)).to(device)), r0, device=device)


def test_one_hot(device):
    idx = np.array([[0, 2], [1, 3]])
    out = jn.one_hot(T(idx, device), 4)
    assert out.dtype == jn.float32 and out.shape == (2, 2, 4)
    assert_close(out, np.eye(4)[idx], device=device)
    assert jn.one_hot(T([1], device), 3, dtype=jn.int64).tolist() == [[0, 1, 0]]
    assert jn.one_hot(T([1], device), 3, on_value=5, off_value=-1).tolist() == [[-1.0, 5.0, -1.0]]


@given_on("some", shape=dev_nonscalar_shapes, layout=layouts, seed=seeds, data=st.data())
def test_take_along_axis_sort_argsort(device, shape, layout, seed, data):
    op = Operand(shape, layout, seed, "distinct")
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    a = op.array(np.float64)
    k = data.draw(st.integers(1, 3))
    ishape = tuple(k if i == axis % len(shape) else s for i, s in enumerate(shape))
    idx = np.random.default_rng(seed).integers(-shape[axis], shape[axis], ishape)
    out = jn.take_along_axis(op.tensor(jn.float64, device), T(idx, device), axis)
    assert_close(out, np.take_along_axis(a, idx, axis), rtol=1e-12, device=device)
    w = np.arange(out.size, dtype=np.float64).reshape(out.shape) + 1
    gradcheck(lambda x: jn.take_along_axis(op.view(x), T(idx, device), axis) * T(w, device), op.base, device=device)
    assert_close(jn.argsort(op.tensor(jn.float64, device), axis), np.argsort(a, axis, kind="stable"), dtype=jn.int64, device=device)
    assert_close(jn.sort(op.tensor(jn.float64, device), axis), np.sort(a, axis), rtol=1e-12, device=device)
    assert_close(jn.argsort(op.tensor(jn.float64, device), axis, descending=True), np.argsort(-a, axis, kind="stable"), device=device)
    ws = np.arange(a.size, dtype=np.float64).reshape(a.shape) + 1
    gradcheck(lambda x: jn.sort(op.view(x), axis) * T(ws, device), op.base, device=device)
    kk = data.draw(st.integers(0, shape[-1]))
    vals, ids = jn.top_k(op.tensor(jn.float64, device), kk)
    ref_ids = np.argsort(-a, -1, kind="stable")[..., :kk]
    assert_close(ids, ref_ids, dtype=jn.int64, device=device)
    assert_close(vals, np.take_along_axis(a, ref_ids, -1), rtol=1e-12, device=device)
    if kk:
        gradcheck(lambda x: jn.top_k(op.view(x), kk)[0] * 2, op.base, device=device)


def test_top_k_of_zero(device):
    vals, ids = jn.top_k(T([0.5, 2.0, 1.0], device), 0)
    assert vals.shape == (0,) and ids.shape == (0,) and ids.dtype == jn.int64
    assert vals.device.type == devtype(device)
    vals, ids = jn.top_k(T([[0.5, 2.0, 1.0]], device), 0)
    assert vals.shape == (1, 0) and ids.shape == (1, 0)


def test_sort_stable_with_ties(device):
    x = T([2.0, 1.0, 2.0, 1.0], device)
    assert jn.argsort(x).tolist() == [1, 3, 0, 2]
    assert jn.argsort(x, descending=True).tolist() == [0, 2, 1, 3]
    assert jn.argsort(T([3, 1, 2], device)).tolist() == [1, 2, 0]


# ---------------------------------------------------------------------------------------------------------
# Softmax family
# ---------------------------------------------------------------------------------------------------------

def _np_softmax(a, axis):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@given_on("some", shape=dev_nonscalar_shapes, layout=layouts, seed=seeds, data=st.data())
def test_softmax_log_softmax(device, shape, layout, seed, data):
    op = Operand(shape, layout, seed)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    a = op.array(np.float64)
    for dt in (np.float32, np.float64):
        assert_close(jn.softmax(op.tensor(dt, device), axis), _np_softmax(a, axis), rtol=1e-5, dtype=dt, device=device)
        assert_close(jn.log_softmax(op.tensor(dt, device), axis), np.log(_np_softmax(a, axis)), rtol=1e-5, atol=1e-5,
                     dtype=dt, device=device)
    w = np.arange(a.size, dtype=np.float64).reshape(a.shape)
    gradcheck(lambda x: jn.softmax(op.view(x), axis) * T(w, device), op.base, device=device)
    gradcheck(lambda x: jn.log_softmax(op.view(x), axis) * T(w, device), op.base, device=device)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_softmax_logsumexp_stable(device, dt):
    x = T([[1000.0, 0.0, -1000.0], [-1000.0, -1000.0, -np.inf]], device, dt)
    s = jn.softmax(x, -1).numpy()
    ls = jn.log_softmax(x, -1).numpy()
    lse = jn.logsumexp(x, -1).numpy()
    np.testing.assert_allclose(s, [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], atol=1e-7)
    np.testing.assert_allclose(ls[0], [0.0, -1000.0, -2000.0], rtol=1e-6)
    np.testing.assert_allclose(lse, [1000.0, -1000.0 + np.log(2.0)], rtol=1e-6)
    assert np.isfinite(s).all() and np.isfinite(lse).all()
    xg = T([[1000.0, 0.0], [-1000.0, -999.0]], device, dt, requires_grad=True)
    (jn.logsumexp(xg, -1).sum() + jn.log_softmax(xg, 0)[0, 0]).backward()
    assert np.isfinite(xg.grad.numpy()).all()


@pytest.mark.parametrize("n,axis", [(5, -1), (20, -1), (40, -1), (5, 0)],
                         ids=["short-rows", "block-rows", "long-rows", "axis0"])
def test_softmax_family_row_lengths(device, n, axis):
    a = np.random.default_rng(n).uniform(-5, 5, (3, n))
    a[1, 2] = -np.inf                                   # a masked entry (not first in its row)
    sm = _np_softmax(a, axis)
    for dt in (np.float32, np.float64):
        t = T(a, device, dt)
        assert_close(jn.softmax(t, axis), sm, rtol=2e-5, atol=1e-7, dtype=dt, device=device)
        assert_close(jn.log_softmax(t, axis), np.log(sm), rtol=2e-5, atol=1e-5, dtype=dt, device=device)
        assert_close(jn.logsumexp(t, axis), _np_reduce("logsumexp", a, axis, False), rtol=2e-5, dtype=dt,
                     device=device)
    b = np.where(np.isinf(a), -30.0, a)                 # finite, for central differences
    w = np.random.default_rng(1).uniform(0.5, 1.5, b.shape)
    for f in (jn.softmax, jn.log_softmax):
        gradcheck(lambda x: f(x, axis) * T(w, device), b, device=device)
    gradcheck(lambda x: jn.logsumexp(x, axis), b, device=device)


# ---------------------------------------------------------------------------------------------------------
# Under jit
# ---------------------------------------------------------------------------------------------------------

def test_jit_forward_and_gradient_on_the_device(device):
    """A jitted function of device tensors runs a plan on that device (a GPU plan for cuda tensors): fused
    elementwise groups, matmul, reductions, softmax, its gradient."""
    rng = np.random.default_rng(5)
    x, w, c = rng.uniform(-1, 1, (3, 4)), rng.uniform(-1, 1, (4, 5)), rng.uniform(0.5, 1.5, (3, 5))
    tc = T(c, device, jn.float64)

    def f(a, b):
        h = jn.tanh(a @ b) * tc + 1.0
        return jn.sum(jn.softmax(h, axis=-1) * h, axis=1), jn.max(h, axis=0)

    h = np.tanh(x @ w) * c + 1.0
    sm = _np_softmax(h, -1)
    jf = jn.jit(f)
    for _ in range(2):                                  # the trace, then the compiled plan
        s, m = jf(T(x, device, jn.float64), T(w, device, jn.float64))
        assert_close(s, (sm * h).sum(1), rtol=1e-10, device=device)
        assert_close(m, h.max(0), rtol=1e-12, device=device)
    if on_cuda(device):
        text = jn.explain(jf, T(x, device, jn.float64), T(w, device, jn.float64), file=open(os.devnull, "w"))
        assert "(cuda)" in text
    gf = jn.jit(jn.grad(lambda a, b: jn.sum(jn.tanh(a @ b) * tc), argnums=(0, 1)))
    dh = c * (1 - np.tanh(x @ w) ** 2)
    for _ in range(2):
        ga, gb = gf(T(x, device, jn.float64), T(w, device, jn.float64))
        assert_close(ga, dh @ w.T, rtol=1e-10, device=device)
        assert_close(gb, x.T @ dh, rtol=1e-10, device=device)


# ---------------------------------------------------------------------------------------------------------
# Random
# ---------------------------------------------------------------------------------------------------------

def test_random_reproducible_and_shapes(device):
    def draw():
        return [jn.random.normal((3, 4), device=device), jn.random.uniform((5,), -1, 2, device=device),
                jn.random.randint(0, 10, (2, 2), device=device), jn.random.truncated_normal((100,), device=device),
                jn.random.bernoulli(0.5, (7,), device=device)]
    jn.random.seed(123)
    a = draw()
    jn.random.seed(123)
    b = draw()
    for x, y in zip(a, b):
        assert x.device.type == devtype(device)
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert [x.shape for x in a] == [(3, 4), (5,), (2, 2), (100,), (7,)]
    assert [x.dtype for x in a] == [jn.float32, jn.float32, jn.int64, jn.float32, jn.float32]
    assert jn.random.normal((2,), dtype=jn.float64, device=device).dtype == jn.float64
    assert jn.random.uniform((2,), dtype=jn.float64, device=device).dtype == jn.float64
    assert jn.random.normal((), device=device).shape == ()
    n = PerDevice(1000, 256).on(device)
    u = jn.random.uniform((n,), -1, 2, device=device).numpy()
    assert u.min() >= -1 and u.max() < 2 and len(np.unique(u)) > n * 0.95      # no repeated counters
    r = jn.random.randint(3, 6, (n,), device=device).numpy()
    assert set(np.unique(r)) == {3, 4, 5}
    with jn.device(device):                     # the default device draws there too
        assert jn.random.normal((2,)).device.type == devtype(device)


def test_random_distributions(device):
    jn.random.seed(0)
    n = PerDevice(20000, 512).on(device)
    tol = 5 / np.sqrt(n)                        # five standard errors of a unit-variance mean
    t = jn.random.truncated_normal((n,), mean=1.0, std=0.5, device=device).numpy()
    assert np.all(np.abs(t - 1.0) <= 2 * 0.5 + 1e-6)
    assert abs(t.mean() - 1.0) < 0.5 * tol
    g = jn.random.normal((n,), mean=3.0, std=2.0, device=device).numpy()
    assert abs(g.mean() - 3.0) < 2 * tol and abs(g.std() - 2.0) < 2 * tol
    b = jn.random.bernoulli(0.3, (n,), device=device).numpy()
    assert set(np.unique(b)) <= {0.0, 1.0} and abs(b.mean() - 0.3) < 0.5 * tol
    x = jn.ones((n,)).to(device)
    y = jn.nn.functional.dropout(x, 0.5)
    assert y.device.type == devtype(device)
    y = y.numpy()
    assert set(np.unique(y)) <= {0.0, 2.0} and abs((y == 0).mean() - 0.5) < 0.5 * tol


def test_random_permutation_of_rows(device):
    rows = jn.random.permutation(T(np.arange(12.0).reshape(6, 2), device))
    assert rows.device.type == devtype(device)
    rows = rows.numpy()
    assert sorted(rows[:, 0].tolist()) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    np.testing.assert_array_equal(rows[:, 1], rows[:, 0] + 1)


def test_random_host_samplers():
    # drawn by NumPy's generator on the host from host values (no device form)
    jn.random.seed(0)
    bp = jn.random.bernoulli(jn.tensor([0.0, 1.0])).numpy()
    assert bp.tolist() == [0.0, 1.0]
    probs = np.array([0.1, 0.2, 0.7])
    c = jn.random.categorical(probs=jn.tensor(probs), num_samples=20000).numpy()
    assert c.shape == (20000,) and c.dtype == np.int64
    np.testing.assert_allclose(np.bincount(c, minlength=3) / 20000, probs, atol=0.02)
    c2 = jn.random.categorical(logits=jn.log(jn.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])), num_samples=1000)
    assert c2.shape == (2, 1000)
    assert set(np.unique(c2.numpy()[0])) == {0, 1} and set(np.unique(c2.numpy()[1])) == {2}
    p = jn.random.permutation(50).numpy()
    assert sorted(p.tolist()) == list(range(50))
    jn.random.seed(7)
    p1 = jn.random.permutation(9).numpy()
    jn.random.seed(7)
    np.testing.assert_array_equal(jn.random.permutation(9).numpy(), p1)
    with pytest.raises(ValueError):
        jn.random.categorical()


def test_softmax_family_with_masked_minus_inf_entries(device):
    x = np.array([[-np.inf, 1.0, 2.0], [0.5, -np.inf, -1.0]], np.float32)
    e = np.exp(x - x.max(1, keepdims=True))
    ref = e / e.sum(1, keepdims=True)
    assert_close(jn.softmax(T(x, device)), ref, rtol=1e-6, device=device)
    ls = jn.log_softmax(T(x, device)).numpy()
    assert ls[0, 0] == -np.inf and ls[1, 1] == -np.inf
    np.testing.assert_allclose(ls[0, 1:], np.log(ref[0, 1:]), rtol=1e-6)
    lse = jn.logsumexp(T(np.array([[-np.inf, -np.inf], [-np.inf, 0.0]], np.float32), device), axis=1).numpy()
    assert lse[0] == -np.inf and lse[1] == pytest.approx(0.0)
    loss = jn.nn.functional.cross_entropy(T(x, device), T(np.array([2, 0]), device), reduction="none")
    assert_close(loss, -np.log([ref[0, 2], ref[1, 0]]), rtol=1e-6, device=device)


def test_softmax_special_rows(device):
    a = np.array([[-np.inf, -np.inf, -np.inf], [np.nan, 0.0, 1.0], [1e30, 0.0, -1e30]], np.float32)
    t = T(a, device)
    s, ls, lse = jn.softmax(t).numpy(), jn.log_softmax(t).numpy(), jn.logsumexp(t, -1).numpy()
    assert np.isnan(s[0]).all() and np.isnan(ls[0]).all()          # 0/0 and -inf - -inf, as in NumPy
    assert np.isnan(s[1]).all() and np.isnan(ls[1]).all() and np.isnan(lse[1])
    np.testing.assert_array_equal(s[2], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(ls[2], np.float32([0.0, -1e30, -2e30]))
    # logsumexp of a row of -inf is -inf (NumPy/SciPy)
    assert lse[0] == -np.inf and lse[2] == np.float32(1e30)
