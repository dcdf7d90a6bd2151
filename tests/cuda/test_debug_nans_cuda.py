"""jn.debug_nans on the GPU: a device-side count of NaNs/infinities after each op, eagerly and under jit."""
import numpy as np
import pytest

import jitnet as jn


@pytest.fixture(autouse=True)
def _mode_off_after():
    yield
    jn.debug_nans(False)


def test_device_counter_counts_nans_and_infs():
    from jitnet.nans_cuda import nonfinite_counts
    x = jn.tensor(np.array([[1.0, np.nan, np.inf], [-np.inf, np.nan, 2.0]], np.float32)).to("cuda")
    assert nonfinite_counts(x._data) == (2, 2)
    assert nonfinite_counts(jn.tensor(np.ones(5, np.float32)).to("cuda")._data) == (0, 0)
    assert nonfinite_counts(x.T._data) == (2, 2)            # a strided view


def test_eager_forward_and_backward_on_the_device():
    x = jn.tensor([1.0, -2.0]).to("cuda")
    y = jn.log(x)                                            # off: the NaN goes through
    assert np.isnan(y.numpy()[1])
    with jn.debug_nans():
        with pytest.raises(FloatingPointError, match=r"log produced NaN in the forward pass") as ei:
            jn.log(x)
        assert "jn.log(x)" in str(ei.value)
        z = jn.tensor([0.0, 4.0], requires_grad=True)
        zc = z.to("cuda")
        s = jn.sqrt(zc).sum()
        with pytest.raises(FloatingPointError, match=r"backward pass \(an op of sqrt's gradient\)"):
            s.backward()


def test_jitted_step_on_the_device():
    @jn.jit
    def f(a):
        return jn.log(a * 2.0) + 1.0

    good, bad = jn.tensor([1.0, 2.0]).to("cuda"), jn.tensor([1.0, -2.0]).to("cuda")
    with jn.debug_nans():
        f(good)
        f(good)                                              # the checked GPU plan
        with pytest.raises(FloatingPointError, match=r"log produced NaN in the forward pass of a jitted step"):
            f(bad)
    assert np.isnan(f(bad).numpy()[1])
