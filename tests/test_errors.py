"""Bad input gets the user's error in the user's words: the op, the shapes, the index and its bound; never a
Numba typing error or traceback."""
from __future__ import annotations

import traceback

import numpy as np
import pytest

import jitnet as jn


def _no_numba(excinfo):
    """Assert neither the message nor the traceback text of an exception mentions Numba."""
    msg = str(excinfo.value)
    assert "numba" not in msg.lower(), msg
    assert "TypingError" not in msg and "nopython" not in msg, msg
    tb = "".join(traceback.format_exception(excinfo.type, excinfo.value, excinfo.tb))
    assert "numba.core.errors" not in tb and "TypingError" not in tb, tb
    assert "During handling of the above exception" not in tb, tb
    return msg


@pytest.mark.parametrize("fn,name", [(jn.add, "add"), (jn.multiply, "multiply"), (jn.subtract, "subtract"),
                                     (jn.maximum, "maximum"), (jn.less, "less")])
def test_elementwise_shape_mismatch(fn, name):
    with pytest.raises(ValueError) as ei:
        fn(jn.ones((2, 3)), jn.ones((4,)))
    msg = _no_numba(ei)
    assert name in msg and "(2, 3)" in msg and "(4,)" in msg


def test_operator_shape_mismatch():
    with pytest.raises(ValueError) as ei:
        jn.ones((2, 3)) + jn.ones((3, 2))
    msg = _no_numba(ei)
    assert "add" in msg and "(2, 3)" in msg and "(3, 2)" in msg


@pytest.mark.parametrize("sa,sb", [((2, 3), (2, 3)), ((3,), (4,)), ((5, 2, 3), (4, 3, 2)), ((2, 3), (4,))])
def test_matmul_shape_mismatch(sa, sb):
    with pytest.raises(ValueError) as ei:
        jn.matmul(jn.ones(sa), jn.ones(sb))
    msg = _no_numba(ei)
    assert "matmul" in msg and str(sa) in msg and str(sb) in msg
    with pytest.raises(ValueError):
        jn.ones(sa) @ jn.ones(sb)


def test_matmul_scalar_operand():
    with pytest.raises(ValueError) as ei:
        jn.matmul(jn.tensor(2.0), jn.ones((2,)))
    assert "matmul" in _no_numba(ei)


def test_concatenate_shape_mismatch():
    with pytest.raises(ValueError) as ei:
        jn.concatenate([jn.ones((2, 3)), jn.ones((2, 4))], axis=0)
    msg = _no_numba(ei)
    assert "concatenate" in msg and "(2, 3)" in msg and "(2, 4)" in msg
    with pytest.raises(ValueError) as ei:
        jn.concatenate([jn.ones((2, 3)), jn.ones((2,))], axis=0)
    msg = _no_numba(ei)
    assert "concatenate" in msg and "(2, 3)" in msg and "(2,)" in msg
    with pytest.raises(ValueError) as ei:
        jn.stack([jn.ones((2, 3)), jn.ones((3, 2))])
    msg = _no_numba(ei)
    assert "stack" in msg and "(2, 3)" in msg and "(3, 2)" in msg


def test_other_shape_errors():
    for call, name in [(lambda: jn.reshape(jn.ones((2, 3)), (4, 2)), "reshape"),
                       (lambda: jn.broadcast_to(jn.ones((2, 3)), (3, 3)), "broadcast_to"),
                       (lambda: jn.squeeze(jn.ones((2, 3)), 0), "squeeze"),
                       (lambda: jn.sum(jn.ones((2, 3)), axis=2), "sum"),
                       (lambda: jn.split(jn.ones((5,)), 2), "split"),
                       (lambda: jn.sum(jn.tensor(1.0), axis=0), "sum"),
                       (lambda: jn.softmax(jn.ones((2, 3)), axis=2), "softmax"),
                       (lambda: jn.transpose(jn.ones((2, 3)), (0, 0)), "transpose"),
                       (lambda: jn.transpose(jn.ones((2, 3)), (0, 5)), "transpose")]:
        with pytest.raises(ValueError) as ei:
            call()
        assert name in _no_numba(ei)


@pytest.mark.parametrize("idx", [[0, 5], [-4], [3]])
def test_take_out_of_range(idx):
    x = jn.tensor([1.0, 2.0, 3.0])
    with pytest.raises(IndexError) as ei:
        jn.take(x, jn.tensor(idx))
    msg = _no_numba(ei)
    bad = [i for i in idx if not -3 <= i < 3][0]
    assert "take" in msg and str(bad) in msg and "3" in msg
    with pytest.raises(IndexError) as ei:
        jn.take(jn.ones((2, 3)), jn.tensor([0, 7]), axis=1)
    msg = _no_numba(ei)
    assert "7" in msg and "size 3" in msg


