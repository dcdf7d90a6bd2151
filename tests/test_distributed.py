"""Data-parallel training over MPI (jitnet.distributed, the sharded DataLoader, the CLI's --distributed).

The default run checks the pieces that need no MPI job (bucket packing, shards, the errors before a job
exists); the ``slow`` tests start real jobs with ``mpiexec -n 2`` (the mpich wheel of ``jitnet[mpi]``).
"""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import jitnet as jn
import jitnet.distributed as dist
from jitnet.data import DataLoader
from jitnet.data.loader import DistributedSampler, shard_order

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "mpi_scripts")


# --------------------------------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------------------------------

def test_buckets_pack_small_gradients_and_keep_big_ones_alone():
    f4 = np.float32
    nbytes = [400, 400, 400, 5000, 100, 100]
    b = dist.plan_buckets(nbytes, [f4] * 6, bucket_bytes=1000)
    assert b == [[0, 1], [2], [3], [4, 5]]
    assert sorted(i for g in b for i in g) == list(range(6))          # every gradient exactly once
    for g in b:
        assert len(g) == 1 or sum(nbytes[i] for i in g) <= 1000


def test_buckets_never_mix_dtypes_and_zero_means_one_each():
    b = dist.plan_buckets([8, 8, 8, 8], [np.float32, np.float64, np.float32, np.float64], bucket_bytes=1 << 20)
    assert b == [[0, 2], [1, 3]]
    assert dist.plan_buckets([8, 8, 8], [np.float32] * 3, bucket_bytes=0) == [[0], [1], [2]]
    assert dist.plan_buckets([8] * 5, [np.float32] * 5, bucket_bytes=1 << 20) == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="bucket_bytes"):
        dist.plan_buckets([8], [np.float32], bucket_bytes=-1)


# --------------------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,world,drop_last", [(10, 2, False), (11, 2, False), (11, 3, True), (7, 4, False),
                                               (3, 4, False)])
