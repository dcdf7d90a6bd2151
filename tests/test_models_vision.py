"""Vision models: a few steps on tiny data (falling loss, jit == eager), save/load, CLI resume, CIFAR pipeline."""
import csv
import os

import numpy as np
import pytest

import jitnet as jn
from jitnet.models import vision as V
from jitnet.models import vision_cli as VC


def _images(n, c=1, hw=28, seed=0):
    """Return (x float32 (n, c, hw, hw), y int64): a learnable class-dependent pattern plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    proto = rng.random((10, c, hw, hw)).astype(np.float32)
    x = 0.7 * proto[y] + 0.3 * rng.random((n, c, hw, hw)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def _build(name, jit):
    jn.random.seed(0)
    return {"logreg": lambda: V.LogisticRegression(lr=0.05, jit=jit),
            "mlp": lambda: V.MLP(jit=jit),
            "cnn_mnist": lambda: V.CNNMnist(lr=3e-4, jit=jit),
            "cnn_cifar": lambda: V.CNNCifar(seed=0, jit=jit),
            "autoencoder": lambda: V.Autoencoder(code_size=2, jit=jit)}[name]()


def _batch(name, n=16):
    if name == "cnn_cifar":
        x, y = _images(n, c=3, hw=32)
        return jn.tensor(V.A.per_image_standardization(V.A.center_crop(x, 24))), jn.tensor(y)
    x, y = _images(n)
    return jn.tensor(x), jn.tensor(y)


MODELS = ["logreg", "mlp", pytest.param("cnn_mnist", marks=pytest.mark.slow),
          pytest.param("cnn_cifar", marks=pytest.mark.slow), pytest.param("autoencoder", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", MODELS)
def test_loss_falls_and_jit_matches_eager(name):
    x, y = _batch(name)
    losses = {}
    for jit in (True, False):
        m = _build(name, jit)
        if name == "cnn_mnist":
            m.net[9].rate = 0.0          # no dropout draws, so jit and eager see the same network
        losses[jit] = [float(m.train_step(x, y).item()) for _ in range(8 if jit else 3)]
    np.testing.assert_allclose(losses[True][:3], losses[False], rtol=2e-3, atol=1e-4)
    assert losses[True][-1] < losses[True][0], losses[True]


@pytest.mark.parametrize("name", ["mlp", pytest.param("cnn_cifar", marks=pytest.mark.slow),
                                  pytest.param("autoencoder", marks=pytest.mark.slow)])
def test_save_load_identical_predictions(name, tmp_path):
    x, y = _batch(name)
    m = _build(name, True)
    for _ in range(2):
        m.train_step(x, y)
    path = jn.save(m.net.state_dict(), str(tmp_path / "model.safetensors"))
    m2 = _build(name, True)
    m2.net.load_state_dict(jn.load(path))
    if name == "autoencoder":
        a, b = m.reconstruct(x.numpy()), m2.reconstruct(x.numpy())
    else:
        a, b = m.predict(x), m2.predict(x)
    np.testing.assert_array_equal(a, b)


def _csv_rows(logdir):
    with open(os.path.join(logdir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_cli_resume_continues_steps_and_optimizer(tmp_path):
    common = ["--limit", "200", "--test-limit", "100", "--batch-size", "50", "--no-progress", "--seed", "3"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert VC.TRAINERS["mlp"](common + ["--epochs", "1", "--logdir", a]) == 0
    assert VC.TRAINERS["mlp"](common + ["--epochs", "2", "--logdir", a, "--resume"]) == 0
    rows = _csv_rows(a)
    assert [int(r["step"]) for r in rows] == [4, 8]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert VC.TRAINERS["mlp"](common + ["--epochs", "2", "--logdir", b]) == 0   # the same run uninterrupted
    ra = jn.io.load(jn.io.latest_checkpoint(os.path.join(a, "checkpoints")))
    rb = jn.io.load(jn.io.latest_checkpoint(os.path.join(b, "checkpoints")))
    assert sorted(ra) == sorted(rb)
    assert any(k.startswith("optimizer/state/") for k in ra)
    for k in ra:                                    # resuming restored the weights AND Adam's slots and step
        np.testing.assert_allclose(ra[k], rb[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert int(ra["optimizer/global_step"]) == 8
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(a))


def _write_cifar(root, n_per_file=20):
    d = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(d)
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for k, f in enumerate(files):
        x, y = _images(n_per_file, c=3, hw=32, seed=k)
        rec = np.concatenate([y.astype(np.uint8)[:, None], (x * 255).astype(np.uint8).reshape(n_per_file, -1)], 1)
        rec.tofile(os.path.join(d, f))
    return d


@pytest.mark.slow
def test_cifar_pipeline_on_binary_files(tmp_path):
    _write_cifar(str(tmp_path))
    xtr, ytr = jn.data.load_cifar10("train", path=str(tmp_path), download=False, as_float=True)
    assert xtr.shape == (100, 3, 32, 32) and ytr.shape == (100,)
    m = _build("cnn_cifar", True)
    aug = m.preprocess(xtr[:32], True)
    assert aug.shape == (32, 3, 24, 24)
    np.testing.assert_allclose(aug.reshape(32, -1).mean(1), 0, atol=1e-4)   # per-image standardized
    x, y = jn.tensor(m.preprocess(xtr[:20], False)), jn.tensor(ytr[:20])
    losses = [float(m._step(x, y).item()) for _ in range(5)]
    assert losses[-1] < losses[0], losses
    logdir = str(tmp_path / "run")
    args = ["--data-dir", str(tmp_path), "--epochs", "1", "--batch-size", "20", "--logdir", logdir, "--no-progress"]
    assert VC.TRAINERS["cnn_cifar"](args) == 0
    rows = _csv_rows(logdir)
    assert int(rows[0]["step"]) == 5 and 0 <= float(rows[0]["test_accuracy"]) <= 1


def test_pca_matches_eigh():
    x, _ = _images(300)
    x = x.reshape(300, -1)[:, :64]
    mean, comps = V.pca_fit(x, 5)
    c = comps.numpy()
    np.testing.assert_allclose(c.T @ c, np.eye(5), atol=1e-4)
    xc = x - x.mean(0)
    w, v = np.linalg.eigh(xc.T @ xc / len(x))
    top = v[:, -5:]
    # same subspace: projecting the reference basis onto ours loses nothing
    np.testing.assert_allclose(np.linalg.norm(c.T @ top, axis=0), 1, atol=1e-3)
    rec = V.pca_reconstruct(x, mean, comps).numpy()
    ref = (xc @ top) @ top.T + x.mean(0)
    np.testing.assert_allclose(rec, ref, atol=1e-3)


@pytest.mark.slow
def test_denoising_autoencoder_and_codes():
    x, y = _batch("autoencoder")
    jn.random.seed(0)
    m = V.Autoencoder(code_size=30, denoise=True)
    losses = [float(m.train_step(x).item()) for _ in range(6)]
    assert losses[-1] < losses[0]
    assert m.codes(x.numpy()).shape == (16, 30)
    e = m.evaluate(x.numpy())
    assert e["test_mse"] == pytest.approx(e["test_l2"] / 784)
