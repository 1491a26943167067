"""`diffusion-pl sample`: N samples of a diffusion-pl or released OpenAI checkpoint, optionally guided, to an ADM npz.

    diffusion-pl sample --ckpt last.ckpt --num_samples 1000 --steps 250 --out_dir samples/run1
    diffusion-pl sample --openai_ckpt 64x64_diffusion.pt --arch adm_imagenet64 \\
        --classifier_openai_ckpt 64x64_classifier.pt --classifier_arch adm_imagenet64_classifier \\
        --classifier_scale 1.0 --steps 250 --num_samples 50000 --devices 8 --out_dir samples/adm64
"""

from __future__ import annotations

from diffusion_pl.commands.common import check_labels, check_out_dir
from diffusion_pl.commands.generate import SampleSource, SamplingResult, check_no_samples
from diffusion_pl.commands.launcher import check_launch, start
from diffusion_pl.commands.options import ClassifierSource, Guidance, Launch, ModelSource, SamplingOptions
from diffusion_pl.errors import UserInputError
from diffusion_pl.sampling import plan_shards
from diffusion_pl.utils.folder_lock import holds_output_folder


def print_summary(result: SamplingResult, image_shape: tuple[int, ...], title: str = "diffusion-pl sample") -> None:
    c, h, w = image_shape
    print(
        f"\n{title}: {result.num_samples} images ({h}x{w}x{c}); generated {result.generated} on rank 0 in "
        f"{result.seconds:.1f} s, {result.images_per_second:.2f} images/s over all ranks"
    )
    for name, path in result.paths.items():
        print(f"  {name:<9}{path}")


@holds_output_folder("out_dir")  # one writer per --out_dir (diffusion_pl/utils/folder_lock.py)
def sample(
    model: ModelSource,
    classifier: ClassifierSource = ClassifierSource(),
    guidance: Guidance = Guidance(),
    sampling: SamplingOptions = SamplingOptions(),
    launch: Launch = Launch(),
    out_dir: str = "samples",
    num_samples: int = 64,
    shard_size: int | None = None,
    labels: list[int] | None = None,
    overwrite: bool = False,
) -> SamplingResult:
    """Generate samples to OUT_DIR/samples.npz (ADM format: arr_0 uint8 NHWC, arr_1 labels), grid.png, settings.json.

    grid.png: when the samples have labels (class-conditional or classifier-guided), one row per class, classes in
    increasing order (at most 32 rows), each row that class's first samples in sample-index order (at most 16), e.g.
    --label_mode balanced --num_samples 80 on a 10-class model gives 10 rows of 8; unlabelled samples: the first 64
    in a square.

    Sample i depends only on (seed, i) and the settings, not on the batch size, devices or num_nodes. An interrupted
    run resumes: rerun the same command and finished shards (OUT_DIR/shards) are skipped.

    Args:
        out_dir: output directory
        num_samples: number of samples
        shard_size: samples per shard file (unit of resumption and of work per rank); default: the shard size of the
            run being resumed (so a resume may change --sample_batch_size), else 4 * sample_batch_size
        labels: class labels: one value for every sample, or one per sample (default: drawn per label_mode)
        overwrite: start over: remove samples.npz, grid.png and settings.json of the previous run before sampling and
            discard existing shards (an interrupted overwrite then resumes without --overwrite)
    """
    # Every input is checked before anything is written or generated.
    check_out_dir(out_dir)
    check_launch(launch)
    check_no_samples(out_dir, overwrite)
    source = SampleSource.load(model, classifier, sampling)
    check_labels(labels, num_samples, source.engine_options(guidance))
    if sampling.sample_batch_size < 1:
        raise UserInputError(f"--sample_batch_size must be >= 1, got {sampling.sample_batch_size}")
    plan_shards(num_samples, shard_size or 4 * sampling.sample_batch_size)  # checks --num_samples and --shard_size
    fabric = start(launch)
    result = source.generate(fabric, guidance, out_dir, num_samples=num_samples, shard_size=shard_size, labels=labels,
                             overwrite=overwrite)  # fmt: skip
    if fabric.global_rank == 0:
        print_summary(result, source.loaded.image_shape)
    return result
