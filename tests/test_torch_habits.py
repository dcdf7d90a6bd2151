"""PyTorch spellings on tensors: aliases, dim=, varargs shapes, in-place updates and x.at[idx] (jitnet.habits)."""
import numpy as np
import pytest

import jitnet as jn


def _x():
    return jn.tensor(np.arange(6, dtype=np.float32).reshape(2, 3))


def test_varargs_shapes_and_randn_manual_seed():
    assert jn.zeros(2, 3).shape == (2, 3) and jn.zeros(2, 3).dtype == jn.float32
    assert jn.ones(4).shape == (4,)
    assert jn.ones((2, 3), jn.float64).dtype == jn.float64            # the NumPy form still works
    assert jn.empty(1, 2, dtype=jn.float64).shape == (1, 2)
    assert jn.zeros(size=(3,)).shape == (3,)
    jn.manual_seed(3)
    a = jn.randn(2, 3)
    jn.manual_seed(3)
    b = jn.randn((2, 3))
    assert a.shape == (2, 3) and a.dtype == jn.float32
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    r = jn.rand(5)
    assert ((r.numpy() >= 0) & (r.numpy() < 1)).all()
    with pytest.raises(TypeError, match="zeros: missing the shape"):
        jn.zeros()


def test_dim_and_keepdim_aliases():
    x = _x()
    np.testing.assert_array_equal(jn.sum(x, dim=1).numpy(), [3, 12])
    np.testing.assert_array_equal(x.mean(dim=0, keepdim=True).numpy(), [[1.5, 2.5, 3.5]])
    np.testing.assert_array_equal(x.argmax(dim=1).numpy(), [2, 2])
    np.testing.assert_allclose(jn.softmax(x, dim=0).numpy().sum(0), [1, 1, 1], rtol=1e-6)
    np.testing.assert_array_equal(jn.cumsum(x, dim=1).numpy(), np.cumsum(x.numpy(), 1))
    assert jn.cat([x, x], dim=1).shape == (2, 6)
    assert jn.cat([x, x]).shape == (4, 3)
    assert jn.stack([x, x], dim=2).shape == (2, 3, 2)
    with pytest.raises(TypeError, match="sum: got both axis and dim="):
        jn.sum(x, 1, dim=1)
    with pytest.raises(TypeError, match="got both axis and dim="):
        x.max(axis=0, dim=0)
    with pytest.raises(TypeError, match="keepdims and keepdim="):
        x.sum(0, keepdims=True, keepdim=True)


def test_permute_and_clone():
    x = jn.tensor(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    np.testing.assert_array_equal(x.permute(2, 0, 1).numpy(), x.numpy().transpose(2, 0, 1))
    np.testing.assert_array_equal(jn.permute(x, (0, -1, 1)).numpy(), x.numpy().transpose(0, 2, 1))
    with pytest.raises(ValueError, match=r"permute: dims \(0, 0, 1\) are not a permutation"):
        x.permute(0, 0, 1)
    w = jn.tensor([1.0, 2.0], requires_grad=True)
    c = w.clone()
    assert c.numpy().ctypes.data != w.numpy().ctypes.data
    (c * 3).sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), [3, 3])          # clone is differentiable


def test_pytorch_names_jitnet_lacks_name_the_jitnet_spelling():
    with pytest.raises(AttributeError, match=r"'mm' \(a PyTorch name\); in jitnet use jn.matmul"):
        jn.mm
    with pytest.raises(AttributeError, match="jn.take_along_axis"):
        _x().gather
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        jn.not_a_name
    assert not hasattr(_x(), "not_a_name")


def test_setitem_and_inplace_methods_write_the_tensors_array():
    x = _x()
    view = x[0]                              # a view shares the array, as in NumPy and PyTorch
    x[0, 1] = 10.0
    x[1] = jn.tensor([7.0, 8.0, 9.0])
    x[jn.tensor([0]), 2] = -1.0
    np.testing.assert_array_equal(x.numpy(), [[0, 10, -1], [7, 8, 9]])
    np.testing.assert_array_equal(view.numpy(), [0, 10, -1])
    assert x.add_(1) is x
    x.sub_(jn.tensor([1.0, 1.0, 1.0])).mul_(2).div_(2).add_(jn.ones(3), alpha=2)
    np.testing.assert_array_equal(x.numpy(), [[2, 12, 1], [9, 10, 11]])
    x.zero_()
    assert (x.numpy() == 0).all()
    x.fill_(2.5)
    assert (x.numpy() == 2.5).all()
    x.copy_(jn.tensor([[1.0, 2.0, 3.0]]))
    np.testing.assert_array_equal(x.numpy(), [[1, 2, 3], [1, 2, 3]])


