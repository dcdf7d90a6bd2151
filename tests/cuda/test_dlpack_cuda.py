"""DLPack on a GPU tensor: its device code, and export/conversion errors that name the zero-copy path."""
import numpy as np
import pytest

import jitnet as jn


def test_gpu_tensor_dlpack_device_and_clear_errors():
    t = jn.tensor([1.0, 2.0]).to("cuda")
    assert t.__dlpack_device__() == (2, 0)
    assert not hasattr(t, "__dlpack__")      # consumers fall back to __cuda_array_interface__ (zero copy)
    with pytest.raises(AttributeError, match="__cuda_array_interface__"):
        t.__dlpack__()
    with pytest.raises(ValueError, match="copy"):
        np.asarray(t, copy=False)
    np.testing.assert_array_equal(np.asarray(t), [1.0, 2.0])      # an explicit host copy still works
