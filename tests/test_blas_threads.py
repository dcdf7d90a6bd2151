"""Compiled steps choose the BLAS thread setting their own timing favours (jitnet.runtime.StepTimer): all
threads on an idle machine, one thread on the calling thread while other work makes OpenBLAS's pool wait."""
import time

import numpy as np
import pytest

import jitnet as jn
from jitnet import runtime
from jitnet.compiler import stats as jit_stats


class FakeBlas:
    """Stands in for openblas_set_num_threads_local: records the calling thread's setting."""

    def __init__(self):
        self.local = 0
        self.calls = []

    def __call__(self, n):
        prev, self.local = self.local, n
        self.calls.append(n)
        return prev


@pytest.fixture
def fake_blas(monkeypatch):
    fb = FakeBlas()
    monkeypatch.setattr(runtime, "_set_local_blas_threads", fb)
    return fb


def _step(fb, cost):
    """A step taking cost[single] seconds; it checks that the setting is 1 or 'unset' (0) while it runs."""
    def fn():
        assert fb.local in (0, 1)
        time.sleep(cost[fb.local == 1])
        return fb.local
    return fn


def test_one_thread_is_chosen_when_it_is_faster_and_the_setting_is_undone_after_each_step(fake_blas):
    t = runtime.StepTimer()
    fn = _step(fake_blas, {False: 0.004, True: 0.0005})        # all threads slow: a busy machine
    for _ in range(t.START + 2 * t.PROBE + 2):
        t.run(fn)
    assert t.single and fake_blas.local == 0                   # chosen, and restored between steps
    assert t.run(fn) == 1                                       # the step itself ran with one thread
    assert fake_blas.calls[-2:] == [1, 0]


def test_all_threads_are_kept_when_they_are_faster(fake_blas):
    t = runtime.StepTimer()
    fn = _step(fake_blas, {False: 0.0005, True: 0.002})
    for _ in range(t.START + 2 * t.PROBE + 2):
        assert t.run(fn) in (0, 1)
    assert not t.single
    n = len(fake_blas.calls)
    t.run(fn)
    assert len(fake_blas.calls) == n                            # steady state: no call into BLAS settings


def test_a_step_that_becomes_slow_compares_again(fake_blas):
    t = runtime.StepTimer()
    cost = {False: 0.0005, True: 0.002}
    fn = _step(fake_blas, cost)
    for _ in range(t.START + 2 * t.PROBE + 2):
        t.run(fn)
    assert not t.single
    cost[False] = 0.006                                         # another process starts: all threads slow down
    for _ in range(3 + 2 * t.PROBE):
        t.run(fn)
    assert t.single


def test_without_openblas_local_threads_the_step_just_runs(monkeypatch):
    monkeypatch.setattr(runtime, "_set_local_blas_threads", None)
    t = runtime.StepTimer()
    assert [t.run(lambda: 7) for _ in range(6)] == [7] * 6 and not t.single and t.calls == 0


def test_a_jitted_step_runs_through_its_timer_and_matches_eager():
    w = jn.Parameter(np.ones((3, 2), np.float32))

    @jn.jit
    def f(x):
        return (x @ w).sum()

    x = jn.tensor(np.arange(6.0, dtype=np.float32).reshape(2, 3))
    n = runtime.StepTimer.START + 2 * runtime.StepTimer.PROBE + 2
    abstract = jit_stats()["abstract_traces"]
    vals = [f(x).item() for _ in range(n)]
    assert vals == [30.0] * n
    # a concrete first trace computes its result eagerly; after an abstract one, the plan runs that call too
    planned = n if jit_stats()["abstract_traces"] > abstract else n - 1
    comp = list(f._cache.values())[0]
    assert isinstance(comp.timer, runtime.StepTimer)
    if runtime.blas_thread_stats()["available"]:
        assert comp.timer.calls == planned and comp.timer.best[0] is not None and comp.timer.best[1] is not None
