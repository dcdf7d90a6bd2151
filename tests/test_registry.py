"""The registry: every row has a CUDA implementation or says why not; rows hold their parts; the CUDA backend
is loaded only when a GPU is used."""
import os
import subprocess
import sys

import pytest

import jitnet
import jitnet.models.dnc  # noqa: F401  (rows registered by the models)
import jitnet.models.policy_gradient  # noqa: F401
import jitnet.models.rl  # noqa: F401
import jitnet.models.seq2seq  # noqa: F401
import jitnet.models.skipgram  # noqa: F401
from jitnet.autodiff.core import REGISTRY
from jitnet.lazy import LazyModule
from jitnet.optim import updates as U


def test_every_row_has_a_cuda_implementation_or_says_why_not():
    missing, stale = [], []
    for name, prim in sorted(REGISTRY.items()):
        has = callable(prim.impl.get("cuda")) or (prim.kind == "elementwise" and prim.template is not None)
        reason = prim.extra.get("no_cuda")
        if not has and not (isinstance(reason, str) and reason.strip()):
            missing.append(name)
        if has and reason:
            stale.append(name)
    assert not missing, f"rows with no CUDA implementation and no no_cuda reason: {missing}"
    assert not stale, f"rows with a CUDA implementation that still say why they have none: {stale}"
    assert len(REGISTRY) > 100


def test_rows_hold_their_cuda_implementations_beside_the_cpu_ones():
    # no table of CUDA implementations by name: each row's own module defines both
    for name, prim in REGISTRY.items():
        f = prim.impl.get("cuda")
        if f is not None and prim.kind != "elementwise" and not name.startswith("mpi_"):
            assert f.__module__ == prim.impl["cpu"].__module__, (name, f.__module__)
    src = open(os.path.join(os.path.dirname(jitnet.__file__), "backend_cuda.py")).read()
    assert "_IMPLS" not in src


def test_an_update_row_holds_its_cpu_and_cuda_implementations_and_native_emitter():
    for prim in U.UPDATES.values():
        assert prim.impl["cpu"].__module__ == "jitnet.optim.updates"
        assert prim.impl["cuda"].__module__ == "jitnet.optim.updates", prim.name
    for name in ("sgd_update", "sgd_momentum_update", "adagrad_update", "rmsprop_update", "adam_update",
                 "adamw_update"):
        assert callable(U.UPDATES[name].extra["native"]), name


def test_importing_jitnet_loads_no_cuda_backend():
    code = ("import sys, jitnet, jitnet.models.seq2seq, jitnet.optim.updates\n"
            "x = jitnet.ones(3); (x * 2).numpy(); vars(jitnet.optim.updates)\n"
            "bad = [m for m in ('numba.cuda', 'jitnet.backend_cuda', 'jitnet.kernels_gpu') if m in sys.modules]\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_lazy_module_imports_on_first_attribute_only():
    m = LazyModule("json.tool")
    sys.modules.pop("json.tool", None)
    with pytest.raises(TypeError):
        vars(m)                                 # probing (vars, copy, inspect) never imports
    assert not hasattr(m, "__wrapped__")
    assert "json.tool" not in sys.modules
    assert callable(m.main)                     # the first real attribute imports it
    assert "json.tool" in sys.modules
    with pytest.raises(AttributeError):
        m.no_such_name


def test_rows_specializations_and_native_emitters_are_used_by_compiled_plans(monkeypatch):
    # matmul, softmax and the reductions carry extra["specialize"] and extra["native"] on their rows
    from jitnet import ops
    for row in (ops.MATMUL, ops.SOFTMAX, ops.LOG_SOFTMAX, ops.REDUCE):
        assert callable(row.extra["specialize"]) and callable(row.extra["native"]), row.name
    import numpy as np
    x = jitnet.tensor(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32))
    w = jitnet.tensor(np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32))

    def f(x, w):
        return jitnet.sum(jitnet.softmax(x @ w, axis=-1), axis=1)
    monkeypatch.setenv("JITNET_NATIVE", "0")
    jf = jitnet.jit(f)
    np.testing.assert_allclose(jf(x, w).numpy(), f(x, w).numpy(), rtol=1e-6)
    _, plan = jf.lower(x, w)
    specialized = {name.split("*")[0] for name in plan.step_names if "*" in name}
    assert {"matmul", "softmax", "reduce"} <= specialized, plan.step_names
