"""The command line (warmup, info, stubs), the warm-up registry and denormal flushing."""
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from numba import njit, prange

import jitnet
from jitnet import runtime, warmup
from jitnet.__main__ import main

X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _cli(args, tmp_path, **env):
    """Run ``python -m jitnet ARGS`` with fresh kernel and Numba caches under tmp_path; return the process."""
    e = dict(os.environ)
    e["JITNET_CACHE_DIR"] = str(tmp_path / "kernels")
    e["NUMBA_CACHE_DIR"] = str(tmp_path / "numba")
    e.update(env)
    return subprocess.run([sys.executable, "-m", "jitnet", *args], capture_output=True, text=True, env=e,
                          timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Kernel and Numba cache directories shared by this module's CLI runs (the first run fills them)."""
    return tmp_path_factory.mktemp("cli-caches")


def test_warmup_quick_compiles_then_loads_from_cache(tmp_path):
    first = _cli(["warmup", "--quick", "--json", "--no-progress"], tmp_path)
    assert first.returncode == 0, first.stderr
    r1 = json.loads(first.stdout)
    assert r1["compiled"] > 0 and r1["errors"] == []
    assert r1["cache_dir"] == str(tmp_path / "kernels")
    assert any(n.endswith(".py") for n in os.listdir(tmp_path / "kernels"))

    second = _cli(["warmup", "--quick", "--json", "--no-progress"], tmp_path)
    assert second.returncode == 0, second.stderr
    r2 = json.loads(second.stdout)
    assert r2["compiled"] == 0
    assert r2["cached"] >= r1["compiled"] - 1 > 0     # everything compiled the first time now comes from disk


def test_warmup_text_report(caches):
    p = _cli(["warmup", "--quick", "--no-progress"], caches)
    assert p.returncode == 0, p.stderr
    assert "kernels compiled" in p.stdout and "loaded from cache" in p.stdout
    assert str(caches / "kernels") in p.stdout


def test_register_warmup_runs_registered_functions_with_quick():
    calls = []

    def plain():
        calls.append("plain")

    @warmup.register_warmup(name="test layer")
    def layer(quick=False):
        calls.append(("layer", quick))

    warmup.register_warmup(plain)
    warmup.register_warmup(plain)           # registering twice keeps one entry
    try:
        names = [n for n, _ in warmup.cases(quick=True)]
        assert "test layer" in names and names.count(next(n for n, f in warmup.registered() if f is plain)) == 1
        steps = [(n, f) for n, f in warmup.cases(quick=True) if n == "test layer" or "plain" in n]
        res = warmup.run(quick=True, progress=False, steps=steps)
        assert res["steps"] == 2 and res["errors"] == []
        assert calls == [("layer", True), "plain"]
    finally:
        warmup._REGISTRY[:] = [(n, f) for n, f in warmup._REGISTRY if f not in (plain, layer)]


def test_warmup_reports_op_errors_and_keeps_going():
    def broken():
        raise ValueError("boom")

    ran = []
    res = warmup.run(progress=False, steps=[("broken", broken), ("fine", lambda: ran.append(1))])
    assert res["errors"] == [("broken", "ValueError: boom")] and ran == [1]


def test_info_prints_cache_dir_and_runtime(caches):
    p = _cli(["info"], caches)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert str(caches / "kernels") in out
    for key in ("numba", "numpy", "llvmlite", "python", "threading layer", "threads", "denormals flushed",
                "malloc tuned", "kernel cache size", "cuda available"):
        assert key in out, key
    if X86_64:       # opt-in: importing jitnet leaves the floating-point environment alone
        assert "denormals flushed  no" in out


@pytest.mark.parametrize("cmd", ["bench"])
def test_stub_commands_exit_2(cmd, capsys):
    assert main([cmd]) == 2
    assert "not yet available" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Denormal flushing
# ---------------------------------------------------------------------------------------------------------------

@njit
def _mul(a, b):
    return a * b


@njit(parallel=True)
def _pmul(x, b, out):
    for i in prange(x.shape[0]):
        out[i] = x[i] * b


def _bits(x):
    return np.asarray(x, np.float32).view(np.int32)     # compare bits: printing a subnormal under DAZ reads 0


@pytest.mark.skipif(not X86_64, reason="FTZ/DAZ are x86-64 MXCSR bits")
def test_flush_denormals_main_thread_and_workers():
    was = jitnet.denormals_flushed()
    tiny = np.array([0x000AE398], np.int32).view(np.float32)[0]     # about 1e-39, built from its bits
    x = np.full(4096, tiny, np.float32)
    out = np.empty_like(x)
    try:
        assert jitnet.flush_denormals(True) is True
        assert jitnet.denormals_flushed()
        assert _bits(_mul(tiny, np.float32(1.0))) == 0
        _pmul(x, np.float32(1.0), out)
        assert (_bits(out) == 0).all()
        st = runtime.denormal_state()
        assert st["supported"] and st["main"] and st["workers"] and st["threads"] >= 1

        assert jitnet.flush_denormals(False) is True
        assert not jitnet.denormals_flushed()
        assert _bits(_mul(tiny, np.float32(1.0))) == _bits(tiny)
        _pmul(x, np.float32(1.0), out)
        assert (_bits(out) == _bits(tiny)).all()
        assert not runtime.denormal_state()["workers"]
    finally:
        jitnet.flush_denormals(was)


@pytest.mark.skipif(not X86_64, reason="FTZ/DAZ are x86-64 MXCSR bits")
def test_flush_denormals_on_import_follows_env():
    code = "import jitnet; print(jitnet.denormals_flushed())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JITNET_FLUSH_DENORMALS": "1"})
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JITNET_FLUSH_DENORMALS": "0"})
    assert on.stdout.strip() == "True", on.stderr
    assert off.stdout.strip() == "False", off.stderr


