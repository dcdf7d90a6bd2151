"""Reverse-mode autodiff: worked values, higher-order gradients, accumulation, seeds, no_grad, transforms."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import FEW, gradcheck, pair_shapes, seeds
from hypothesis import given

import jitnet as jn


def test_course_chain_rule_values():
    x = jn.tensor(2.0, requires_grad=True)
    y = 2 * x ** 3
    z = 3 + y ** 2
    dzdx, dzdy = jn.gradients(z, [x, y])
    assert z.item() == 3 + 16 ** 2
    assert dzdx.item() == 768.0
    assert dzdy.item() == 32.0


def test_course_value_and_grad():
    def loss(x):
        return (7 - x ** 2) ** 2
    v, g = jn.value_and_grad(loss)(jn.tensor(2.0))
    assert v.item() == 9.0
    assert g.item() == -24.0
    assert not v.requires_grad and not g.requires_grad


def test_grad_of_square():
    g = jn.grad(lambda x: x ** 2)(jn.tensor(3.0))
    assert g.item() == 6.0
    assert jn.grad(lambda x: x ** 2)(3.0).item() == 6.0          # Python floats are accepted


def test_higher_order():
    f = lambda x: x ** 3  # noqa: E731
    assert jn.grad(f)(jn.tensor(2.0)).item() == 12.0
    assert jn.grad(jn.grad(f))(jn.tensor(2.0)).item() == 12.0
    assert jn.grad(jn.grad(jn.grad(f)))(jn.tensor(2.0)).item() == 6.0
    assert jn.grad(jn.grad(jn.grad(jn.grad(f))))(jn.tensor(2.0)).item() == 0.0
    h = lambda x: jn.sin(x) * jn.exp(x)  # noqa: E731
    x0 = 0.7
    d2 = jn.grad(jn.grad(h))(jn.tensor(x0, dtype=jn.float64)).item()
    np.testing.assert_allclose(d2, 2 * np.cos(x0) * np.exp(x0), rtol=1e-12)
    d3 = jn.grad(jn.grad(jn.grad(h)))(jn.tensor(x0, dtype=jn.float64)).item()
    np.testing.assert_allclose(d3, 2 * np.exp(x0) * (np.cos(x0) - np.sin(x0)), rtol=1e-12)


def test_second_order_through_many_ops():
    # the gradient of a gradient, checked numerically (every VJP is itself differentiable)
    def f(x):
        return (jn.tanh(x) * jn.softmax(x, -1) + jn.log_softmax(x * x, 0)).sum() + jn.logsumexp(x, -1).sum()
    gradcheck(lambda x: jn.grad(f)(x), np.array([[0.3, -0.7, 1.1], [0.2, 0.5, -1.3]]))
    gradcheck(lambda x: jn.grad(lambda y: (jn.matmul(y, y.T) ** 2).sum())(x), np.array([[0.3, -0.7], [1.1, 0.4]]))


def test_fan_out_accumulates():
    x = jn.tensor(3.0, requires_grad=True)
    y = x * x + x * 2 + jn.exp(x) * x
    y.backward()
    np.testing.assert_allclose(x.grad.item(), 2 * 3 + 2 + np.exp(3.0) * 4, rtol=1e-6)
    a = jn.tensor([1.0, 2.0], requires_grad=True)
    b = a + a
    c = b * a
    jn.sum(c + b).backward()
    np.testing.assert_allclose(a.grad.numpy(), 4 * np.array([1.0, 2.0]) + 2)


def test_backward_twice_accumulates():
    x = jn.tensor([1.0, 2.0], requires_grad=True)
    y = (x ** 2).sum()
    y.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0])
    y.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [4.0, 8.0])
    x.zero_grad()
    assert x.grad is None
    (x * 3).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 3.0])
    assert not x.grad.requires_grad


def test_backward_non_scalar():
    x = jn.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = x * 2
    with pytest.raises(ValueError, match="scalar"):
        y.backward()
    y.backward(grad=jn.tensor([1.0, 0.0, -1.0]))
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 0.0, -2.0])
    z = jn.tensor([[1.0, 2.0]], requires_grad=True) * 1
    z.backward(np.array([[3.0, 4.0]]))
    with pytest.raises(ValueError, match="shape"):
        (x * 2).backward(grad=jn.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError):
        jn.tensor([1.0]).sum().backward()


def test_backward_with_size_one_non_scalar():
    x = jn.tensor([[2.0]], requires_grad=True)
    (x * x).backward()
    assert x.grad.tolist() == [[4.0]]


def test_intermediate_grads_not_stored_on_non_leaves():
    x = jn.tensor(2.0, requires_grad=True)
    y = x * 3
    (y * y).backward()
    assert x.grad.item() == 36.0
    assert y.grad is None and not y.is_leaf and x.is_leaf


def test_no_grad_and_stop_gradient():
    x = jn.tensor([1.0, 2.0], requires_grad=True)
    with jn.no_grad():
        assert not jn.is_grad_enabled()
        y = x * 2
        with jn.enable_grad():
            assert jn.is_grad_enabled()
            w = x * 2
    assert jn.is_grad_enabled()
    assert not y.requires_grad and y.is_leaf
    assert w.requires_grad
    s = jn.stop_gradient(x)
    assert not s.requires_grad
    z = (x * jn.stop_gradient(x * 3)).sum()
    z.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 6.0])
    g = jn.grad(lambda t: (t * jn.stop_gradient(t)).sum())(jn.tensor([2.0, 5.0]))
    np.testing.assert_array_equal(g.numpy(), [2.0, 5.0])
    with pytest.raises(RuntimeError):
        with jn.no_grad():
            (x * 2).sum().backward()
    assert jn.is_grad_enabled()


def test_value_and_grad_argnums_and_aux():
    def f(a, b, c):
        return (a * b + c).sum(), {"ab": a * b}
    a, b, c = jn.tensor([1.0, 2.0]), jn.tensor([3.0, 4.0]), jn.tensor(5.0)
    (v, aux), (ga, gc) = jn.value_and_grad(f, argnums=(0, 2), has_aux=True)(a, b, c)
    assert v.item() == 3 + 8 + 10
    assert aux["ab"].tolist() == [3.0, 8.0]
    assert ga.tolist() == [3.0, 4.0] and gc.item() == 2.0
    gb, aux2 = jn.grad(f, argnums=1, has_aux=True)(a, b, c)
    assert gb.tolist() == [1.0, 2.0] and aux2["ab"].tolist() == [3.0, 8.0]
    (gb1,) = jn.grad(lambda a, b: (a * b).sum(), argnums=(1,))(a, b)
    assert gb1.tolist() == [1.0, 2.0]
    ga2, gb2 = jn.grad(lambda a, b: (a * b).sum(), argnums=[0, 1])(a, b)
    assert ga2.tolist() == [3.0, 4.0] and gb2.tolist() == [1.0, 2.0]
    # arguments not differentiated are left alone; the caller's tensors are not modified
    assert not a.requires_grad and a.grad is None


def test_grad_keyword_arguments_and_non_scalar_output():
    g = jn.grad(lambda x, scale=1.0: (x * scale).sum())(jn.tensor([1.0, 1.0]), scale=3.0)
    assert g.tolist() == [3.0, 3.0]
    with pytest.raises(ValueError, match="scalar"):
        jn.grad(lambda x: x * 2)(jn.tensor([1.0, 2.0]))
    with pytest.raises(TypeError):
        jn.grad(lambda x: 3.0)(jn.tensor(1.0))


def test_grad_of_function_that_ignores_its_argument():
    assert jn.grad(lambda x, y: (y * 2).sum())(jn.tensor(1.0), jn.tensor([1.0])).item() == 0.0
    assert jn.grad(lambda x: jn.tensor(3.0))(jn.tensor([1.0, 2.0])).tolist() == [0.0, 0.0]


def test_grad_inside_a_taped_computation():
    # grad of a tensor that already requires grad: the outer tape sees through (nested differentiation)
    x = jn.tensor(2.0, requires_grad=True)
    g = jn.grad(lambda t: t ** 3)(x)          # 3 x^2 = 12, differentiable w.r.t. the outer x
    assert g.item() == 12.0
    g.backward()
    assert x.grad.item() == 12.0              # d(3x^2)/dx = 6x


def test_gradients_grad_ys_and_unconnected():
    x = jn.tensor([1.0, 2.0], requires_grad=True)
    u = jn.tensor([5.0], requires_grad=True)
    y = x * 3
    gx, gu = jn.gradients(y, [x, u], grad_ys=jn.tensor([1.0, 10.0]))
    assert gx.tolist() == [3.0, 30.0]
    assert gu.tolist() == [0.0] and gu.shape == u.shape
    gx2 = jn.gradients([y, x.sum()], x, grad_ys=[jn.tensor([1.0, 1.0]), jn.tensor(2.0)])
    assert gx2.tolist() == [5.0, 5.0]
    gy = jn.gradients((y * y).sum(), y)
    assert gy.tolist() == [6.0, 12.0]
    c = jn.tensor([1.0, 2.0])
    assert jn.gradients(c.sum(), [x])[0].tolist() == [0.0, 0.0]
    # gradients() does not touch .grad
    assert x.grad is None and u.grad is None


@FEW
@given(shp=pair_shapes, seed=seeds)
def test_broadcast_gradients_sum_to_input_shapes(shp, seed):
    (sa, sb), _ = shp
    rng = np.random.default_rng(seed)
    a = jn.tensor(rng.standard_normal(sa), requires_grad=True)
    b = jn.tensor(rng.standard_normal(sb), requires_grad=True)
    ((a * b + a) * 2).sum().backward()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape
    an, bn = a.numpy(), b.numpy()
    out = np.broadcast_shapes(sa, sb)
    ga = np.broadcast_to(2 * (bn + 1), out)
    gb = np.broadcast_to(2 * an, out)
    np.testing.assert_allclose(a.grad.numpy(), _sum_to(ga, sa), rtol=1e-12)
    np.testing.assert_allclose(b.grad.numpy(), _sum_to(gb, sb), rtol=1e-12)
    gradcheck(lambda x, y: x / (y * y + 1) - y, a.numpy(), b.numpy())


def _sum_to(g, shape):
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead))) if lead else g
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def test_gradient_dtype_follows_input():
    x = jn.tensor([1.0, 2.0], requires_grad=True)                     # float32
    y = jn.tensor([1.0, 2.0], dtype=jn.float64, requires_grad=True)
    (x * y).sum().backward()
    assert x.grad.dtype == jn.float32 and y.grad.dtype == jn.float64


def test_deep_chain_is_iterative():
    x = jn.tensor(1.0, requires_grad=True)
    y = x
    for _ in range(3000):                    # deeper than Python's recursion limit would allow recursively
        y = y * 1.0
    y.backward()
    assert x.grad.item() == 1.0


def test_create_graph_backward():
    x = jn.tensor(3.0, requires_grad=True)
    y = x ** 3
    y.backward(create_graph=True)
    g = x.grad
    assert g.item() == 27.0 and g.requires_grad
    x.zero_grad()
    g.backward()
    assert x.grad.item() == 18.0