def test_other_index_ops_out_of_range():
    with pytest.raises(IndexError) as ei:
        jn.take_along_axis(jn.ones((2, 3)), jn.tensor([[0], [3]]), axis=1)
    msg = _no_numba(ei)
    assert "3" in msg and "take_along_axis" in msg
    with pytest.raises(IndexError) as ei:
        jn.scatter_add(jn.zeros((3,)), jn.tensor([3]), jn.ones((1,)))
    msg = _no_numba(ei)
    assert "scatter_add" in msg and "3" in msg


@pytest.mark.parametrize("index,bad", [(5, "5"), (-6, "-6"), ((0, 9), "9"), ((slice(None), 3), "3"),
                                       ([0, 7], "7"), ((slice(None), [-4]), "-4")])
def test_getitem_out_of_range(index, bad):
    x = jn.tensor(np.arange(15.0).reshape(5, 3))
    with pytest.raises(IndexError) as ei:
        x[index]
    msg = _no_numba(ei)
    assert bad in msg
    bound = "5" if (not isinstance(index, tuple)) else "3"
    assert f"size {bound}" in msg
    with pytest.raises(IndexError):
        x[jn.tensor(index) if isinstance(index, list) else index]


def test_getitem_bool_mask_wrong_shape():
    with pytest.raises(IndexError) as ei:
        jn.ones((3,))[jn.tensor([True, False])]
    _no_numba(ei)


@pytest.mark.parametrize("index", [1.0, (0, 1.5), np.float32(0.0), [0.0, 1.0], slice(0.5, 2)])
def test_float_index_is_type_error(index):
    x = jn.ones((3, 3))
    with pytest.raises(TypeError) as ei:
        x[index]
    _no_numba(ei)


def test_float_indices_in_take_and_one_hot():
    with pytest.raises(TypeError) as ei:
        jn.take(jn.ones((3,)), jn.tensor([0.0, 1.0]))
    assert "take" in _no_numba(ei)
    with pytest.raises(TypeError) as ei:
        jn.one_hot(jn.tensor([0.5]), 3)
    assert "one_hot" in _no_numba(ei)


def test_int_tensor_requires_grad():
    with pytest.raises(TypeError) as ei:
        jn.tensor([1, 2], requires_grad=True)
    msg = _no_numba(ei)
    assert "int64" in msg
    with pytest.raises(TypeError):
        jn.tensor([True], requires_grad=True)
    with pytest.raises(TypeError):
        jn.tensor([1, 2]).requires_grad_()


def test_grad_of_int_argument():
    with pytest.raises(TypeError) as ei:
        jn.grad(lambda x: (x * 2).sum())(jn.tensor([1, 2]))
    msg = _no_numba(ei)
    assert "int64" in msg
    with pytest.raises(TypeError):
        jn.grad(lambda x: x * 2)(3)
    with pytest.raises(TypeError):
        jn.value_and_grad(lambda x, y: x * y, argnums=1)(jn.tensor(1.0), jn.tensor(2))


def test_bad_dtype_and_operands():
    with pytest.raises(TypeError) as ei:
        jn.tensor([1.0], dtype=np.complex64)
    _no_numba(ei)
    with pytest.raises(TypeError) as ei:
        jn.ones((2,)) + "a"
    _no_numba(ei)
    with pytest.raises(TypeError) as ei:
        jn.ones((2,)) & jn.ones((2,))
    _no_numba(ei)
    with pytest.raises(ValueError) as ei:
        jn.tensor([2]) ** jn.tensor([-1])
    _no_numba(ei)


def test_reduction_of_empty():
    with pytest.raises(ValueError) as ei:
        jn.max(jn.zeros((0,)))
    assert "max" in _no_numba(ei)
    with pytest.raises(ValueError) as ei:
        jn.argmax(jn.zeros((0,)))
    assert "argmax" in _no_numba(ei)


def test_errors_under_grad_and_views():
    # the same checks hold for non-contiguous inputs and while a tape is recorded
    x = jn.tensor(np.ones((4, 6)), requires_grad=True)
    with pytest.raises(ValueError) as ei:
        x.T + x
    msg = _no_numba(ei)
    assert "(6, 4)" in msg and "(4, 6)" in msg
    with pytest.raises(IndexError) as ei:
        jn.take(x[:, ::2], jn.tensor([3]), axis=1)
    assert "size 3" in _no_numba(ei)
