"""jn.debug_nans: the first primitive that makes a NaN or an infinity raises, eagerly, under jit, in loops."""
import os
import subprocess
import sys

import numpy as np
import pytest

import jitnet as jn
import jitnet.nn.functional as F


@pytest.fixture(autouse=True)
def _mode_off_after():
    yield
    jn.debug_nans(False)


def _raises(fn, *parts):
    """Run fn under the mode; return the FloatingPointError's message after checking it contains every part."""
    with jn.debug_nans():
        with pytest.raises(FloatingPointError) as ei:
            fn()
    msg = str(ei.value)
    for p in parts:
        assert p in msg, f"{p!r} not in:\n{msg}"
    return msg


# -- the switch ----------------------------------------------------------------------------------------------

def test_off_by_default_and_nan_propagates():
    assert not jn.debug_nans_enabled()
    y = jn.log(jn.tensor([-1.0, 1.0]))
    assert np.isnan(y.numpy()[0]) and y.numpy()[1] == 0.0
    z = jn.tensor([0.0]) / jn.tensor([0.0])
    assert np.isnan(z.numpy()[0])


def test_context_manager_restores_state():
    assert not jn.debug_nans_enabled()
    with jn.debug_nans():
        assert jn.debug_nans_enabled()
        with jn.debug_nans(False):
            assert not jn.debug_nans_enabled()
        assert jn.debug_nans_enabled()
    assert not jn.debug_nans_enabled()
    with pytest.raises(FloatingPointError):
        with jn.debug_nans():
            jn.log(jn.tensor([-1.0]))
    assert not jn.debug_nans_enabled()        # restored after an error too
    jn.debug_nans(True)
    assert jn.debug_nans_enabled()
    jn.debug_nans(False)
    assert not jn.debug_nans_enabled()


def test_env_var_turns_it_on_at_import():
    code = "import jitnet as jn; print(jn.debug_nans_enabled())"
    for val, want in (("1", "True"), ("0", "False")):
        env = dict(os.environ, JITNET_DEBUG_NANS=val)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == want, out.stderr


# -- eager ---------------------------------------------------------------------------------------------------

def test_eager_forward_log_of_negative():
    x = jn.tensor([[1.0, -2.0, 3.0]])
    msg = _raises(lambda: jn.log(x), "log produced NaN", "forward pass", "log(float32[1, 3])",
                  "test_debug_nans.py", "jn.log(x)")
    assert "backward" not in msg


def test_eager_forward_zero_over_zero():
    a = jn.tensor([0.0, 1.0], dtype=jn.float64)
    b = jn.tensor([0.0, 2.0], dtype=jn.float64)
    _raises(lambda: a / b, "divide produced NaN", "divide(float64[2], float64[2])", "a / b")


def test_eager_inf_from_finite_inputs_is_reported():
    _raises(lambda: jn.exp(jn.tensor([1000.0])), "exp produced inf")


def test_eager_backward_sqrt_at_zero():
    x = jn.tensor([0.0, 4.0], requires_grad=True)
    with jn.debug_nans():
        y = jn.sqrt(x).sum()                     # forward is finite: sqrt(0) = 0
        with pytest.raises(FloatingPointError) as ei:
            y.backward()
    msg = str(ei.value)
    for part in ("backward pass", "sqrt's gradient", "the forward sqrt ran at", "jn.sqrt(x).sum()",
                 "y.backward()", "produced inf"):
        assert part in msg, msg


def test_eager_backward_of_a_forward_run_with_the_mode_off():
    x = jn.tensor([0.0], requires_grad=True)
    y = jn.sqrt(x).sum()
    with jn.debug_nans():
        with pytest.raises(FloatingPointError, match="ran before debug_nans was on"):
            y.backward()


def test_eager_input_already_nan_is_named():
    x = jn.tensor([np.nan, 1.0])
    _raises(lambda: x * 2.0, "multiply produced NaN", "input 0 (float32[2]) was already NaN")


def test_deliberate_infinities_pass_until_they_make_a_nan():
    x = jn.tensor([[1.0, 2.0, 3.0]])
    mask = jn.tensor([[True, False, True]])
    with jn.debug_nans():
        s = jn.where(mask, x, jn.tensor(-np.inf))          # a -inf mask: allowed
        p = jn.softmax(s, axis=-1)
        assert np.isfinite(p.numpy()).all()
        pooled = F.max_pool2d(jn.ones((1, 1, 4, 4)), 3, stride=1, padding=1)   # -inf padding inside
        assert np.isfinite(pooled.numpy()).all()
    _raises(lambda: s * 0.0, "multiply produced NaN")      # -inf * 0


