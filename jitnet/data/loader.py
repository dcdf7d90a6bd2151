"""Mini-batch iteration over in-memory datasets, with optional background prefetch."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..tensor import Tensor

__all__ = ["ArrayDataset", "DataLoader", "DistributedSampler"]


def _to_output(array: np.ndarray) -> Any:
    """Return ``array`` as a jitnet Tensor sharing its memory (the single NumPy-to-Tensor point)."""
    return Tensor(array)


class ArrayDataset:
    """A dataset made of equal-length arrays; ``ds[idx]`` returns a tuple of ``a[idx]``."""

    def __init__(self, *arrays: Any):
        if not arrays:
            raise ValueError("ArrayDataset needs at least one array")
        arrs = tuple(np.asarray(a) for a in arrays)
        for i, a in enumerate(arrs):
            if a.ndim == 0:
                raise ValueError(f"ArrayDataset: array {i} is a scalar; every array needs a leading length axis")
        lengths = [a.shape[0] for a in arrs]
        if len(set(lengths)) != 1:
            raise ValueError(f"ArrayDataset: arrays must have the same length, got lengths {lengths}")
        self.arrays = arrs

    def __len__(self) -> int:
        """Return the number of examples."""
        return self.arrays[0].shape[0]

    def __getitem__(self, index: Any) -> tuple[np.ndarray, ...]:
        """Return a tuple holding each array indexed by ``index``."""
        return tuple(a[index] for a in self.arrays)


class DistributedSampler:
    """The indices one rank of ``num_replicas`` reads from a dataset of ``n`` examples, each epoch.

    Every rank draws the same permutation from ``(seed, epoch)`` (or keeps the natural order without
    ``shuffle``) and takes every ``num_replicas``-th index starting at its ``rank``, so the shards are disjoint
    and batch ``k`` of all ranks together is batch ``k`` of one process whose batch is ``num_replicas`` times
    larger. When ``n`` is not a multiple of ``num_replicas`` the epoch's tail is dropped (``drop_last``) or the
    order is padded with its first indices (the default, PyTorch's rule), so all ranks get the same number of
    examples and therefore the same number of steps.
    """

    def __init__(self, n: int, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if int(num_replicas) != num_replicas or num_replicas < 1:
            raise ValueError(f"DistributedSampler: num_replicas must be a positive integer, got {num_replicas!r}")
        if int(rank) != rank or not 0 <= rank < num_replicas:
            raise ValueError(f"DistributedSampler: rank must be in [0, {num_replicas}), got {rank!r}")
        self.n, self.num_replicas, self.rank = int(n), int(num_replicas), int(rank)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)

    def __len__(self) -> int:
        """Return the number of examples this rank reads per epoch."""
        if self.drop_last:
            return self.n // self.num_replicas
        return -(-self.n // self.num_replicas)

    def indices(self, epoch: int) -> np.ndarray:
        """Return this rank's example indices for ``epoch`` (int64)."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.n).astype(np.int64)
        else:
            order = np.arange(self.n, dtype=np.int64)
        return shard_order(order, self.num_replicas, self.rank, self.drop_last)


def shard_order(order: np.ndarray, num_replicas: int, rank: int, drop_last: bool) -> np.ndarray:
    """Return rank ``rank``'s strided share of ``order`` (padded from its start or cut to a multiple)."""
    n = len(order)
    if drop_last:
        order = order[: n - n % num_replicas]
    elif n % num_replicas:
        pad = num_replicas - n % num_replicas
        reps = -(-pad // max(n, 1))
        order = np.concatenate([order] + [order] * reps)[: n + pad] if n else order
    return np.ascontiguousarray(order[rank::num_replicas])


_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class DataLoader:
    """Iterate over a dataset in mini-batches, yielding a tuple of batches per step.

    ``dataset`` is a tuple/list of equal-length arrays, an :class:`ArrayDataset`,
    or any object with ``__len__`` and ``__getitem__`` accepting an integer
    index array.  With ``shuffle=True`` each epoch (each call to ``iter``) uses
    the permutation drawn from ``(seed, epoch)``, so runs are reproducible;
    ``seed=None`` draws a random base seed once.  ``prefetch=N > 0`` builds up
    to ``N`` batches ahead in a background thread.

    ``num_replicas`` and ``rank`` shard the epoch for data-parallel training
    (see :class:`DistributedSampler`): every rank draws the same permutation
    and reads only its strided share of it, ``batch_size`` examples per step
    (the per-rank batch); all ranks get the same number of batches. A shard
    that is not a multiple of the world size is padded with the epoch's first
    examples, or cut with ``drop_last``.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 32,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        prefetch: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        if isinstance(dataset, (tuple, list)):
            dataset = ArrayDataset(*dataset)
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError("dataset must be a tuple of arrays or define __len__ and __getitem__")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if int(prefetch) != prefetch or prefetch < 0:
            raise ValueError(f"prefetch must be a non-negative integer, got {prefetch!r}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.prefetch = int(prefetch)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        self.seed = int(seed)
        self.epoch = 0
        self.sampler = None
        if num_replicas is not None or rank is not None:
            if num_replicas is None or rank is None:
                raise ValueError("DataLoader: give both num_replicas and rank (or neither)")
            self.sampler = DistributedSampler(len(dataset), num_replicas, rank, self.shuffle, self.seed,
                                              self.drop_last)

    def __len__(self) -> int:
        """Return the number of batches per epoch."""
        n = len(self.dataset) if self.sampler is None else len(self.sampler)
        if self.drop_last:
            return n // self.batch_size
        return -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch counter used for the next shuffle."""
        self.epoch = int(epoch)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Return the example order used for ``epoch`` (int64 array; this rank's shard when sharded)."""
        if self.sampler is not None:
            return self.sampler.indices(epoch)
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, int(epoch)])
        return rng.permutation(n).astype(np.int64)

    def _batches(self, order: np.ndarray) -> Iterator[Any]:
        n_batches = len(self)
        bs = self.batch_size
        for b in range(n_batches):
            idx = order[b * bs : (b + 1) * bs]
            item = self.dataset[idx]
            if isinstance(item, tuple):
                yield tuple(_to_output(a) for a in item)
            else:
                yield _to_output(item)

    def __iter__(self) -> Iterator[Any]:
        """Return an iterator over this epoch's batches and advance the epoch counter."""
        order = self.epoch_indices(self.epoch)
        self.epoch += 1
        if self.prefetch == 0:
            return self._batches(order)
        return self._prefetched(order)

    def _prefetched(self, order: np.ndarray) -> Iterator[Any]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in self._batches(order):
                    if not put(batch):
                        return
            except BaseException as exc:  # hand errors to the consumer
                put(_Failure(exc))
                return
            put(_END)

        worker = threading.Thread(target=produce, name="jitnet-data-prefetch", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            # Runs on normal end, on error, and when the consumer stops early
            # (generator close / garbage collection): stop and join the worker.
            stop.set()
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            worker.join()
