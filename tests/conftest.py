"""The device the op suite runs on, and an opt-in record of the primitives each test runs on each device.

``device`` is "cpu" here; tests/cuda/conftest.py overrides it with "cuda", and tests/cuda/test_ops_cuda.py collects
the op suite's tests (tests/test_ops.py, tests/test_ops_nn.py) so that the same test functions run on the GPU.

``JITNET_PRIM_COVERAGE=<path>`` writes, at the end of the run, one JSON line per test: its node id and the
primitives it applied on each device (eagerly or while a ``jit`` traced them), to ``<path>`` (``<path>.<worker>``
under pytest-xdist).
"""
import json
import os

import pytest


@pytest.fixture(scope="session")
def device():
    """The device the op suite's tests create their tensors on."""
    return "cpu"


_COVERAGE_PATH = os.environ.get("JITNET_PRIM_COVERAGE")
_SEEN = {}                  # node id -> {device: set of primitive names}
_CURRENT = [None]


def _install_recorder():
    import jitnet.autodiff.core as core
    import jitnet.lowp as lowp
    import numpy as np

    chained = [core._LOWP]

    def record(prim, inputs, params):
        if _CURRENT[0] is not None:
            if inputs:
                dev = "cpu" if all(isinstance(t._data, (np.ndarray, tuple)) for t in inputs) else "cuda"
            else:
                dev = str(params.get("device") or "cpu").split(":")[0]
            _SEEN.setdefault(_CURRENT[0], {}).setdefault(dev, set()).add(prim.name)
        return prim if chained[0] is None else chained[0](prim, inputs, params)

    def enable():                     # lowp installs its rule behind the recorder
        chained[0] = lowp.rule

    core._LOWP = record
    lowp.enable = enable


def pytest_configure(config):
    if _COVERAGE_PATH:
        _install_recorder()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    _CURRENT[0] = item.nodeid
    try:
        return (yield)
    finally:
        _CURRENT[0] = None


def pytest_sessionfinish(session):
    if not _COVERAGE_PATH or not _SEEN:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    path = f"{_COVERAGE_PATH}.{worker}" if worker else _COVERAGE_PATH
    with open(path, "w") as f:
        for nodeid, devs in sorted(_SEEN.items()):
            f.write(json.dumps({"test": nodeid, "prims": {d: sorted(p) for d, p in devs.items()}}) + "\n")
