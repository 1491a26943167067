"""diffusion_pl.sampling: per-sample-seeded generation (models + diffusion; no Lightning) and sharded sample output."""

from diffusion_pl.sampling.engine import (
    LABEL_MODES,
    METHODS,
    PRECISIONS,
    GuidanceConfigError,
    SampleBatch,
    SampleEngine,
    check_guidance,
    resolve_respacing,
    sample_seed,
)
from diffusion_pl.sampling.shards import (
    GRID_NAME,
    SAMPLES_NAME,
    SETTINGS_NAME,
    SHARD_DIR,
    Shard,
    merge_shards,
    plan_shards,
    prepare_shard_dir,
    rank_shards,
    run_shards,
    write_outputs,
)

__all__ = [
    "GRID_NAME",
    "LABEL_MODES",
    "METHODS",
    "PRECISIONS",
    "SAMPLES_NAME",
    "SETTINGS_NAME",
    "SHARD_DIR",
    "GuidanceConfigError",
    "SampleBatch",
    "SampleEngine",
    "Shard",
    "check_guidance",
    "merge_shards",
    "plan_shards",
    "prepare_shard_dir",
    "rank_shards",
    "resolve_respacing",
    "run_shards",
    "sample_seed",
    "write_outputs",
]
