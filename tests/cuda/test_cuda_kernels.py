"""Checks of the CUDA kernels alone (the op suite itself runs here through test_ops_cuda.py): reductions long
enough to take two kernel passes, the block-per-row arg-reduction kernel, and the skip of rows without a CUDA
implementation. References are NumPy."""
import numpy as np
import pytest
from helpers import assert_close, no_cuda_reason

import jitnet as jn
import jitnet.kernels_gpu as KG

RNG = np.random.default_rng(7)


def test_long_rows_and_columns_take_two_passes():
    # rows longer than ROW_CHUNK and columns longer than COL_CHUNK reduce in two kernel passes
    a = RNG.uniform(-2, 2, (2, KG.ROW_CHUNK * 2 + 3)).astype(np.float32)
    t = jn.tensor(a).to("cuda")
    assert_close(t.sum(axis=1), a.astype(np.float64).sum(axis=1), rtol=1e-5, atol=1e-3, device="cuda")
    assert_close(t.max(axis=1), a.max(axis=1), device="cuda")
    b = RNG.uniform(-2, 2, (KG.COL_CHUNK * 3 + 1, 3)).astype(np.float32)
    u = jn.tensor(b).to("cuda")
    assert_close(u.sum(axis=0), b.astype(np.float64).sum(axis=0), rtol=1e-5, atol=1e-4, device="cuda")
    assert_close(u.min(axis=0), b.min(axis=0), device="cuda")
    x = jn.tensor(b.astype(np.float64)).to("cuda").requires_grad_()
    (x.sum(axis=0) * jn.tensor([1.0, 2.0, 3.0], dtype=jn.float64).to("cuda")).sum().backward()
    assert_close(x.grad, np.broadcast_to([1.0, 2.0, 3.0], b.shape), device="cuda")


def test_arg_reductions_of_long_rows_use_a_block_per_row():
    a = RNG.uniform(-2, 2, (2, KG.SMALL_ROW * 3)).astype(np.float32)
    a[1, 5] = np.nan
    t = jn.tensor(a).to("cuda")
    assert_close(jn.argmax(t, 1), np.argmax(a, 1), dtype=jn.int64, device="cuda")
    assert_close(jn.argmin(t, 1), np.argmin(a, 1), dtype=jn.int64, device="cuda")


def test_a_row_without_cuda_implementation_is_recognized_for_the_skip():
    import jitnet.models.dnc  # noqa: F401  (rows registered by the models)
    import jitnet.models.seq2seq  # noqa: F401
    from jitnet.autodiff.core import REGISTRY, apply
    rows = [r for r in REGISTRY.values() if r.extra.get("no_cuda") and r.impl.get("cuda") is None
            and not (r.kind == "elementwise" and r.template is not None)]
    if not rows:
        pytest.skip("every registry row has a CUDA implementation")
    x = jn.ones((2, 3, 4)).to("cuda")
    for row in rows:
        with pytest.raises(NotImplementedError) as info:
            apply(row, x)                   # the device is chosen before the implementation sees its inputs
        reason = no_cuda_reason(info.value)
        assert reason == f"{row.name}: {row.extra['no_cuda']}", (row.name, str(info.value))
    assert no_cuda_reason(NotImplementedError("add: this op has no CUDA kernel")) is None   # add has one
    assert no_cuda_reason(NotImplementedError("something else")) is None
    assert no_cuda_reason(ValueError("bn_moments: this op has no CUDA kernel")) is None


def test_a_0d_tensor_keeps_its_shape_on_the_gpu():
    t = jn.tensor(1.5).to("cuda")
    assert t.shape == () and t.numpy().shape == ()
