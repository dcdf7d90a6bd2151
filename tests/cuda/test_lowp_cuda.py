"""float16 and bfloat16 on a GPU: float16 tensors move there and its kernels compute them natively (no float32
rule); bfloat16 stays on the CPU and saying otherwise is a TypeError naming the conversion."""
import numpy as np
import pytest

import jitnet as jn


def test_float16_moves_and_computes_on_the_gpu():
    x = jn.tensor([1.0, 2.0, 3.0], dtype=jn.float16)
    g = x.to("cuda")
    y = (g * g + 1).cpu()
    assert g.is_cuda and y.dtype == jn.float16
    assert y.numpy().tolist() == (x.numpy() * x.numpy() + 1).tolist()


def test_bfloat16_refuses_the_gpu_with_a_clear_error():
    pytest.importorskip("ml_dtypes")
    x = jn.tensor([1.0, 2.0], dtype=jn.bfloat16)
    with pytest.raises(TypeError, match=r"to_device: bfloat16 tensors live on the CPU.*\.float\(\) or \.half\(\)"):
        x.to("cuda")
    with pytest.raises(TypeError, match="bfloat16 tensors live on the CPU"):
        jn.tensor(np.ones(2, jn.bfloat16), device="cuda")
    m = jn.nn.Linear(2, 2, dtype=jn.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 tensors live on the CPU"):
        m.to("cuda")
    assert x.half().to("cuda").cpu().dtype == jn.float16
