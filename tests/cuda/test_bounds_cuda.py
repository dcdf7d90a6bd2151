"""Index bounds on the CUDA backend: kernels record the first bad index, label or id with its position in the
device error record, and the next synchronizing call raises IndexError naming the op, value, position and bound."""
import numpy as np
import pytest

import jitnet as jn
import jitnet.nn.functional as F
from jitnet.autodiff.core import apply
from jitnet.nn.embedding_ops import embedding
from jitnet.optim import updates as U

N = 4


def _i(*v):
    return jn.tensor(np.array(v, np.int64)).to("cuda")


def _raises(call, op, value, pos):
    with pytest.raises(IndexError) as ei:
        r = call()
        jn.cuda.synchronize()
        r.numpy()
    msg = str(ei.value)
    assert msg.startswith(f"{op}: ") and f" {value} is out of bounds for size {N}" in msg, msg
    assert f"at position {pos} (flat)" in msg and "checked on the device" in msg, msg


def test_index_kernels_report_value_position_and_bound():
    x = jn.ones((N,)).to("cuda")
    w = jn.ones((N, 2)).to("cuda")
    logits = jn.zeros((2, N)).to("cuda")
    cases = [
        (lambda i: jn.take(x, i), "take", "wrap"),
        (lambda i: jn.scatter_add(jn.zeros((N,)).to("cuda"), i, jn.ones((2,)).to("cuda")), "scatter_add", "wrap"),
        (lambda i: embedding(w, i), "embedding", "error"),
        (lambda i: jn.one_hot(i, N), "one_hot", "ignore"),
        (lambda i: F.cross_entropy(logits, i, reduction="none"), "cross_entropy", "ignore"),
        (lambda i: apply(F.XENT_INT_GRAD, logits, i, jn.ones((2,)).to("cuda")), "cross_entropy", "ignore"),
        (lambda i: F.cross_entropy(logits, i), "cross_entropy", "ignore"),
        (lambda i: apply(F.XENT_INT_REDUCED_GRAD, logits, i, jn.ones(()).to("cuda"), mean=True), "cross_entropy",
         "ignore"),
    ]
    for run, op, neg in cases:
        bads = [N, 2 ** 40] + ([-N - 1] if neg == "wrap" else [-1] if neg == "error" else [])
        for b in bads:
            _raises(lambda: run(_i(0, b)), op, b, 1)
    # take_along_axis over a leading axis: the position is in the index array's own layout
    t = jn.ones((N, 2)).to("cuda")
    _raises(lambda: jn.take_along_axis(t, jn.tensor(np.array([[0, 1], [2, N]])).to("cuda"), axis=0),
            "take_along_axis", N, 3)


def test_sparse_update_rejects_negative_rows_on_the_device():
    p = jn.Variable(np.ones((N, 2), np.float32)).to("cuda")
    _raises(lambda: U.sgd_sparse_update(p, jn.ones((2, 2)).to("cuda"), _i(0, -1), None,
                                        jn.tensor(np.float32(0.1))), "sgd (sparse update)", -1, 1)
