"""all_gather_uneven / rank-0 compute + broadcast / evaluate_samples over the 2 processes of a CPU Fabric (gloo)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from eval_helpers import (
    DDP_METRIC_OPTIONS,
    DDP_SHARDS,
    INCEPTION_DDP_OPTIONS,
    TinyFeatures,
    ddp_generated_images,
    ddp_reference_images,
    ddp_worker,
    free_port,
    inception_ddp_generated_images,
)

from diffusion_pl.evaluation import (
    all_gather_uneven,
    compute_on_rank_zero_and_broadcast,
    evaluate_samples,
)

pytestmark = pytest.mark.ddp


@pytest.fixture(scope="module")
def inception_reference(tmp_path_factory, inception):
    path = tmp_path_factory.mktemp("ddp_ref") / "inception_ref.pt"
    ref = inception(torch.cat([inception_ddp_generated_images()[:2], ddp_reference_images()[:4]]))
    torch.save(ref, path)
    return ref, str(path)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, random_inception_weights, inception_reference):
    """Spawn 2 processes once; returns [rank0 observations, rank1 observations]."""
    outdir = tmp_path_factory.mktemp("ddp")
    args = (2, free_port(), str(outdir), random_inception_weights, inception_reference[1])
    mp.spawn(ddp_worker, args=args, nprocs=2, join=True)
    return [torch.load(outdir / f"rank{r}.pt") for r in range(2)]


def test_all_gather_uneven_keeps_rank_order(ranks):
    rows0, rows1 = DDP_SHARDS
    expected = torch.cat(
        [
            torch.arange(rows0 * 3, dtype=torch.float64).reshape(rows0, 3),
            torch.arange(rows1 * 3, dtype=torch.float64).reshape(rows1, 3) + 1000,
        ]
    )
    for r in ranks:
        assert r["gather_float"].dtype == torch.float64
        torch.testing.assert_close(r["gather_float"], expected, rtol=0, atol=0)


def test_all_gather_uneven_with_an_empty_rank(ranks):
    for r in ranks:
        torch.testing.assert_close(r["gather_int_empty"], torch.ones(4, 2, dtype=torch.int64), rtol=0, atol=0)


def test_all_gather_uneven_shape_mismatch_raises_on_all_ranks(ranks):
    for r in ranks:
        assert r["mismatch_error"] is not None and "shapes disagree" in r["mismatch_error"]
        assert "(2, 3)" in r["mismatch_error"] and "(2, 4)" in r["mismatch_error"]


def test_rank0_failure_reaches_every_rank(ranks):
    assert ranks[0]["rank0_error"].startswith("KeyError")
    assert ranks[1]["rank0_error"].startswith("OtherRankError: evaluation failed on rank 0: KeyError")


def test_distributed_metrics_equal_single_process(ranks):
    tiny = TinyFeatures()
    single = evaluate_samples(
        ddp_generated_images(), tiny(ddp_reference_images()), feature_extractor=tiny, **DDP_METRIC_OPTIONS
    )
    assert set(single) >= {"fid", "isc_mean", "precision", "recall", "kid_mean"}
    for r in ranks:
        assert r["tiny_metrics"].keys() == single.keys()
        for k, v in single.items():
            assert r["tiny_metrics"][k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    # each rank extracted only its own shard
    assert [r["tiny_images_seen"] for r in ranks] == list(DDP_SHARDS)


def test_distributed_inception_metrics_equal_single_process(ranks, inception, inception_reference):
    single = evaluate_samples(
        inception_ddp_generated_images(), inception_reference[0], feature_extractor=inception, **INCEPTION_DDP_OPTIONS
    )
    for r in ranks:
        for k, v in single.items():
            # shards are extracted in other batch sizes than the single process: float32 conv noise only
            assert r["inception_metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_one_process_launcher_is_the_plain_call():
    """launcher=None and a launched one-process Fabric: no gather (the same tensor object back), no broadcast."""
    from lightning.fabric import Fabric

    x = torch.randn(3, 2)
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    for launcher in (None, fabric):
        assert all_gather_uneven(x, launcher) is x
        assert compute_on_rank_zero_and_broadcast(lambda: {"a": 1}, launcher) == {"a": 1}
