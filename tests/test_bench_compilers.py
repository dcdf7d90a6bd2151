"""bench/compilers.py: the driver runs each library in its own worker process and checks their losses agree."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "compilers.py")

sys.path.insert(0, os.path.join(ROOT, "bench"))
import compilers as C  # noqa: E402


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax[cpu] (the bench extra)")
def test_quick_mlp_jitnet_and_jax_agree(tmp_path):
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--case", "mlp", "--libs", "jitnet", "jax",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "check values AGREE" in r.stdout
    d = json.loads(out.read_text())
    assert d["config"]["threads"] == 2 and d["config"]["libs"] == ["jitnet", "jax"]
    assert d["check_problems"] == []
    rec = d["cases"]["mlp"]
    assert rec["rounds"] == 1 and rec["check_problems"] == []
    runs = {x["lib"]: x for x in rec["runs"]}
    assert set(runs) == {"jitnet", "jax"}
    assert runs["jitnet"]["pid"] != runs["jax"]["pid"] != os.getpid()     # each library in its own process
    for x in runs.values():
        assert x["steps"] >= 3 and 0 < x["min_ms"] <= x["median_ms"]
    workers = {x["lib"]: x for x in rec["workers"]}
    assert workers["jax"]["pid"] == runs["jax"]["pid"]
    for x in workers.values():
        assert len(x["check"]) == C.CHECK_STEPS and x["setup_s"] > 0
    lj, lx = workers["jitnet"]["check"], workers["jax"]["check"]
    assert lj == pytest.approx(lx, rel=1e-3)
    assert lj[-1] < lj[0]                                                  # the steps train: the loss falls
    rows = {row["lib"]: row for row in rec["rows"]}
    assert rows["jitnet"]["x_jitnet"] == 1.0
    assert rows["jax"]["x_jitnet"] == pytest.approx(rows["jax"]["median_ms"] / rows["jitnet"]["median_ms"])
    assert rows["jax"]["worst_ms"] >= rows["jax"]["median_ms"]


def test_disagreeing_checks_are_reported():
    good = [{"check": [2.0, 1.5, 1.2]}]
    assert C.check_agreement("mlp", {"jitnet": good, "jax": [{"check": [2.0, 1.5, 1.2000001]}]}) == []
    problems = C.check_agreement("mlp", {"jitnet": good, "jax": [{"check": [2.0, 1.5, 1.3]}]})
    assert len(problems) == 1 and "jax round 1" in problems[0]
    assert C.check_agreement("mlp", {"jitnet": good, "torch": [{"check": [2.0, float("nan"), 1.2]}]})
    assert C.check_agreement("mlp", {"jitnet": good, "torch": [{"check": [2.0, 1.5]}]})


def test_ratio_rows_use_jitnet_as_reference():
    per = {"jitnet": [{"median_ms": 2.0}, {"median_ms": 4.0}], "jax": [{"median_ms": 3.0}, {"median_ms": 5.0}]}
    rows = {r["lib"]: r for r in C._ratio_rows("mlp", ["jitnet", "jax"], per)}
    assert rows["jax"]["r1_ms"] == 3.0 and rows["jax"]["worst_ms"] == 5.0
    assert rows["jax"]["x_jitnet"] == pytest.approx(4.0 / 3.0)
    assert rows["jax"]["x_jitnet_worst_round"] == pytest.approx(1.25)


def test_rounds_alternate_the_order():
    libs = ["jitnet", "jax", "torch"]
    firsts = {C._order(libs, r)[0] for r in range(3)}
    assert firsts == set(libs)
    assert sorted(C._order(libs, 1)) == sorted(libs)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        C.main(["--case", "mlp", "--rounds", "0"])
    with pytest.raises(SystemExit):
        C.main(["--case", "nosuch"])
    with pytest.raises(SystemExit):
        C.main(["--case", "mlp", "--libs", "jax"])
