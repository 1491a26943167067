"""diffusion_pl.sampling: per-sample-seeded generation (models + diffusion; no Lightning) and sharded sample output."""

from diffusion_pl.diffusion import check_eta
from diffusion_pl.sampling.engine import (
    LABEL_MODES,
    PRECISIONS,
    GuidanceConfigError,
    SampleBatch,
    SampleEngine,
    check_guidance,
    sample_seed,
)
from diffusion_pl.sampling.shards import (
    GRID_NAME,
    SAMPLES_NAME,
    SETTINGS_NAME,
    SHARD_DIR,
    Shard,
    grid_layout,
    merge_shards,
    num_batches_of,
    plan_shards,
    prepare_shard_dir,
    rank_shards,
    run_shards,
    shard_done,
    write_outputs,
)

__all__ = [
    "GRID_NAME",
    "LABEL_MODES",
    "PRECISIONS",
    "SAMPLES_NAME",
    "SETTINGS_NAME",
    "SHARD_DIR",
    "GuidanceConfigError",
    "SampleBatch",
    "SampleEngine",
    "Shard",
    "check_eta",
    "check_guidance",
    "grid_layout",
    "merge_shards",
    "num_batches_of",
    "shard_done",
    "plan_shards",
    "prepare_shard_dir",
    "rank_shards",
    "run_shards",
    "sample_seed",
    "write_outputs",
]