def test_inplace_errors_are_clear():
    w = jn.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="add_: a tensor that requires grad"):
        w.add_(1)
    with pytest.raises(RuntimeError, match=r"setitem \(x\[idx\] = v\): a tensor that requires grad"):
        w[0] = 3.0
    y = w * 2                                # computed by a recorded op
    with pytest.raises(RuntimeError, match="zero_: a tensor that requires grad"):
        y.zero_()
    with pytest.raises(RuntimeError, match="read-only view"):
        jn.broadcast_to(jn.tensor([1.0]), (3,)).fill_(0)
    x = _x()
    with pytest.raises(IndexError, match=r"setitem: .*out of bounds.*tensor shape \(2, 3\)"):
        x[5, 0] = 1.0
    with pytest.raises(ValueError, match=r"setitem: cannot write a value of shape \(4,\)"):
        x[0] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"add_: a value of shape \(2,\) does not broadcast"):
        x.add_(jn.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="add_: cannot write the result into a tensor of dtype int64"):
        jn.tensor([1, 2]).add_(0.5)
    with pytest.raises(TypeError, match="setitem: float index"):
        x[0.5] = 1.0
    np.testing.assert_array_equal(x.numpy(), _x().numpy())      # nothing was written by a failed update

    @jn.jit
    def f(a):
        a[0] = 1.0
        return a

    with pytest.raises(jn.TracingError, match=r"in-place update .* inside jitnet.jit .* x.at\[idx\].set"):
        f(jn.zeros(3))


def test_at_set_add_multiply_values_and_gradients():
    x0 = np.arange(6, dtype=np.float64).reshape(2, 3)
    x = jn.tensor(x0, requires_grad=True)
    v = jn.tensor([10.0, 20.0], dtype=jn.float64, requires_grad=True)
    y = x.at[:, 1].set(v)
    want = x0.copy()
    want[:, 1] = [10, 20]
    np.testing.assert_array_equal(y.numpy(), want)
    np.testing.assert_array_equal(x.numpy(), x0)                 # functional: x is unchanged
    w = jn.tensor(np.arange(1, 7, dtype=np.float64).reshape(2, 3))
    (y * w).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[1, 0, 3], [4, 0, 6]])
    np.testing.assert_array_equal(v.grad.numpy(), [2, 5])

    x.grad = v.grad = None
    idx = jn.tensor([0, 0, 1])
    z = x.at[idx, 2].add(v[0])                                   # repeated positions accumulate
    want = x0.copy()
    np.add.at(want, (np.array([0, 0, 1]), 2), 10)
    np.testing.assert_array_equal(z.numpy(), want)
    (z * w).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), w.numpy())
    np.testing.assert_array_equal(v.grad.numpy(), [3 + 3 + 6, 0])

    x.grad = v.grad = None
    m = x.at[1].multiply(v[1])
    np.testing.assert_array_equal(m.numpy(), x0 * [[1], [20]])
    m.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[1, 1, 1], [20, 20, 20]])
    np.testing.assert_array_equal(v.grad.numpy(), [0, x0[1].sum()])
    np.testing.assert_array_equal(x.at[0, 1].get().numpy(), 1.0)

    with pytest.raises(IndexError, match=r"at\[\].set: .*out of bounds.*tensor shape \(2, 3\)"):
        x.at[2].set(1.0)
    with pytest.raises(ValueError, match=r"at\[\]: a value of shape \(4,\) does not broadcast to the selection"):
        x.at[0].set(jn.zeros(4, dtype=jn.float64))
    with pytest.raises(ValueError, match="at\\[\\].multiply: the index selects some positions"):
        x.at[jn.tensor([1, 1])].multiply(2.0)
    s = x.at[jn.tensor([1, 1]), 0].set(jn.tensor([1.0, 3.0], dtype=jn.float64))
    assert s.numpy()[1, 0] == 2.0                                # a repeated position gets the mean


def test_at_under_jit_matches_eager_and_differentiates():
    def loss(x, v):
        return (x.at[1:, 0].set(v) * x.at[0].add(1.0)).sum()

    x = jn.tensor(np.arange(6, dtype=np.float32).reshape(3, 2))
    v = jn.tensor([5.0], dtype=jn.float32)
    step = jn.jit(jn.value_and_grad(loss, argnums=(0, 1)))
    val, (gx, gv) = step(x, v)
    ev, (ex, ev_) = jn.value_and_grad(loss, argnums=(0, 1))(x, v)
    np.testing.assert_allclose(val.numpy(), ev.numpy(), rtol=1e-6)
    np.testing.assert_allclose(gx.numpy(), ex.numpy(), rtol=1e-6)
    np.testing.assert_allclose(gv.numpy(), ev_.numpy(), rtol=1e-6)
    # by hand: y = x.at[1:, 0].set(5) * x.at[0].add(1); d/dv = sum over rows 1, 2 of column 0 of x.at[0].add(1)
    np.testing.assert_allclose(gv.numpy(), [x.numpy()[1, 0] + x.numpy()[2, 0]], rtol=1e-6)
