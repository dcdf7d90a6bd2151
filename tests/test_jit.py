"""jitnet.jit: equality with eager execution, kernel counts, retracing, disk cache, errors."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jitnet as jn
from jitnet.compiler import stats as jit_stats

# --------------------------------------------------------------------------------------------------------------
# random elementwise / broadcast / reduction graphs: jit == eager, forward and gradient
# --------------------------------------------------------------------------------------------------------------

UNARY = [jn.exp, jn.tanh, jn.sigmoid, jn.relu, jn.softplus, jn.square, jn.sin, lambda t: -t, jn.abs,
         lambda t: jn.log1p(jn.abs(t)), lambda t: jn.sqrt(jn.abs(t) + 1.0)]
BINARY = [jn.add, jn.subtract, jn.multiply, jn.maximum, jn.minimum, lambda a, b: a / (jn.abs(b) + 1.0)]
SHAPES = [(3, 4), (1, 4), (3, 1), (4,), ()]


@st.composite
def programs(draw):
    n_in = draw(st.integers(2, 3))
    shapes = [draw(st.sampled_from(SHAPES)) for _ in range(n_in)]
    steps = []
    n_vals = n_in
    for _ in range(draw(st.integers(2, 7))):
        kind = draw(st.sampled_from(["u", "b", "b", "r"]))
        if kind == "u":
            steps.append(("u", draw(st.integers(0, len(UNARY) - 1)), draw(st.integers(0, n_vals - 1))))
        elif kind == "b":
            steps.append(("b", draw(st.integers(0, len(BINARY) - 1)), draw(st.integers(0, n_vals - 1)),
                          draw(st.integers(0, n_vals - 1))))
        else:
            steps.append(("r", draw(st.sampled_from([None, 0, -1])), draw(st.booleans()),
                          draw(st.integers(0, n_vals - 1))))
        n_vals += 1
    seed = draw(st.integers(0, 2 ** 16))
    return shapes, steps, seed


def _run_program(steps, xs):
    vals = list(xs)
    for s in steps:
        if s[0] == "u":
            vals.append(UNARY[s[1]](vals[s[2]]))
        elif s[0] == "b":
            a, b = vals[s[2]], vals[s[3]]
            try:
                np.broadcast_shapes(a.shape, b.shape)
            except ValueError:          # keep drawn programs valid: reduce the right operand to a scalar
                b = jn.sum(b)
            vals.append(BINARY[s[1]](a, b))
        else:
            x = vals[s[3]]
            axis = s[1] if x.ndim else None
            vals.append(jn.sum(x, axis=axis, keepdims=s[2]))
    out = vals[-1]
    for v in vals[len(xs):-1]:
        out = out + jn.sum(v) * 0.01
    return out


@settings(deadline=None, max_examples=6)
@given(programs())
def test_random_graphs_match_eager(prog):
    _check_program(prog)


@pytest.mark.slow
@settings(deadline=None, max_examples=25)
@given(programs())
def test_random_graphs_match_eager_many(prog):
    _check_program(prog)


def _check_program(prog):
    """Run a random program eagerly and jitted (trace run, then the plan); values and gradients agree."""
    shapes, steps, seed = prog
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(np.float64) for s in shapes]

    def f(*xs):
        return _run_program(steps, xs)

    def loss(*xs):
        return jn.sum(f(*xs))

    eager = f(*[jn.tensor(a) for a in arrays]).numpy()
    eager_g = jn.grad(loss, argnums=tuple(range(len(arrays))))(*[jn.tensor(a) for a in arrays])
    jf = jn.jit(f)
    jg = jn.jit(jn.grad(loss, argnums=tuple(range(len(arrays)))))
    for _ in range(2):                                   # trace run, then the compiled plan
        out = jf(*[jn.tensor(a) for a in arrays]).numpy()
        np.testing.assert_allclose(out, eager, rtol=1e-12, atol=1e-12)
        gs = jg(*[jn.tensor(a) for a in arrays])
        for a, b in zip(gs, eager_g):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# kernel counts
# --------------------------------------------------------------------------------------------------------------

def _plan(f, *args):
    g, plan = jn.jit(f).lower(*args)
    return plan


def test_relu_fma_is_one_kernel():
    a, b, c = (jn.random.normal((64, 32)) for _ in range(3))
    plan = _plan(lambda a, b, c: jn.relu(a * b + c), a, b, c)
    assert plan.kernel_count == 1 and len(plan.groups) == 1
    assert [m.prim.name for m in plan.groups[0].members] == ["multiply", "add", "relu"]


def test_broadcast_bias_relu_is_one_kernel():
    x, b = jn.random.normal((16, 8)), jn.random.normal((8,))
    plan = _plan(lambda x, b: jn.relu(x + b) * 2.0, x, b)
    assert plan.kernel_count == 1


def test_fused_groups_read_basic_slices_in_place():
    # x[t], x[:, a:b], reversed and strided slices feed a kernel directly: no view step, same values as eager
    z, x, b = jn.random.normal((6, 16)), jn.random.normal((3, 6, 8)), jn.random.normal((1, 16))

    def f(z, x, b):
        gates = jn.sigmoid(z[:, :8]) * jn.tanh(z[:, 8:])
        rev = x[1, ::-1, 1::2] + z[:, ::4] * x[2][:, :4]
        bc = jn.exp(b[0, 3:11]) + x[0]                  # a broadcast view
        return gates, rev, bc, z[1:3, :2] * 2.0         # the last one: a view whose result is also an output

    plan = _plan(f, z, x, b)
    assert not any(name.startswith("getitem") for name in plan.step_names), plan.step_names
    assert any("8 + i1" in src for src in plan.sources)
    for got, want in zip(jn.jit(f)(z, x, b), f(z, x, b)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)


def test_float32_tanh_matches_float64():
    x = np.concatenate([np.linspace(-30, 30, 20001), [0.0, -0.0, 1e-8, -1e-30, 0.124, 0.126]]).astype(np.float32)
    got = jn.tanh(jn.tensor(x)).numpy()
    np.testing.assert_allclose(got, np.tanh(x.astype(np.float64)), rtol=2e-6, atol=1e-37)
    special = jn.tanh(jn.tensor(np.array([np.nan, np.inf, -np.inf], np.float32))).numpy()
    assert np.isnan(special[0]) and special[1] == 1 and special[2] == -1


def test_softmax_is_at_most_two_kernels():
    x = jn.random.normal((32, 10))
    plan = _plan(lambda x: jn.softmax(x, axis=-1), x)
    assert plan.kernel_count <= 2
    plan = _plan(lambda x: jn.log_softmax(x * 2.0, axis=-1), x)
    assert plan.kernel_count <= 2


def _mlp_step():
    jn.random.seed(0)
    W1 = jn.Parameter(jn.random.normal((20, 16), std=0.1), name="W1")
    b1 = jn.Parameter(jn.zeros(16), name="b1")
    W2 = jn.Parameter(jn.random.normal((16, 5), std=0.1), name="W2")
    b2 = jn.Parameter(jn.zeros(5), name="b2")
    params = [W1, b1, W2, b2]

    def step(x, y):
        for p in params:
            p.grad = None
        h = jn.relu(x @ W1 + b1)
        loss = -(jn.log_softmax(h @ W2 + b2) * y).sum(axis=1).mean()
        loss.backward()
        with jn.no_grad():
            for p in params:
                p.assign(p - 0.1 * p.grad)
        return loss

    return params, step


def test_mlp_step_kernel_bound_and_matches_eager():
    params, step = _mlp_step()
    x = jn.random.normal((8, 20))
    y = jn.one_hot(jn.tensor([0, 1, 2, 3, 4, 0, 1, 2]), 5)
    init = [p.numpy().copy() for p in params]
    eager = [step(x, y).item() for _ in range(4)]
    eager_params = [p.numpy().copy() for p in params]
    for p, a in zip(params, init):
        p.assign(a)
    js = jn.jit(step)
    compiled = [js(x, y).item() for _ in range(4)]
    np.testing.assert_allclose(compiled, eager, rtol=1e-6)
    for p, a in zip(params, eager_params):
        np.testing.assert_allclose(p.numpy(), a, rtol=1e-5, atol=1e-7)
    g, plan = js.lower(x, y)
    # documented bound: 4 matmuls + 4 transposes-as-views, 5 reductions, log_softmax, and fused groups
    assert plan.kernel_count <= 22, plan.kernel_count
    # the parameter updates are fused with their assign: no separate assign kernel runs
    assert sum("assign" in n and "fused" not in n for n in plan.step_names) == 0
    # lower() restored the variables it touched
    for p, a in zip(params, eager_params):
        np.testing.assert_allclose(p.numpy(), a, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# tracing behaviour
# --------------------------------------------------------------------------------------------------------------

def test_same_signature_does_not_retrace_new_shape_does():
    calls = []

    @jn.jit
    def f(x):
        calls.append(1)
        return jn.tanh(x) * 2

    x = jn.ones((3, 4))
    t0 = jit_stats()["traces"]
    f(x)
    f(x)
    f(jn.zeros((3, 4)))
    assert len(calls) == 1 and jit_stats()["traces"] - t0 == 1
    np.testing.assert_allclose(f(jn.zeros((3, 4))).numpy(), 0)
    f(jn.ones((5, 4)))
    assert len(calls) == 2
    f(jn.ones((5, 4), dtype=jn.float64))
    assert len(calls) == 3


def test_static_arguments_are_part_of_the_signature():
    @jn.jit
    def f(x, k):
        return x * k

    assert f(jn.ones(3), 2).numpy().tolist() == [2, 2, 2]
    assert f(jn.ones(3), 3).numpy().tolist() == [3, 3, 3]
    assert f(jn.ones(3), 2).numpy().tolist() == [2, 2, 2]


def test_random_ops_draw_new_numbers_each_call():
    jn.random.seed(1)

    @jn.jit
    def f(x):
        return x * jn.random.uniform(x.shape)

    x = jn.ones((50,))
    a, b, c = f(x).numpy(), f(x).numpy(), f(x).numpy()
    assert not np.array_equal(a, b) and not np.array_equal(b, c)


def _abstract_counts():
    st = jit_stats()
    return st["abstract_traces"], st["abstract_fallbacks"]


@pytest.fixture
def cpu_process(monkeypatch):
    # A process that has used another device traces concretely (jitnet.compiler._abstract_ok); these tests use
    # CPU tensors only, so they may run in an xdist worker after device tests as in a CPU-only process.
    from jitnet.autodiff import core as ad
    monkeypatch.setattr(ad, "_DEVICES", False)
    monkeypatch.delenv("JITNET_TRACE", raising=False)


def test_first_trace_compiles_no_eager_elementwise_kernel(cpu_process):
    from jitnet import ops
    x = jn.tensor(np.linspace(-2, 2, 21 * 5).reshape(21, 5))        # float64, a shape no other test uses
    before = len(ops.SIN.extra["plans"]), len(ops.COS.extra["plans"])
    a0, f0 = _abstract_counts()
    f = jn.jit(lambda t: jn.sin(t) * jn.cos(t) + 1.0)
    out = f(x).numpy()                                                # the first call: traced, then the plan ran
    np.testing.assert_allclose(out, np.sin(x.numpy()) * np.cos(x.numpy()) + 1.0, rtol=1e-12)
    assert _abstract_counts() == (a0 + 1, f0)
    assert (len(ops.SIN.extra["plans"]), len(ops.COS.extra["plans"])) == before      # no eager sin/cos kernel
    jn.sin(x)                                                         # (eager use still builds one)
    assert len(ops.SIN.extra["plans"]) == before[0] + 1


def test_abstract_first_call_updates_variables_once_and_matches_concrete(cpu_process, monkeypatch):
    def run(mode):
        monkeypatch.setenv("JITNET_TRACE", mode)
        jn.random.seed(3)
        net = jn.nn.Sequential(jn.nn.Linear(6, 8), jn.nn.ReLU(), jn.nn.Dropout(0.5), jn.nn.Linear(8, 3))
        opt = jn.optim.Adam(net.parameters(), lr=1e-2)

        @jn.jit
        def step(x, y):
            opt.zero_grad()
            loss = jn.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            return loss

        x = jn.tensor(np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32))
        y = jn.tensor(np.arange(10) % 3)
        losses = [float(step(x, y).item()) for _ in range(3)]
        return losses, [p.numpy().copy() for p in net.parameters()], jn.random.uniform((2,)).numpy()

    a0, _ = _abstract_counts()
    la, pa, ra = run("")
    assert _abstract_counts()[0] == a0 + 1
    lc, pc, rc = run("concrete")
    assert _abstract_counts()[0] == a0 + 1
    np.testing.assert_allclose(la, lc, rtol=1e-5)           # the same dropout masks, one update per call
    for a, c in zip(pa, pc):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ra, rc)                   # the generator is where a concrete trace leaves it


def test_index_from_a_computed_value_traces_again_concretely(cpu_process):
    v = jn.Variable(jn.zeros(3))

    @jn.jit
    def f(x):
        v.assign(v + 1.0)
        return x[jn.argmax(x * 2.0, axis=0)]         # an index computed from a placeholder: shape unknown

    xn = np.random.default_rng(5).permutation(20).reshape(4, 5).astype(np.float64)     # > 16 elements
    x = jn.tensor(xn)
    a0, f0 = _abstract_counts()
    out = f(x).numpy()
    assert _abstract_counts() == (a0, f0 + 1)
    np.testing.assert_array_equal(out, xn[np.argmax(xn, axis=0)])
    np.testing.assert_array_equal(v.numpy(), 1.0)          # the abandoned trace's update was undone
    f(x)
    np.testing.assert_array_equal(v.numpy(), 2.0)


def test_grad_inside_jit_and_nested_structures():
    def loss(w, batch):
        x, y = batch["x"], batch["y"]
        return jn.mean((x @ w - y) ** 2)

    vg = jn.jit(jn.value_and_grad(loss))
    w = jn.random.normal((3, 1))
    batch = {"x": jn.random.normal((10, 3)), "y": jn.random.normal((10, 1))}
    v1, g1 = vg(w, batch)
    v2, g2 = vg(w, batch)
    ev, eg = jn.value_and_grad(loss)(w, batch)
    np.testing.assert_allclose(v2.numpy(), ev.numpy(), rtol=1e-6)
    np.testing.assert_allclose(g2.numpy(), eg.numpy(), rtol=1e-5)


def test_batchnorm_style_assign_inside_step():
    mov = jn.Variable(jn.zeros(4), trainable=False, name="moving_mean")

    @jn.jit
    def f(x):
        m = jn.mean(x, axis=0)
        mov.assign(mov * 0.9 + m * 0.1)
        return x - m

    x = jn.ones((8, 4))
    for _ in range(3):
        f(x)
    np.testing.assert_allclose(mov.numpy(), 1 - 0.9 ** 3, rtol=1e-6)


def test_data_dependent_control_flow_raises_naming_the_line():
    @jn.jit
    def f(x):
        if jn.sum(x) > 0:   # the line the error must name
            return x
        return -x

    with pytest.raises(jn.TracingError) as ei:
        f(jn.ones(3))
    msg = str(ei.value)
    assert "test_jit.py" in msg and "if jn.sum(x) > 0" in msg and "jn.where" in msg


def test_item_inside_jit_raises():
    @jn.jit
    def f(x):
        return x * float(jn.max(x).item())

    with pytest.raises(jn.TracingError, match="item"):
        f(jn.ones(3))


def test_explain_prints_graph_groups_sources_and_count():
    a, b, c = (jn.random.normal((4, 4)) for _ in range(3))
    text = jn.explain(lambda a, b, c: jn.relu(a * b + c), a, b, c, file=open(os.devnull, "w"))
    assert "== fusion groups (1) ==" in text
    assert "def kernel_serial" in text and "kernel count: 1" in text


def test_steady_state_plan_reuses_buffers():
    x = jn.random.normal((64, 64))

    def f(x):
        a = jn.exp(x) * 2.0
        b = jn.sum(a, axis=1, keepdims=True)
        c = jn.tanh(a / b)
        d = jn.sum(c, axis=0, keepdims=True)
        return jn.sum(jn.sigmoid(c - d))

    g, plan = jn.jit(f).lower(x)
    # four fused groups of 64x64 float32; buffer reuse needs fewer than four buffers
    assert len(plan.groups) >= 3
    assert plan.buffer_bytes < 4 * 64 * 64 * 4


# --------------------------------------------------------------------------------------------------------------
# the disk cache, across processes
# --------------------------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jitnet as jn
    @jn.jit
    def f(a, b, c):
        return jn.sum(jn.relu(a * b + c) * 3.0 - c)
    a = jn.tensor(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))
    out = [f(a, a, a).item() for _ in range(2)]
    print(json.dumps(dict(out=out, stats=jn.compile_stats())))
""")


def _child(env):
    r = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture()
def cache_env(tmp_path):
    env = dict(os.environ)
    env["JITNET_CACHE_DIR"] = str(tmp_path / "kernels")
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba")
    return env


def test_second_process_compiles_nothing(cache_env):
    first = _child(cache_env)
    second = _child(cache_env)
    assert first["stats"]["compiles"] > 0
    assert second["stats"]["compiles"] == 0, second["stats"]
    assert second["stats"]["cache_hits"] > 0
    assert first["out"] == second["out"]


def test_corrupt_cache_file_is_rebuilt(cache_env):
    first = _child(cache_env)
    d = cache_env["JITNET_CACHE_DIR"]
    files = [f for f in os.listdir(d) if f.startswith("jitnet_k_") and f.endswith(".py")]
    assert files
    for f in files:
        with open(os.path.join(d, f), "w") as fh:
            fh.write("this is not python (")
    again = _child(cache_env)
    assert again["out"] == first["out"]
    assert again["stats"]["modules_rebuilt"] >= 1


def test_two_processes_fill_the_cache_at_once(cache_env):
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD], env=cache_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1])["out"])
    assert outs[0] == outs[1]
