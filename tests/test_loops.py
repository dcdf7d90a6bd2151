"""jn.scan and jn.while_loop: eager and compiled, values and gradients, errors."""
import numpy as np
import pytest

import jitnet as jn
from jitnet.testing import gradcheck


def _rnn_body(W):
    def body(c, x):
        h, s = c
        h = jn.tanh(h @ W + x)
        return (h, s + jn.sum(h)), h * 2.0
    return body


def _python_loop(body, carry, xs, reverse=False):
    ys = []
    order = range(xs.shape[0] - 1, -1, -1) if reverse else range(xs.shape[0])
    for t in order:
        carry, y = body(carry, xs[t])
        ys.append(y)
    if reverse:
        ys.reverse()
    return carry, jn.stack(ys)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_matches_python_loop_eager_and_jit(reverse):
    jn.random.seed(0)
    W = jn.random.normal((3, 3), std=0.5)
    body = _rnn_body(W)
    h0, xs = jn.random.normal((2, 3)), jn.random.normal((6, 2, 3))
    (h_ref, s_ref), ys_ref = _python_loop(body, (h0, jn.zeros(())), xs, reverse)
    f = lambda h0, xs: jn.scan(body, (h0, jn.zeros(())), xs, reverse=reverse)  # noqa: E731
    for fn in (f, jn.jit(f), jn.jit(f)):
        (h, s), ys = fn(h0, xs)
        np.testing.assert_allclose(h.numpy(), h_ref.numpy(), rtol=1e-6)
        np.testing.assert_allclose(s.numpy(), s_ref.numpy(), rtol=1e-6)
        np.testing.assert_allclose(ys.numpy(), ys_ref.numpy(), rtol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_gradients_gradcheck_eager_and_jit(reverse):
    rng = np.random.default_rng(1)
    W0 = rng.standard_normal((3, 3)) * 0.5

    def loss(h0, xs, W):
        (h, s), ys = jn.scan(_rnn_body(W), (h0, jn.zeros((), dtype=jn.float64)), xs, reverse=reverse)
        return jn.sum(ys * ys) + s + jn.sum(h)

    args = [rng.standard_normal((2, 3)), rng.standard_normal((4, 2, 3)), W0]
    assert gradcheck(loss, *args)
    eager = jn.grad(loss, argnums=(0, 1, 2))(*[jn.tensor(a) for a in args])
    jg = jn.jit(jn.grad(loss, argnums=(0, 1, 2)))
    for _ in range(2):
        got = jg(*[jn.tensor(a) for a in args])
        for a, b in zip(got, eager):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)


def test_backward_scan_stores_no_carries_unless_a_second_order_gradient_reads_them():
    rng = np.random.default_rng(2)
    args = [jn.tensor(rng.standard_normal(s)) for s in ((2, 3), (5, 2, 3), (3, 3))]

    def loss(h0, xs, W):
        (h, s), ys = jn.scan(_rnn_body(W), (h0, jn.zeros((), dtype=jn.float64)), xs)
        return jn.sum(ys * ys) + s

    g, _ = jn.jit(jn.grad(loss, argnums=(0, 2))).lower(*args)
    scans = [n for n in g.nodes if n.alive and n.prim.name == "scan"]
    assert len(scans) == 2                       # the forward scan and the reverse scan of its gradient
    fwd, bwd = scans
    assert fwd.params["save"] and not bwd.params["save"]
    # a gradient of a gradient: right eagerly (the tape of the Python loop); under jit a clear error, not a
    # silently wrong value (the compiled reverse scan is not differentiable twice)
    gg = lambda W: jn.sum(jn.grad(loss, argnums=2)(args[0], args[1], W) ** 2)  # noqa: E731
    assert gradcheck(gg, rng.standard_normal((3, 3)))
    with pytest.raises(NotImplementedError, match="gradient of a gradient through a compiled scan"):
        jn.jit(jn.grad(gg))(args[2])


def test_scan_gradient_reaches_captured_variables_under_jit():
    jn.random.seed(2)
    W = jn.Parameter(jn.random.normal((3, 3), std=0.5, dtype=jn.float64), name="W")
    h0, xs = jn.random.normal((2, 3), dtype=jn.float64), jn.random.normal((5, 2, 3), dtype=jn.float64)

    def step(h0, xs):
        W.grad = None
        (h, s), ys = jn.scan(_rnn_body(W), (h0, jn.zeros((), dtype=jn.float64)), xs)
        loss = jn.sum(ys) + s
        loss.backward()
        return loss, W.grad

    loss_e, gw_e = step(h0, xs)
    gw_e = gw_e.numpy().copy()
    js = jn.jit(step)
    for _ in range(2):
        loss_j, gw_j = js(h0, xs)
        np.testing.assert_allclose(gw_j.numpy(), gw_e, rtol=1e-9)
        np.testing.assert_allclose(loss_j.numpy(), loss_e.numpy(), rtol=1e-12)


