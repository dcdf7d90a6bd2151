"""The training scripts of docs/coming-from-pytorch.md run as written (a doc example that is not run goes
stale): the jitnet one eagerly in the default run; with ``JIT = True``, the PyTorch one, and the jitnet
weights loaded into the PyTorch model with the slow tests."""
import os
import re

import numpy as np
import pytest

import jitnet as jn

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "coming-from-pytorch.md")


def _script(name):
    """Return the ```python block of the doc whose first line is ``# name``."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b.startswith(f"# {name}\n")]
    assert len(blocks) == 1, f"{name}: expected one block in {DOC}, found {len(blocks)}"
    return blocks[0]


def _run(src, name):
    ns = {"__name__": "__main__"}
    exec(compile(src, name, "exec"), ns)
    return ns


def _accuracies(out):
    return [float(a) for a in re.findall(r"test accuracy ([0-9.]+)", out)]


def test_jitnet_script_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _run(_script("train_fashion_mlp_jitnet.py"), "train_fashion_mlp_jitnet.py")
    acc = _accuracies(capsys.readouterr().out)
    assert len(acc) == 2 and acc[-1] > 0.6, acc
    assert set(jn.load("fashion_mlp.safetensors")) == {"fc1/W", "fc1/b", "fc2/W", "fc2/b"}
    assert set(jn.io.load_file("fashion_mlp_torch.safetensors")) == {"fc1.weight", "fc1.bias", "fc2.weight",
                                                                      "fc2.bias"}


@pytest.mark.slow
def test_both_scripts_and_the_weights_in_torch(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    monkeypatch.chdir(tmp_path)
    t = _run(_script("train_fashion_mlp_torch.py"), "train_fashion_mlp_torch.py")
    assert _accuracies(capsys.readouterr().out)[-1] > 0.6
    src = _script("train_fashion_mlp_jitnet.py")
    assert "JIT = False" in src
    j = _run(src.replace("JIT = False", "JIT = True"), "train_fashion_mlp_jitnet.py")
    assert _accuracies(capsys.readouterr().out)[-1] > 0.6
    net = t["Net"]()
    net.load_state_dict(st.load_file("fashion_mlp_torch.safetensors"))
    net.eval()
    x = j["x_test"][:200]
    j["model"].eval()
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    with jn.no_grad():
        got = j["model"](jn.tensor(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
