"""DLPack both ways (Tensor.__dlpack__, __dlpack_device__, jn.from_dlpack) and np.asarray for every rank."""
import gc
import weakref

import numpy as np
import pytest

import jitnet as jn


def _ptr(a):
    return a.__array_interface__["data"][0]


def test_numpy_from_dlpack_shares_memory_both_directions_of_writes():
    t = jn.tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    a = np.from_dlpack(t)
    assert _ptr(a) == _ptr(t.numpy())
    a[0, 1] = 42.0                                   # a write through the consumer is seen by the tensor
    assert t.numpy()[0, 1] == 42.0
    t.numpy()[1, 2] = -1.0                           # and the other way
    assert a[1, 2] == -1.0
    assert t.__dlpack_device__() == (1, 0)


@pytest.mark.parametrize("view", ["transpose", "step_slice", "column"])
def test_strides_and_offsets_of_views_are_preserved(view):
    base = jn.tensor(np.arange(24, dtype=np.float64).reshape(4, 6))
    t = {"transpose": lambda: base.T, "step_slice": lambda: base[1:, ::2],
         "column": lambda: base[:, 3]}[view]()
    a = np.from_dlpack(t)
    src = t.numpy()
    assert a.strides == src.strides and a.shape == src.shape and a.dtype == src.dtype
    assert _ptr(a) == _ptr(src)
    np.testing.assert_array_equal(a, src)


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.uint8, np.int32, np.int64, np.float16, np.float32,
                                   np.float64])
def test_dtypes_round_trip_without_copy(dtype):
    src = (np.arange(6) % 3).astype(dtype).reshape(3, 2)
    t = jn.from_dlpack(src)
    assert t.dtype == np.dtype(dtype) and _ptr(t.numpy()) == _ptr(src)
    a = np.from_dlpack(t)
    assert a.dtype == np.dtype(dtype) and _ptr(a) == _ptr(src)
    np.testing.assert_array_equal(a, src)


def test_zero_d_tensor_exports_and_converts():
    t = jn.tensor(3.5)
    a = np.from_dlpack(t)
    assert a.shape == () and a.dtype == np.float32 and float(a) == 3.5
    b = np.asarray(t)
    assert b.shape == () and float(b) == 3.5
    assert np.asarray(jn.tensor(7)).dtype == np.int64


@pytest.mark.parametrize("shape", [(), (3,), (2, 3), (2, 1, 2)])
def test_asarray_every_rank(shape):
    src = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    t = jn.tensor(src)
    np.testing.assert_array_equal(np.asarray(t), src)
    assert np.asarray(t).shape == shape
    assert np.asarray(t, dtype=np.float64).dtype == np.float64
    with pytest.raises(ValueError, match="needs a copy"):
        np.asarray(t, dtype=np.float64, copy=False)


def test_from_dlpack_of_a_dlpack_object_shares_memory_and_keeps_it_alive():
    class Producer:                                   # an object known only through the DLPack protocol
        def __init__(self, arr):
            self._arr = arr

        def __dlpack__(self, **kw):
            return self._arr.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self._arr.__dlpack_device__()

    src = np.arange(5, dtype=np.float32)
    p = Producer(src)
    t = jn.from_dlpack(p)
    assert _ptr(t.numpy()) == _ptr(src)
    src[2] = 100.0
    assert t.numpy()[2] == 100.0
    del p, src
    gc.collect()
    np.testing.assert_array_equal(t.numpy(), [0, 1, 100, 3, 4])   # the tensor holds the producer's memory
    c = jn.from_dlpack(t, copy=True)
    assert _ptr(c.numpy()) != _ptr(t.numpy())
    np.testing.assert_array_equal(c.numpy(), t.numpy())


def test_tensor_requiring_grad_refuses_export_like_torch():
    p = jn.Parameter(np.ones(3, dtype=np.float32))
    with pytest.raises(RuntimeError, match="detach"):
        np.from_dlpack(p)
    a = np.from_dlpack(p.detach())                    # the detached tensor shares the parameter's memory
    assert _ptr(a) == _ptr(p.numpy())