def test_flush_denormals_is_a_no_op_off_x86(monkeypatch):
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(runtime, "_mxcsr_state", {})
    assert runtime.flush_denormals(True) is False
    assert runtime.denormals_flushed() is False
    assert runtime.denormal_state()["supported"] is False


# ---------------------------------------------------------------------------------------------------------------
# malloc tuning
# ---------------------------------------------------------------------------------------------------------------

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize("setting,expect", [("1", GLIBC), ("0", False)])
def test_malloc_tuning_follows_the_environment(setting, expect):
    env = dict(os.environ, JITNET_MALLOC_TUNING=setting)
    p = subprocess.run([sys.executable, "-c", "import jitnet.runtime as r, jitnet; print(r.malloc_tuned)"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(expect)


# ---------------------------------------------------------------------------------------------------------------
# A CLI that talks to people: one-line user errors, the compile notice, non-finite losses
# ---------------------------------------------------------------------------------------------------------------

from jitnet.models import _train as TR          # noqa: E402


def _err_lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_bad_data_dir_is_one_line_and_exit_2(tmp_path):
    missing = str(tmp_path / "no-such-dir")
    p = _cli(["train", "mlp", "--data-dir", missing, "--logdir", str(tmp_path / "run")], tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert missing in lines[0] and lines[0].startswith("jitnet train: error:")


def test_traceback_flag_and_jitnet_debug_show_the_traceback(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nothing-here")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv("JITNET_DEBUG", raising=False)
    assert main(["train", "mlp", "--data-dir", str(empty), "--dataset", "mnist"]) == 2   # holds no MNIST files
    err = _err_lines(capsys)
    assert len(err) == 1 and str(empty) in err[0] and "To get the data" in err[0]
    assert main(["train", "mlp", "--data-dir", missing, "--traceback"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].endswith(
        f"--data-dir {missing}: no such file or directory")
    monkeypatch.setenv("JITNET_DEBUG", "1")
    assert main(["train", "mlp", "--data-dir", missing]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


@pytest.mark.parametrize("argv,expect", [
    (["train", "mlp", "--data", "x"], "ambiguous option: --data could match --dataset, --data-dir"),
    (["train", "mlp", "--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["warmup", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "seq2seq-reverse", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, expect, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and expect in err[0] and "--help" in err[0], err


def test_missing_optional_packages_are_one_line_with_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)           # as if Gymnasium were not installed
    assert main(["train", "pg-cartpole", "--env", "CartPole-v1", "--episodes", "1",
                 "--logdir", str(tmp_path)]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "Gymnasium" in err[0] and "pip install 'jitnet[rl]'" in err[0]
    from jitnet.__main__ import user_error
    msg, code = user_error(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert code == 2 and "pip install 'jitnet[bench]'" in msg
    assert user_error(ModuleNotFoundError("No module named 'jitnet.foo'", name="jitnet.foo")) is None   # a bug
    assert user_error(RuntimeError("a bug")) is None


def test_readme_flags_match_the_cli():
    import re
    import shlex
    from jitnet.__main__ import build_parser
    from jitnet.models import vision_cli as VC
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")) as f:
        readme = f.read()
    known = set(VC.TRAINERS["mlp"].parser()._option_string_actions) | set(build_parser()._option_string_actions)
    for act in build_parser()._subparsers._group_actions[0].choices.values():
        known |= set(act._option_string_actions)
    prose = set(re.findall(r"`(--[a-z][a-z-]*)", readme))
    assert prose and prose <= known, sorted(prose - known)
    for line in readme.splitlines():                  # every documented classifier command line parses
        m = re.search(r"python -m jitnet train (\w+)( [^#`]*)?", line)
        if m and m.group(1) in VC.TRAINERS and hasattr(VC.TRAINERS[m.group(1)], "parser"):
            VC.TRAINERS[m.group(1)].parser().parse_args(shlex.split(m.group(2) or ""))


def test_compile_notice_is_shown_while_compiling_and_only_then(monkeypatch):
    from jitnet import kernelgen
    monkeypatch.setattr(TR, "_NOTICE_SHOWN", [False])
    said = []
    with TR.compile_notice(said.append, after=0.0) as n:
        pass                                              # nothing compiled: nothing said
    assert said == [] and not n.shown

    @njit
    def fresh(a):
        return a + 1

    with TR.compile_notice(said.append, after=0.0) as n:
        fresh(1)
    assert n.shown and said[0] == f"compiling kernels (once; cached in {kernelgen.cache_dir()}) ..."
    assert said[1].startswith("kernels ready after ")

    @njit
    def fresh2(a):
        return a + 2

    with TR.compile_notice(said.append, after=0.0):       # once per process
        fresh2(1)
    assert len(said) == 2


def test_progress_eta_leaves_out_the_compiling_steps():
    pytest.importorskip("tqdm")
    import time
    bar = TR.Progress(6, "test", enabled=True)
    time.sleep(0.6)                                       # the first step traces and compiles
    bar.update(1.0)
    bar.update(1.0)
    assert bar.bar is None                                # no bar (and no ETA) while steps still compile
    bar.update(1.0)
    time.sleep(0.6)                                       # the fourth compiles the native driver
    bar.update(1.0)
    bar.update(1.0)
    d = bar.bar.format_dict
    bar.close()
    assert d["n"] == 5 and d["elapsed"] < 0.5, d          # the bar's clock starts after the fourth step


_COMMON = ["--limit", "200", "--test-limit", "100", "--batch-size", "50", "--seed", "3", "--no-progress"]


@pytest.mark.slow              # trains the MLP through the CLI twice (~20 s cold)
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    from jitnet.models import vision_cli as VC
    logdir = str(tmp_path / "run")
    assert VC.TRAINERS["mlp"](_COMMON + ["--epochs", "1", "--logdir", logdir]) == 0
    good = jn_latest(logdir)
    assert good.endswith("ckpt-4.safetensors")
    capsys.readouterr()
    rc = main(["train", "mlp", *_COMMON, "--epochs", "3", "--lr", "1e12", "--resume", "--logdir", logdir])
    assert rc == 1
    err = _err_lines(capsys)
    assert len(err) == 1 and "training diverged: the loss is nan at epoch 2, batch" in err[0], err
    assert f"the last good checkpoint is {good}" in err[0]
    ckdir = os.path.join(logdir, "checkpoints")
    assert sorted(f for f in os.listdir(ckdir) if f.endswith(".safetensors")) == ["ckpt-4.safetensors"]
    assert jn_latest(logdir) == good
    assert all(np.isfinite(v).all() for v in jitnet.io.load(good).values() if v.dtype.kind == "f")


def jn_latest(logdir):
    return jitnet.io.latest_checkpoint(os.path.join(logdir, "checkpoints"))


@pytest.mark.slow              # trains the MLP through the CLI (~20 s cold)
def test_skip_nonfinite_undoes_the_bad_steps(tmp_path, capsys):
    from jitnet.models import vision as V
    from jitnet.models import vision_cli as VC
    rng = np.random.default_rng(0)
    x = rng.random((200, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 200)
    x[17, 0, 3, 3] = np.nan                       # one poisoned example: one bad batch per epoch
    data = (x, y, x[:100].copy(), y[:100])
    data[2][17] = 0.5
    stop = VC.TRAINERS["mlp"].parser().parse_args(_COMMON + ["--epochs", "2"])
    with pytest.raises(TR.NonFiniteError, match=r"the loss is nan at epoch 1, batch \d \(step \d\); no checkpoint"):
        TR.fit(V.MLP(lr=1e-3), stop, data, str(tmp_path / "stop"), "mlp")
    assert jn_latest(str(tmp_path / "stop")) is None

    args = VC.TRAINERS["mlp"].parser().parse_args(_COMMON + ["--epochs", "2", "--skip-nonfinite", "2"])
    m = TR.fit(V.MLP(lr=1e-3), args, data, str(tmp_path / "skip"), "mlp")
    assert m["skipped_steps"] == 2 and m["step"] == 6 and np.isfinite(m["test_loss"])
    assert "mlp: skipped 2 steps with a non-finite loss or state" in capsys.readouterr().err
    ck = jitnet.io.load(jn_latest(str(tmp_path / "skip")))
    assert int(ck["optimizer/global_step"]) == 6
    assert all(np.isfinite(v).all() for v in ck.values() if v.dtype.kind == "f")


class _Model:
    """A model for the training loop's tests (no compiles): step k returns ``losses[k]`` (1.0 past the end) and
    records the first weight it saw; ``net`` and ``opt`` are what its checkpoints hold."""

    def __init__(self, losses=(), seed=0):
        import jitnet.nn as nn
        jitnet.random.seed(seed)
        self.net = nn.Linear(2, 2)
        self.opt = jitnet.optim.SGD(self.net.parameters(), lr=0.1)
        self.losses, self.seen = list(losses), []

    def train_step(self, *batch):
        self.seen.append(float(self.net.W.numpy()[0, 0]))
        return jitnet.tensor(np.float32(self.losses.pop(0) if self.losses else 1.0))

    def batches(self, loader):
        return iter(loader)

    def evaluate(self, *data):
        return {}


class _Agent:
    """An RL agent for the loop's tests: always moves right; each episode's update returns the next of ``losses``."""

    def __init__(self, losses=(), w=1.0):
        self.w, self.losses = np.full(3, w, np.float32), list(losses)

    def act(self, obs):
        return 1

    def observe(self, obs, action, reward, next_obs, terminated, truncated):
        if terminated or truncated:
            return self.losses.pop(0) if self.losses else 1.0
        return None

    def state_dict(self):
        return {"net": {"w": self.w}}

    def load_state_dict(self, flat):
        self.w = np.array(flat["net/w"])


def _vision(tmp_path, losses):
    from jitnet.models import vision_cli as VC
    args = VC.TRAINERS["mlp"].parser().parse_args(["--batch-size", "2", "--epochs", "1", "--no-progress"])
    x, y = np.zeros((8, 1, 2, 2), np.float32), np.zeros(8, np.int64)
    return lambda: TR.fit(_Model(losses), args, (x, y, x, y), str(tmp_path), "mlp")


def _seq2seq(tmp_path, losses):
    from jitnet.data import seq_tasks as T
    from jitnet.models import _seq2seq_cli as seq2seq

    class Trainer(_Model):
        def train_step(self, batch):
            return super().train_step(), jitnet.tensor(np.float32(0))

    args = seq2seq.reverse_parser().parse_args(["--batch-size", "8", "--no-progress", "--logdir", str(tmp_path)])
    return lambda: seq2seq.fit(Trainer(losses), T.reverse_task(40, 8, seed=0), args, "seq2seq-reverse")


def _dnc(tmp_path, losses):
    from jitnet.models import dnc_cli as dnc
    args = dnc.copy_parser().parse_args(["--steps", "4", "--eval-every", "2", "--no-progress"])
    return lambda: dnc._fit_steps(_Model(losses), args, "dnc-copy", str(tmp_path), lambda: (), dict)


def _rl(tmp_path, losses):
    from jitnet.models import rl
    return lambda: rl.train_agent(_Agent(losses), rl.make_env("corridor"), 4, logdir=str(tmp_path),
                                  desc="pg-cartpole")


def _skipgram(tmp_path, losses, monkeypatch):
    from jitnet.models import skipgram_cli as CLI

    class Model(CLI.SkipGramModel):
        def train_step(self, centers, labels, rng=None):
            return jitnet.tensor(np.float32(losses.pop(0) if losses else 1.0))

    monkeypatch.setattr(CLI, "SkipGramModel", Model)
    return lambda: CLI.train_skipgram(["--smoke", "--model", "--no-progress", "--logdir", str(tmp_path)])


#: each family's training run on the shared loop, and how its messages place step 2
FAMILIES = {"vision": (_vision, "mlp", r"epoch 1, batch 2 \(step 2\)"),
            "seq2seq": (_seq2seq, "seq2seq-reverse", r"epoch 1, batch 2 \(step 2\)"),
            "dnc": (_dnc, "dnc-copy", "step 2"), "rl": (_rl, "pg-cartpole", "episode 2"),
            "skipgram": (_skipgram, "skipgram", "step 2")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_nonfinite_loss_stops_every_family_the_same_way(family, tmp_path, monkeypatch, capsys):
    make, name, where = FAMILIES[family]
    loops, run_loop = [], TR.Loop.run

    def spy(loop, *a, **k):
        loops.append(loop.name)
        return run_loop(loop, *a, **k)
    monkeypatch.setattr(TR.Loop, "run", spy)
    extra = (monkeypatch,) if family == "skipgram" else ()
    run = make(tmp_path, [0.5, float("nan")], *extra)          # the second step's loss is NaN
    with pytest.raises(TR.NonFiniteError, match=rf"^{name}: training diverged: the loss is nan at {where}[;.]"):
        run()
    assert loops == [name]                                      # the family's steps ran in the shared loop
    assert not list(tmp_path.glob("checkpoints/*.safetensors"))     # nothing saved after the bad step
    assert "Traceback" not in capsys.readouterr().err


def test_the_loop_resumes_the_step_count_of_two_families(tmp_path, capsys):
    from jitnet.models import dnc_cli as dnc
    from jitnet.models import rl
    logdir = str(tmp_path / "dnc")
    first = _Model(seed=0)
    args = dnc.copy_parser().parse_args(["--steps", "2", "--eval-every", "2", "--no-progress"])
    assert dnc._fit_steps(first, args, "dnc-copy", logdir, lambda: (), dict)["step"] == 2
    saved = float(first.net.W.numpy()[0, 0])
    again = _Model(seed=1)
    assert float(again.net.W.numpy()[0, 0]) != saved
    args = dnc.copy_parser().parse_args(["--steps", "4", "--eval-every", "2", "--no-progress", "--resume"])
    assert dnc._fit_steps(again, args, "dnc-copy", logdir, lambda: (), dict)["step"] == 4
    assert again.seen == [saved, saved]                         # restored before its first step; 2 more steps
    assert [r.split(",")[0] for r in open(os.path.join(logdir, "metrics.csv")).read().split()[1:]] == ["2", "4"]
    assert f"dnc-copy: resumed from {os.path.join(logdir, 'checkpoints', 'ckpt-2.safetensors')} (step 2)" \
        in capsys.readouterr().out

    logdir = str(tmp_path / "rl")
    env = rl.make_env("corridor")
    rl.train_agent(_Agent(w=2.0), env, 2, logdir=logdir, checkpoint_every=1, desc="pg")
    agent = _Agent(w=5.0)
    res = rl.train_agent(agent, env, 2, logdir=logdir, checkpoint_every=1, desc="pg", resume=True)
    assert agent.w.tolist() == [2.0] * 3 and len(res["returns"]) == 2
    assert jn_latest(logdir).endswith("ckpt-4.safetensors")        # episodes 3 and 4, not 1 and 2 again
    assert [r.split(",")[0] for r in open(os.path.join(logdir, "returns.csv")).read().split()[1:]] == \
        ["0", "1", "2", "3"]
    assert "pg: resumed from" in capsys.readouterr().out


def test_rl_never_saves_a_nonfinite_agent(tmp_path):
    from jitnet.models import rl

    class Agent:
        w = np.ones(3, np.float32)

        def act(self, obs):
            return 0

        def observe(self, *a):
            self.w[:] = np.nan                    # diverges during the first episode

        def state_dict(self):
            return {"net": {"w": self.w}}

    with pytest.raises(TR.NonFiniteError, match="state are not finite after episode 1; no checkpoint"):
        rl.train_agent(Agent(), rl.make_env("corridor"), 3, logdir=str(tmp_path), checkpoint_every=1, desc="pg")
    assert not [f for f in os.listdir(tmp_path / "checkpoints") if f.endswith(".safetensors")]


#: what each command prints after its --smoke run: the steps or episodes that --smoke asks for
SMOKE_SAYS = {
    "logreg": "epoch 1/1: step 2,", "mlp": "epoch 1/1: step 2,", "cnn_mnist": "epoch 1/1: step 2,",
    "cnn_cifar": "epoch 1/1: step 2,", "autoencoder": "epoch 1/1: step 2,",       # one epoch of two batches
    "pg-cartpole": "2 episodes", "dqn-cartpole": "2 episodes",
    "seq2seq-dates": "seq2seq-dates epoch 1: step 2,", "seq2seq-reverse": "seq2seq-reverse epoch 1: step 2,",
    "dnc-copy": "dnc-copy step 2/2:", "dnc-babi": "dnc-babi step 2/2:",
    "skipgram": "128 words",
}


def test_every_command_has_a_smoke_check():
    from jitnet.models import trainers
    assert sorted(SMOKE_SAYS) == sorted(trainers())


@pytest.mark.parametrize("model", sorted(SMOKE_SAYS))
def test_smoke_trains_a_few_steps_on_cpu(model, tmp_path, capsys):
    assert main(["train", model, "--smoke", "--no-progress", "--logdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert SMOKE_SAYS[model] in out
    if model == "skipgram":
        assert (tmp_path / "vectors.txt").exists()
    else:
        assert os.listdir(tmp_path / "checkpoints")


def test_device_that_is_not_there_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "mlp", "--device", "tpu", "--smoke", "--logdir", str(tmp_path)]) == 2
    assert "--device tpu" in capsys.readouterr().err


def test_smoke_keeps_the_options_the_command_line_gave():
    from jitnet.models._train import ArgumentParser, add_device_args, apply_smoke
    p = add_device_args(ArgumentParser(prog="t"))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--limit", type=int, default=None)
    a = apply_smoke(p.parse_args(["--smoke", "--epochs=3"]), epochs=1, limit=8)
    assert (a.epochs, a.limit) == (3, 8)
    a = apply_smoke(p.parse_args(["--smoke", "--limit", "2"]), epochs=1, limit=8)
    assert (a.epochs, a.limit) == (1, 2)
    a = apply_smoke(p.parse_args(["--epochs", "2"]), epochs=1, limit=8)
    assert (a.epochs, a.limit) == (2, None)


def test_progress_says_when_the_first_step_ran_during_a_cold_compile(capsys):
    from types import SimpleNamespace
    from jitnet.models._train import Progress
    for compiling in (True, False):
        p = Progress(total=6, desc="mlp epoch 1/1", enabled=False)
        p._notice.__exit__(None, None, None)
        p._notice = SimpleNamespace(shown=compiling, __exit__=lambda *a: False)
        p.update(loss=2.5)
        p.update(loss=2.4)
        p.close()
        err = capsys.readouterr().err
        assert ("first step done after" in err and "loss 2.5000" in err) == compiling
        assert err.count("first step done") == (1 if compiling else 0)