def test_integer_outputs_are_not_checked():
    with jn.debug_nans():
        i = jn.argmax(jn.tensor([1.0, 3.0, 2.0]))
        assert int(i.item()) == 1


# -- jit -----------------------------------------------------------------------------------------------------

def test_jit_forward_first_call_and_later_calls():
    @jn.jit
    def f(a):
        b = a * 2.0
        return jn.log(b) + 1.0

    good, bad = jn.tensor([1.0, 2.0]), jn.tensor([1.0, -2.0])
    with jn.debug_nans():
        for _ in range(3):
            f(good)
    msg = _raises(lambda: f(bad), "log produced NaN", "of a jitted step", "log(float32[2])",
                  "return jn.log(b) + 1.0")
    assert "forward pass" in msg
    f(bad)                                        # mode off: the NaN goes through


def test_jit_input_nan_is_named_as_argument():
    @jn.jit
    def f(a, b):
        return a * b

    a, b = jn.tensor([1.0, 2.0]), jn.tensor([np.nan, 1.0])
    _raises(lambda: f(a, b), "input 1 (float32[2]) was already NaN: argument 1 of the compiled step")
    with jn.debug_nans():
        f(a, jn.tensor([1.0, 1.0]))                # traced now; the next call runs the checked plan
    _raises(lambda: f(a, b), "already NaN: argument 1 of the compiled step")


def test_jit_backward():
    w = jn.Parameter(np.array([1.0, 4.0], np.float32))

    @jn.jit
    def step(x):
        loss = jn.sqrt(w * x).sum()
        loss.backward()
        return loss

    with jn.debug_nans():
        w.grad = None
        step(jn.tensor([1.0, 1.0]))
        w.grad = None
        step(jn.tensor([1.0, 1.0]))
    w.grad = None
    msg = _raises(lambda: step(jn.tensor([0.0, 1.0])), "backward pass", "sqrt's gradient", "of a jitted step",
                  "loss = jn.sqrt(w * x).sum()", "loss.backward()")
    assert "produced inf" in msg or "produced NaN" in msg


def test_native_driver_plan_is_checked_from_the_third_call_on():
    """Without the mode the plan's steps become one native driver from the third call; with it they do not."""
    @jn.jit
    def f(a, w):
        h = jn.sqrt(jn.matmul(a, w) - 1.0)
        return (h * 3.0).sum(axis=1) + 1.0

    w = jn.tensor(np.eye(2, dtype=np.float32))
    good = jn.tensor(np.full((2, 2), 2.0, np.float32))
    bad = jn.tensor(np.array([[2.0, 0.5], [2.0, 2.0]], np.float32))
    for _ in range(4):
        f(good, w)                                 # the fast plan: native from its third run
    fast = next(iter(f._cache.values())).plan
    assert getattr(fast, "segments", None), fast.step_names
    assert np.isnan(f(bad, w).numpy()[0])          # off: no check, the NaN propagates
    with jn.debug_nans():
        for _ in range(4):
            f(good, w)                             # the checked plan, past its third run
        with pytest.raises(FloatingPointError) as ei:
            f(bad, w)
    msg = str(ei.value)
    assert "sqrt produced NaN" in msg and "sqrt(float32[2, 2])" in msg, msg
    assert "h = jn.sqrt(jn.matmul(a, w) - 1.0)" in msg, msg
    assert np.isnan(f(bad, w).numpy()[0])          # off again: the fast plan is used


def test_scan_body():
    def body(c, x):
        c = c + jn.log(x)
        return c, c * 1.0

    @jn.jit
    def run(xs):
        c, ys = jn.scan(body, jn.zeros((2,)), xs)
        return c

    good = jn.ones((4, 2)) * 2.0
    bad = jn.tensor(np.array([[2, 2], [2, 2], [2, -1], [2, 2]], np.float32))
    with jn.debug_nans():
        for _ in range(3):
            run(good)
    _raises(lambda: run(bad), "log produced NaN", "c = c + jn.log(x)")
    assert np.isnan(run(bad).numpy()[1])            # off: propagates


def test_eager_scan_body():
    def body(c, x):
        return c + jn.log(x), c

    _raises(lambda: jn.scan(body, jn.zeros((1,)), jn.tensor([[1.0], [-1.0]])), "log produced NaN",
            "return c + jn.log(x), c")