def test_clear_errors_for_bad_input():
    with pytest.raises(TypeError, match="no __dlpack__"):
        jn.from_dlpack([1.0, 2.0])
    with pytest.raises(TypeError, match="complex128"):
        jn.from_dlpack(np.zeros(2, dtype=np.complex128))
    t = jn.tensor([1.0])
    with pytest.raises(BufferError, match="stream"):
        t.__dlpack__(stream=1)
    with pytest.raises(BufferError, match="cuda"):
        t.__dlpack__(dl_device=(2, 0))

    class OnGPU:
        def __dlpack__(self, **kw):
            raise AssertionError("not called")

        def __dlpack_device__(self):
            return (10, 0)
    with pytest.raises(BufferError, match="rocm"):
        jn.from_dlpack(OnGPU())


def test_versioned_capsule_and_read_only_view():
    t = jn.tensor(np.arange(3, dtype=np.float32))
    assert "dltensor_versioned" in repr(t.__dlpack__(max_version=(1, 0)))
    assert "dltensor_versioned" not in repr(t.__dlpack__())
    ro = jn.as_tensor(np.broadcast_to(np.arange(3.0), (2, 3)))     # a read-only broadcast view
    a = np.from_dlpack(ro)
    assert a.strides == (0, 8) and not a.flags.writeable


def test_jax_round_trip():
    jnp = pytest.importorskip("jax.numpy")
    t = jn.tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    j = jnp.from_dlpack(t)
    np.testing.assert_array_equal(np.asarray(j), t.numpy())
    back = jn.from_dlpack(j)                          # jitnet imports JAX's buffer without a copy
    assert _ptr(back.numpy()) == j.unsafe_buffer_pointer()
    np.testing.assert_array_equal(back.numpy(), t.numpy())
    assert float(jnp.asarray(jn.tensor(2.0))) == 2.0


def test_torch_round_trip():
    torch = pytest.importorskip("torch")
    t = jn.tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    tt = torch.from_dlpack(t)
    tt[0, 0] = 5.0
    assert t.numpy()[0, 0] == 5.0
    assert torch.as_tensor(jn.tensor(2.0)).item() == 2.0
    assert torch.tensor(jn.tensor(2.0)).item() == 2.0
    back = jn.from_dlpack(tt.T)
    assert back.numpy().strides == (4, 12)


# ---- bfloat16: NumPy's DLPack has none, so jitnet.dlpack labels and reads those capsules itself ----

def _bf16():
    pytest.importorskip("ml_dtypes")
    return jn.bfloat16.dtype


class _Producer:                                      # hands out whatever capsule its array makes
    def __init__(self, arr):
        self.arr, self.capsules = arr, []

    def __dlpack__(self, **kw):
        cap = self.arr.__dlpack__(**kw)
        self.capsules.append(cap)
        return cap

    def __dlpack_device__(self):
        return (1, 0)


def test_bfloat16_from_torch_is_zero_copy_and_releases_the_producer():
    torch = pytest.importorskip("torch")
    bf16 = _bf16()
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16)
    before = x._use_count()
    t = jn.from_dlpack(x)
    assert t.dtype == jn.bfloat16 and t.numpy().dtype == bf16 and t.shape == (3, 4)
    assert _ptr(t.numpy()) == x.data_ptr()
    assert x._use_count() == before + 1                # the DLPack tensor holds torch's tensor ...
    x[0, 1] = 5.0                                     # a write on the torch side is seen by jitnet
    assert float(t.numpy()[0, 1]) == 5.0
    t.numpy()[2, 3] = -2.5                            # and the other way (-2.5 is exact in bfloat16)
    assert float(x[2, 3]) == -2.5
    np.testing.assert_array_equal(t.numpy().astype(np.float32), x.float().numpy())
    view = t[1:]
    del t
    gc.collect()
    assert x._use_count() == before + 1                # ... while any view of that memory lives
    del view
    gc.collect()
    assert x._use_count() == before                    # then the producer's deleter has run