def test_shards_are_disjoint_equal_and_cover_the_epoch(n, world, drop_last):
    shards = [DistributedSampler(n, world, r, shuffle=True, seed=5, drop_last=drop_last).indices(2)
              for r in range(world)]
    lens = {len(s) for s in shards}
    assert len(lens) == 1 and lens.pop() == len(DistributedSampler(n, world, 0, drop_last=drop_last))
    allidx = np.concatenate(shards)
    if drop_last:
        assert len(set(allidx.tolist())) == len(allidx) == n - n % world
    else:
        assert set(allidx.tolist()) == set(range(n))                     # padding repeats, never drops
        assert len(allidx) == -(-n // world) * world
        if n % world == 0:
            assert len(set(allidx.tolist())) == n
    # same seed and epoch: the same permutation on every rank; another epoch: another one
    s0 = DistributedSampler(n, world, 0, seed=5, drop_last=drop_last)
    assert np.array_equal(s0.indices(2), shards[0])


def test_rank_batches_together_are_the_one_process_batch():
    x = np.arange(24, dtype=np.float32)
    one = [b.numpy() for b in DataLoader(x, batch_size=6, shuffle=True, seed=3)]
    ranks = [[b.numpy() for b in DataLoader(x, batch_size=3, shuffle=True, seed=3, num_replicas=2, rank=r)]
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) == 4
    for k in range(4):
        assert sorted(np.concatenate([ranks[0][k], ranks[1][k]]).tolist()) == sorted(one[k].tolist())
        assert not set(ranks[0][k].tolist()) & set(ranks[1][k].tolist())


def test_loader_without_shards_is_unchanged():
    x = np.arange(10)
    dl = DataLoader(x, batch_size=4, shuffle=True, seed=1)
    assert dl.sampler is None and len(dl) == 3
    expected = np.random.default_rng([1, 0]).permutation(10)
    assert np.array_equal(dl.epoch_indices(0), expected)
    assert np.array_equal(np.concatenate([b.numpy() for b in dl]), expected)


def test_shard_errors_name_the_problem():
    with pytest.raises(ValueError, match="rank must be in"):
        DistributedSampler(10, 2, 2)
    with pytest.raises(ValueError, match="num_replicas"):
        DistributedSampler(10, 0, 0)
    with pytest.raises(ValueError, match="both num_replicas and rank"):
        DataLoader(np.arange(4), num_replicas=2)
    assert shard_order(np.arange(5), 2, 1, drop_last=False).tolist() == [1, 3, 0]


# --------------------------------------------------------------------------------------------------------------
# Before a job exists
# --------------------------------------------------------------------------------------------------------------

def test_without_a_job_rank_and_size_are_one_process(monkeypatch):
    monkeypatch.setattr(dist, "_CTX", None)
    assert dist.rank() == 0 and dist.world_size() == 1 and not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init"):
        dist.allreduce(jn.ones((2,)))
    with pytest.raises(RuntimeError, match="init"):
        dist.DistributedOptimizer(jn.optim.SGD([jn.Parameter(np.zeros(2, np.float32))], lr=0.1))


def test_missing_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setattr(dist, "_CTX", None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)          # import mpi4py raises ImportError
    with pytest.raises(ImportError, match=r"jitnet\[mpi\]") as e:
        dist.init()
    assert e.value.name == "mpi4py"


def test_not_started_by_a_launcher_is_a_clear_error(monkeypatch):
    pytest.importorskip("mpi4py")
    monkeypatch.setattr(dist, "_CTX", None)
    for k in dist._LAUNCHER_VARS:
        monkeypatch.delenv(k, raising=False)
    assert not dist.launched_by_mpi()
    with pytest.raises(RuntimeError, match="mpiexec -n N"):
        dist.init()
    assert dist.launched_by_mpi({"PMI_RANK": "0"}) and dist.launched_by_mpi({"OMPI_COMM_WORLD_RANK": "1"})


def test_cli_distributed_outside_mpi_is_one_line_error(monkeypatch, capsys, tmp_path):
    pytest.importorskip("mpi4py")
    monkeypatch.setattr(dist, "_CTX", None)
    monkeypatch.setenv("JITNET_MALLOC_TUNING", "0")
    for k in dist._LAUNCHER_VARS:
        monkeypatch.delenv(k, raising=False)
    from jitnet.__main__ import main
    code = main(["train", "mlp", "--distributed", "--epochs", "1", "--logdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "--distributed" in err and "mpiexec" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------------------
# Real jobs (mpiexec -n 2)
# --------------------------------------------------------------------------------------------------------------

def _mpiexec():
    pytest.importorskip("mpi4py")
    cand = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    exe = cand if os.path.exists(cand) else shutil.which("mpiexec")
    if exe is None:
        pytest.skip("mpiexec not found (pip install 'jitnet[mpi]')")
    return exe


def _run(args, timeout, env=None):
    e = dict(os.environ)
    e.pop("JITNET_MPI_TIMEOUT", None)
    e.update(env or {})
    t0 = time.monotonic()
    p = subprocess.run([_mpiexec(), "-n", "2", sys.executable] + args, capture_output=True, text=True,
                       timeout=timeout, env=e)
    return p, time.monotonic() - t0


def test_allreduce_into_out_on_every_path(tmp_path):
    # quick (one 2-rank job, a few seconds): the lean path's remembered pair, in place, overlapping buffers
    out = str(tmp_path / "paths.npz")
    p, _ = _run([os.path.join(SCRIPTS, "allreduce_paths.py"), out], timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    res = np.load(out)
    base = np.arange(6, dtype=np.float32) + 1
    for i in range(3):
        np.testing.assert_array_equal(res[f"pair1/{i}"], 3 * base)         # ranks hold base*1, base*2
        np.testing.assert_array_equal(res[f"pair2/{i}"], 5 * base)         # base*2, base*3
    np.testing.assert_array_equal(res["cross"], 5 * base)
    np.testing.assert_array_equal(res["changed"], 7 * base)                # base*3, base*4
    np.testing.assert_array_equal(res["inplace"], 3 * base)
    np.testing.assert_array_equal(res["overlap"], 3 * base)
    np.testing.assert_array_equal(res["mean"], 2.5 * base)
    np.testing.assert_array_equal(res["max"], 3 * base)


@pytest.mark.slow
def test_two_ranks_hold_the_parameters_of_one_process(tmp_path):
    out = str(tmp_path / "out.npz")
    p, _ = _run([os.path.join(SCRIPTS, "dp_check.py"), out], timeout=400)
    assert p.returncode == 0, p.stdout + p.stderr
    res = np.load(out)
    rank1 = np.load(out + ".rank1.npz")
    cases = {k.split("/")[0] for k in res.files}
    assert cases == {"mlp_jit", "mlp_eager", "cnn_bn_jit", "embed_jit"}
    # the MLP's compiled step: one native driver, one collective per bucket (3 of 256 bytes), one driver
    assert int(res["mlp_jit/dp/buckets"]) == 3
    assert res["mlp_jit/dp/plan_steps"].tolist() == [3 + 2]
    assert int(res["embed_jit/dp/sparse"]) == 1
    for k in res.files:
        if "/dp/" not in k or k.split("/")[-1] in ("plan_steps", "buckets", "sparse"):
            continue
        dp, ref, init = res[k], res[k.replace("/dp/", "/ref/")], res[k.replace("/dp/", "/init/")]
        np.testing.assert_allclose(dp, ref, rtol=1e-4, atol=2e-6, err_msg=k)
        np.testing.assert_array_equal(dp, rank1[k], err_msg=f"{k}: rank 1 differs from rank 0")
        if not k.endswith("moving_var"):
            assert not np.allclose(dp, init), f"{k} did not train"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kill", "hang", "raise"])
def test_a_failed_rank_ends_the_job(mode):
    p, seconds = _run([os.path.join(SCRIPTS, "fail_rank.py"), mode], timeout=90,
                      env={"JITNET_MPI_TIMEOUT": "5"})
    assert p.returncode != 0
    assert seconds < 60
    assert "rank 1 fails now" in p.stdout
    text = p.stdout + p.stderr
    if mode == "hang":
        assert "rank 0 of 2: allreduce (gradient bucket) waited more than 5 s" in text
    elif mode == "raise":
        assert "RuntimeError: a failure on rank 1" in text and "aborting the job" in text


@pytest.mark.slow
def test_cli_mlp_distributed_writes_once_and_resumes(tmp_path):
    logdir = str(tmp_path / "run")
    common = ["-m", "jitnet", "train", "mlp", "--distributed", "--limit", "512", "--test-limit", "200",
              "--batch-size", "64", "--logdir", logdir, "--no-progress"]
    p, _ = _run(common + ["--epochs", "1"], timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("mlp epoch 1/1: step 8,") == 1              # rank 0 speaks, 512 / 64 = 8 steps
    assert "distributed: 2 ranks" in p.stdout
    rows = open(os.path.join(logdir, "metrics.csv")).read().strip().splitlines()
    assert len(rows) == 2
    assert os.listdir(os.path.join(logdir, "checkpoints")).count("ckpt-8.safetensors") == 1
    p, _ = _run(common + ["--epochs", "2", "--resume"], timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("resumed from") == 1 and "step 16," in p.stdout
    assert len(open(os.path.join(logdir, "metrics.csv")).read().strip().splitlines()) == 3


@pytest.mark.slow
def test_gpu_tensors_are_staged_through_the_host_in_the_simulator():
    pytest.importorskip("numba.cuda")
    p, _ = _run([os.path.join(SCRIPTS, "cuda_staged.py")], timeout=120, env={"NUMBA_ENABLE_CUDASIM": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("staged collectives ok") == 2


def test_collectives_stay_out_of_the_kernel_registry():
    from jitnet.autodiff.core import REGISTRY
    assert not [n for n in REGISTRY if n.startswith("mpi_")]        # the registry sweeps would find no kernel
    assert dist.ALLREDUCE.extra["random"] and dist.ALLGATHER.impl["cuda"] is not None


def test_skipgram_ranks_split_every_batch_between_them():
    from types import SimpleNamespace

    from jitnet.models import skipgram as S

    class Recorder:
        """Stands in for SkipGramModel: records the pairs of each step; the rng is used as the real step does."""

        def __init__(self):
            self.sg = SimpleNamespace(vocab=SimpleNamespace(counts=np.ones(20)), _normed=None)
            self.opt = SimpleNamespace(param_groups=[{"lr": 1.0}])
            self.steps = []

        def train_step(self, centers, labels, rng):
            S.sample_negatives(np.arange(20, dtype=np.int64), (len(centers), 2), rng)
            self.steps.append(sorted(zip(centers.tolist(), labels.tolist())))
            return jn.tensor(np.float32(1.0))

    ids = np.random.default_rng(0).integers(0, 20, 300)
    one, ranks = Recorder(), [Recorder(), Recorder()]
    S.train_model(one, ids, batch_size=16, window=2, sample=0, seed=4, max_steps=6)
    for r, m in enumerate(ranks):
        S.train_model(m, ids, batch_size=16, window=2, sample=0, seed=4, max_steps=6, rank=r, world_size=2)
    assert len(one.steps) == len(ranks[0].steps) == len(ranks[1].steps) == 6
    for k in range(6):
        assert len(ranks[0].steps[k]) == len(ranks[1].steps[k]) == 8
        assert sorted(ranks[0].steps[k] + ranks[1].steps[k]) == one.steps[k]