def test_zero_length_scan():
    body = _rnn_body(jn.eye(3))
    h0 = jn.ones((2, 3))
    f = lambda h0, xs: jn.scan(body, (h0, jn.zeros(())), xs)  # noqa: E731
    for fn in (f, jn.jit(f)):
        (h, s), ys = fn(h0, jn.zeros((0, 2, 3)))
        np.testing.assert_array_equal(h.numpy(), h0.numpy())
        assert s.item() == 0 and ys.shape == (0, 2, 3)


def test_scan_with_length_and_no_xs():
    def body(c, _):
        return c * 2.0, c
    for fn in (lambda c: jn.scan(body, c, length=4), jn.jit(lambda c: jn.scan(body, c, length=4))):
        c, ys = fn(jn.ones(()))
        assert c.item() == 16 and ys.numpy().tolist() == [1, 2, 4, 8]


def test_compiled_scan_does_not_grow_with_length():
    W = jn.random.normal((4, 4), std=0.3)
    body = _rnn_body(W)

    def loss(h0, xs):
        (h, s), ys = jn.scan(body, (h0, jn.zeros(())), xs)
        return jn.sum(ys)

    vg = jn.jit(jn.value_and_grad(loss))
    sizes = []
    for T in (3, 40):
        g, plan = vg.lower(jn.ones((2, 4)), jn.ones((T, 2, 4)))
        sizes.append((len(g.live_nodes()), plan.kernel_count))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_checkpoint_modes_same_gradients(reverse):
    # False: residuals stacked by the forward loop; True: recompute from saved carries; "unroll": in the graph
    rng = np.random.default_rng(2)
    W = jn.tensor(rng.standard_normal((3, 3)) * 0.5)

    def loss(h0, xs, W, checkpoint):
        (h, s), ys = jn.scan(_rnn_body(W), (h0, jn.zeros((), dtype=jn.float64)), xs, reverse=reverse,
                             checkpoint=checkpoint)
        return jn.sum(ys * ys) + s + jn.sum(h * h)

    h0, xs = jn.tensor(rng.standard_normal((2, 3))), jn.tensor(rng.standard_normal((5, 2, 3)))
    ref = jn.jit(jn.grad(loss, argnums=(0, 1, 2)), static_argnums=(3,))
    eager = jn.grad(loss, argnums=(0, 1, 2))(h0, xs, W, True)
    nodes = {}
    for cp in (False, True, "unroll"):
        for _ in range(3):                       # the third call runs the native loops
            got = ref(h0, xs, W, cp)
            for a, b in zip(got, eager):
                np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)
        g, _ = ref.lower(h0, xs, W, cp)
        scans = [n for n in g.live_nodes() if n.prim.name == "scan"]
        nodes[cp] = (len(g.live_nodes()), len(scans), [getattr(n.params["body"], "store", None) for n in scans])
    assert nodes[False][1] == 2 and nodes[False][2][0] is not None      # the forward scan stacks residuals
    assert nodes[True][1] == 2 and nodes[True][2] == [None, None]       # recompute: carries only
    assert nodes["unroll"][1] == 0 and nodes["unroll"][0] > nodes[True][0]
    with pytest.raises(ValueError, match="checkpoint must be"):
        jn.scan(_rnn_body(W), (h0, jn.zeros(())), xs, checkpoint="sometimes")


def test_carry_shape_or_dtype_change_names_the_entry():
    def grows(c, x):
        return (c[0], jn.concatenate([c[1], x])), x

    with pytest.raises(TypeError, match="carry entry 1"):
        jn.scan(grows, (jn.zeros(2), jn.zeros(2)), jn.ones((3, 2)))
    with pytest.raises(TypeError, match="carry entry 1"):
        jn.jit(lambda c, xs: jn.scan(grows, c, xs))((jn.zeros(2), jn.zeros(2)), jn.ones((3, 2)))

    def retype(c, x):
        return c.astype(jn.float64), x

    with pytest.raises(TypeError, match="carry entry 0 changed from float32"):
        jn.scan(retype, jn.zeros(2), jn.ones((3, 2)))


def test_while_loop_data_dependent_trip_count():
    def cond(c):
        i, x = c
        return x < 100.0

    def body(c):
        i, x = c
        return i + 1, x * 3.0

    for fn in (lambda x: jn.while_loop(cond, body, (jn.tensor(0), x)),
               jn.jit(lambda x: jn.while_loop(cond, body, (jn.tensor(0), x)))):
        for start, steps in ((1.0, 5), (50.0, 1), (200.0, 0), (2.0, 4)):
            i, x = fn(jn.tensor(start))
            assert i.item() == steps, (start, i.item())
            assert x.item() == pytest.approx(start * 3 ** steps)


def test_while_loop_has_no_gradient_and_says_so():
    def f(x):
        return jn.sum(jn.while_loop(lambda c: jn.sum(c) < 10.0, lambda c: c * 2.0, x))

    with pytest.raises(TypeError, match="while_loop has no gradient"):
        jn.jit(jn.grad(f))(jn.ones(2))
