"""`MixtureBatchSampler`: deterministic, seeded, resumable batches over a mixture of sources."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler
from transformers.utils import logging

logger = logging.get_logger(__name__)


class MixtureBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices. Every epoch is a pure function of (seed, epoch):

    1. each source `(start, stop, num_samples)` contributes `num_samples` indices: all of them when -1/0 or equal
       to its size, a random subset when fewer, whole repeats plus a random remainder when more;
    2. the indices are shuffled (`shuffle=True`), grouped by `bucket_keys` (frames per image: a batch never mixes
       frame counts), cut into batches of `batch_size` (the last of each bucket may be smaller unless
       `drop_last`), and the batches are shuffled;
    3. with `num_replicas` > 1 the batch list is padded by repeating its first batches to a multiple of
       `num_replicas`, and rank `r` takes batches `r, r + num_replicas, ...`, so every process runs the same number
       of steps.

    `set_epoch(epoch, start_batch=k)` starts the epoch at this rank's batch `k`: resuming a run yields exactly the
    batches the uninterrupted run would have yielded next.
    """

    def __init__(
        self,
        source_ranges: list[tuple[int, int, int]],
        batch_size: int,
        *,
        bucket_keys: list[int] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        for start, stop, num_samples in source_ranges:
            if not 0 <= start < stop:
                raise ValueError(f"bad source range ({start}, {stop})")
            if num_samples < -1:
                raise ValueError(f"num_samples must be >= -1, got {num_samples}")
        self.source_ranges = [tuple(r) for r in source_ranges]
        self.batch_size = batch_size
        size = max(stop for _, stop, _ in self.source_ranges)
        self.bucket_keys = list(bucket_keys) if bucket_keys is not None else [0] * size
        if len(self.bucket_keys) < size:
            raise ValueError(f"bucket_keys has {len(self.bucket_keys)} entries for {size} samples")
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"the checkpoint's sampler seed {state['seed']} differs from this run's seed {self.seed}")
        self.set_epoch(state["epoch"], state["start_batch"])

    def _generator(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))

    def epoch_indices(self, epoch: int) -> list[int]:
        """All the indices of an epoch (every rank's), in visiting order before batching."""
        generator = self._generator(epoch)
        chosen = []
        for start, stop, num_samples in self.source_ranges:
            size = stop - start
            if num_samples in (-1, 0) or num_samples == size:
                picked = np.arange(size)
            elif num_samples < size:
                picked = generator.choice(size, num_samples, replace=False)
                if not self.shuffle:
                    picked = np.sort(picked)
            else:
                repeats, remainder = divmod(num_samples, size)
                picked = np.concatenate(
                    [np.tile(np.arange(size), repeats), generator.choice(size, remainder, replace=False)]
                )
            chosen.append(picked + start)
        indices = np.concatenate(chosen)
        if self.shuffle:
            indices = indices[generator.permutation(len(indices))]
        return indices.tolist()

    def all_batches(self, epoch: int) -> list[list[int]]:
        """The batches of an epoch for all ranks, before sharding."""
        generator = self._generator(epoch + (1 << 31))  # independent of the index draws
        buckets: dict[int, list[int]] = {}
        for index in self.epoch_indices(epoch):
            buckets.setdefault(self.bucket_keys[index], []).append(index)
        batches = []
        for key in sorted(buckets):
            members = buckets[key]
            for first in range(0, len(members), self.batch_size):
                batch = members[first : first + self.batch_size]
                if len(batch) < self.batch_size and self.drop_last:
                    continue
                batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in generator.permutation(len(batches))]
        if self.num_replicas > 1 and batches:
            padding = (-len(batches)) % self.num_replicas
            batches = batches + [batches[i % len(batches)] for i in range(padding)]
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of an epoch, from the first."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.all_batches(epoch)[self.rank :: self.num_replicas])
        return self._cache[1]

    def __iter__(self):
        yield from self.epoch_batches(self.epoch)[self.start_batch :]

    def __len__(self) -> int:
        return max(len(self.epoch_batches(self.epoch)) - self.start_batch, 0)
