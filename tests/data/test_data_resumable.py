"""ResumableDataLoader: an epoch's batches (order and random flips) are a function of (seed, epoch), and a loader
given the state_dict of another one taken mid-epoch yields exactly that loader's remaining batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_pl.data.common import ArrayImageDataset
from diffusion_pl.data.resumable import ResumableDataLoader


def _loader(num_workers: int, seed: int = 7) -> ResumableDataLoader:
    images = np.random.default_rng(0).integers(0, 256, size=(23, 4, 4, 1), dtype=np.uint8)
    dataset = ArrayImageDataset(images, np.arange(23), random_flip=True)
    return ResumableDataLoader(dataset, batch_size=4, shuffle=True, seed=seed, drop_last=True, num_workers=num_workers,
                               persistent_workers=num_workers > 0)  # as make_dataloader


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [x for x, _ in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_loader_yields_the_remaining_batches(num_workers):
    full = _loader(num_workers)
    epoch1 = _epoch(full, 1)
    assert len(epoch1) == 5

    cut = _loader(num_workers)
    cut.sampler.set_epoch(1)
    iterator = iter(cut)
    for _ in range(2):
        next(iterator)
    state = cut.state_dict()
    assert state == {"epoch": 1, "batches": 2, "seed": 7}

    torch.manual_seed(999)  # the new process's RNG state must not matter
    resumed = _loader(num_workers, seed=123)
    resumed.load_state_dict(state)
    rest = _epoch(resumed, 1)
    assert len(rest) == 3
    assert all(torch.equal(a, b) for a, b in zip(rest, epoch1[2:], strict=True))
    # The next epoch is complete again and equals the uninterrupted loader's.
    assert all(torch.equal(a, b) for a, b in zip(_epoch(resumed, 2), _epoch(full, 2), strict=True))


def test_flips_and_order_change_with_the_epoch():
    loader = _loader(0)
    one, two = _epoch(loader, 1), _epoch(loader, 2)
    assert not all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    # Each example is flipped in some epochs and not in others (per-example seeds, not one draw for all).
    images = loader.source_dataset.images
    flips = {}
    for epoch in range(6):
        loader.sampler.set_epoch(epoch)
        for index, seed in loader.sampler:
            x, _ = loader.dataset[(index, seed)]
            plain = torch.from_numpy(np.ascontiguousarray(images[index].transpose(2, 0, 1))).float() / 127.5 - 1
            flips.setdefault(index, set()).add(not torch.allclose(x, plain))
    assert len(flips) == 23
    assert sum(len(v) == 2 for v in flips.values()) > 15
