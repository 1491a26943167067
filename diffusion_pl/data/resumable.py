"""A training DataLoader that a run resumed from any checkpoint (mid-epoch too) continues exactly.

Lightning stores ``state_dict()`` of every training loader that has ``state_dict`` / ``load_state_dict`` in each
checkpoint and hands it back on resume; a plain DataLoader has neither, so a run resumed from a step checkpoint
restarted the epoch's batches, with a shuffle drawn from whatever RNG state the new process had.

    ResumableSampler     the epoch's order is a function of (seed, epoch) alone: DistributedSampler's rule,
                         torch.randperm(N) with a generator seeded seed + epoch, one shard per rank; Lightning calls
                         set_epoch. Each index comes with a per-example seed (seed, epoch, position, rank).
    SeededDataset        item (index, example seed): the wrapped dataset's item drawn under
                         torch.manual_seed(example seed), so its random augmentations (e.g. random flips) are the same
                         in a resumed run, with any number of DataLoader workers.
    ResumableDataLoader  counts the batches it yields in an epoch: state_dict() = {epoch, batches, seed};
                         load_state_dict() makes the next epoch iteration skip those batches by index (no data is read).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from diffusion_pl.utils.seeds import derive_seed


class ResumableSampler(DistributedSampler):
    """DistributedSampler over this process's rank (one replica without torch.distributed) that yields
    ``(index, derive_seed(seed, epoch, position, rank))`` and can start an epoch at a given position (``start``, in
    examples)."""

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int | None = None, drop_last: bool = False):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=shuffle,
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else int(seed),
            drop_last=drop_last,
        )
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self.start = self.start, 0
        indices = list(super().__iter__())
        for position in range(start, len(indices)):
            yield indices[position], derive_seed(self.seed, self.epoch, position, self.rank)


class SeededDataset(Dataset):
    """``dataset[index]`` drawn with torch's RNG seeded by the example seed (the caller's RNG state is kept)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only, the one fork_rng restores
            return self.dataset[index]


class ResumableDataLoader(DataLoader):
    """DataLoader over ``SeededDataset(dataset)`` with a :class:`ResumableSampler`; Lightning checkpoints its
    position. ``source_dataset`` is the dataset given."""

    def __init__(self, dataset: Dataset, batch_size: int = 1, shuffle: bool = True, seed: int | None = None,
                 drop_last: bool = False, **kwargs: Any) -> None:  # fmt: skip
        self.source_dataset = dataset.dataset if isinstance(dataset, SeededDataset) else dataset
        kwargs.pop("sampler", None)  # Lightning passes one when it re-creates a loader; ours is already per rank
        sampler = ResumableSampler(self.source_dataset, shuffle=shuffle, seed=seed)
        super().__init__(SeededDataset(self.source_dataset), batch_size=batch_size, sampler=sampler,
                         drop_last=drop_last, **kwargs)  # fmt: skip
        self.batches_done = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None and resume["epoch"] == sampler.epoch and resume["batches"] < len(self):
            skip = resume["batches"]
        sampler.start = skip * int(self.batch_size or 1)
        self.batches_done = skip
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        return {"epoch": int(sampler.epoch), "batches": int(self.batches_done), "seed": int(sampler.seed)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume where the checkpoint was taken: the same seed; the saved epoch skips its consumed batches."""
        self.sampler.seed = int(state_dict["seed"])  # type: ignore[attr-defined]
        self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}


def sync_sampler_epoch(trainer: Any) -> None:
    """Set the epoch of the training loaders' ResumableSamplers to ``trainer.current_epoch`` (call from
    on_train_epoch_start). Lightning's own set_epoch call passes its count of processed epochs, which is one ahead
    of current_epoch for the rest of a run resumed from a checkpoint written at an epoch's end."""
    loaders = trainer.train_dataloader
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ResumableSampler):
            sampler.set_epoch(int(trainer.current_epoch))
