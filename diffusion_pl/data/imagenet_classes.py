"""ImageNet-1k class orders: the ILSVRC devkit's (the 1-based labels of the downsampled npz release) and the sorted
WordNet IDs (class folders sorted by name: guided-diffusion's order, that of the released OpenAI checkpoints).

The devkit table is package data, ``imagenet_devkit_synsets.txt`` (its header names the source); it is checked when
first read.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

import numpy as np

DEVKIT_SYNSETS_FILE = "imagenet_devkit_synsets.txt"
NUM_CLASSES = 1000
# Known entries: devkit id (1-based) -> WNID, and sorted index (0-based) -> WNID.
DEVKIT_ANCHORS = {1: "n02119789"}  # kit fox
SORTED_ANCHORS = {0: "n01440764", 1: "n01443537", 207: "n02099601"}  # tench, goldfish, golden retriever


def check_devkit_table(rows: list[tuple[str, int]]) -> tuple[str, ...]:
    """The WNIDs by devkit id from ``(wnid, devkit id)`` rows; RuntimeError if the table is not the devkit's."""
    problems = []
    if [k for _, k in rows] != list(range(1, NUM_CLASSES + 1)):
        problems.append(f"devkit ids must be 1..{NUM_CLASSES} in order, got {len(rows)} rows")
    wnids = tuple(w for w, _ in rows)
    if len(set(wnids)) != len(wnids):
        problems.append("WordNet IDs repeat")
    bad = [w for w in wnids if not re.fullmatch(r"n\d{8}", w)]
    if bad:
        problems.append(f"not WordNet IDs: {bad[:5]}")
    if not problems:
        ordered = sorted(wnids)
        problems += [f"devkit id {k} is {wnids[k - 1]}, expected {w}" for k, w in DEVKIT_ANCHORS.items()
                     if wnids[k - 1] != w]  # fmt: skip
        problems += [f"sorted index {i} is {ordered[i]}, expected {w}" for i, w in SORTED_ANCHORS.items()
                     if ordered[i] != w]  # fmt: skip
    if problems:
        raise RuntimeError(f"diffusion_pl/data/{DEVKIT_SYNSETS_FILE} is damaged: {'; '.join(problems)}")
    return wnids


@lru_cache(maxsize=1)
def devkit_wnids() -> tuple[str, ...]:
    """WNIDs in devkit order: ``devkit_wnids()[k - 1]`` is the class of devkit id k (npz label k)."""
    text = resources.files("diffusion_pl.data").joinpath(DEVKIT_SYNSETS_FILE).read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            wnid, number = line.split()
            rows.append((wnid, int(number)))
    return check_devkit_table(rows)


def sorted_wnids() -> tuple[str, ...]:
    """WNIDs in sorted order: index i = class i of guided-diffusion's class folders and the released checkpoints."""
    return tuple(sorted(devkit_wnids()))


@lru_cache(maxsize=1)
def devkit_to_sorted() -> np.ndarray:
    """int64 (1000,): 0-based devkit index (npz label - 1) -> sorted-WNID index."""
    position = {w: i for i, w in enumerate(sorted_wnids())}
    table = np.array([position[w] for w in devkit_wnids()], dtype=np.int64)
    table.setflags(write=False)
    return table