@pytest.mark.parametrize("view", ["transpose", "step_slice", "column"])
def test_bfloat16_views_keep_strides_both_ways(view):
    torch = pytest.importorskip("torch")
    _bf16()
    pick = {"transpose": lambda a: a.T, "step_slice": lambda a: a[1:, ::2], "column": lambda a: a[:, 3]}[view]
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6).to(torch.bfloat16)
    tv = pick(x)
    t = jn.from_dlpack(tv)                            # torch -> jitnet
    assert t.numpy().strides == tuple(2 * s for s in tv.stride()) and t.shape == tuple(tv.shape)
    assert _ptr(t.numpy()) == tv.data_ptr()
    np.testing.assert_array_equal(t.numpy().astype(np.float32), tv.float().numpy())
    base = jn.tensor(np.arange(24, dtype=np.float32).reshape(4, 6), dtype=jn.bfloat16)
    jv = pick(base)
    for back in (torch.from_dlpack(jv),                                  # versioned capsule (max_version)
                 torch.utils.dlpack.from_dlpack(jv.__dlpack__())):       # legacy "dltensor" capsule
        assert back.dtype == torch.bfloat16 and back.data_ptr() == _ptr(jv.numpy())
        assert tuple(2 * s for s in back.stride()) == jv.numpy().strides
        np.testing.assert_array_equal(back.float().numpy(), jv.numpy().astype(np.float32))
    back[...] = 7.0                                   # a torch write lands in jitnet's memory
    assert (jv.numpy().astype(np.float32) == 7.0).all()


def test_bfloat16_capsules_names_lifetime_and_read_only():
    bf16 = _bf16()
    a = np.arange(4, dtype=np.float32).astype(bf16)
    ref = weakref.ref(a)
    t = jn.from_dlpack(a)
    cap = t.__dlpack__()
    assert 'capsule object "dltensor"' in repr(cap)
    del a, t
    gc.collect()
    assert ref() is not None                          # an unused capsule holds the array ...
    del cap
    gc.collect()
    assert ref() is None                              # ... and frees it when dropped unconsumed

    src = np.arange(6, dtype=np.float32).reshape(2, 3).astype(bf16)  # (owns its memory)
    ref = weakref.ref(src)
    p = _Producer(jn.from_dlpack(src))
    t = jn.from_dlpack(p)                             # jitnet exports, jitnet imports: same memory
    assert _ptr(t.numpy()) == _ptr(src) and t.numpy().dtype == bf16
    assert "used_dltensor_versioned" in repr(p.capsules[-1])   # the consumed capsule is renamed
    del p, src
    gc.collect()
    assert ref() is not None
    np.testing.assert_array_equal(t.numpy().astype(np.float32), np.arange(6.0).reshape(2, 3))
    del t
    gc.collect()
    assert ref() is None                              # the deleter released the exported array

    ro = jn.as_tensor(np.broadcast_to(np.ones(3, dtype=bf16), (2, 3)))
    with pytest.raises(BufferError, match="readonly"):
        ro.__dlpack__()                               # a legacy capsule cannot say read-only
    r = jn.from_dlpack(_Producer(ro))
    assert not r.numpy().flags.writeable and r.numpy().strides == (0, 2)
    c = jn.from_dlpack(_Producer(ro), copy=True)
    assert c.numpy().flags.writeable and _ptr(c.numpy()) != _ptr(ro.numpy())


def test_bfloat16_jax_round_trip_and_other_dtypes_unchanged():
    jnp = pytest.importorskip("jax.numpy")
    bf16 = _bf16()
    t = jn.tensor(np.arange(6, dtype=np.float32).reshape(2, 3), dtype=jn.bfloat16)
    j = jnp.from_dlpack(t)
    assert j.dtype == bf16
    np.testing.assert_array_equal(np.asarray(j).astype(np.float32), t.numpy().astype(np.float32))
    back = jn.from_dlpack(j)
    assert back.dtype == jn.bfloat16 and _ptr(back.numpy()) == j.unsafe_buffer_pointer()
    with pytest.raises(TypeError, match="complex64"):     # other dtypes still go through NumPy's checks
        jn.from_dlpack(_Producer(np.zeros(2, dtype=np.complex64)))
