"""Sampling benchmark: classifier-guided ancestral sampling, diffusion-pl SampleEngine vs the reference
(guided_diffusion's p_sample_loop with classifier_sample.py's cond_fn / model_fn), same config and weights.
(`make bench` / benchmarks/run_all.py runs it in fresh processes together with every other benchmark.)

    python benchmarks/bench_sampling.py --steps 250 --batch 8 --rounds 1
    python benchmarks/bench_sampling.py --steps 20 --batch 8 --rounds 2      # quicker; images/s extrapolated to 250
    python benchmarks/bench_sampling.py --profile --steps 5                  # torch.profiler table of ours

Config (CPU-sized ADM): U-Net 64 ch, 32 px, mult (1,2,2,2), 2 res blocks, attention at 16 and 8, 64 head channels,
AdaGN, BigGAN up/down, learned sigma, 1000 classes; classifier 64 ch, depth 2, attention pool; cosine T = 1000
respaced to --steps; classifier scale 1.0; batch --batch. bf16 = torch.autocast(cpu, bfloat16) around both networks
for both implementations (the reference's own fp16 path is CUDA-oriented). Ours and the reference alternate within
every round; the median time per round is reported, and images/s for 250 steps = batch / (time per step * 250).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

UNET = dict(image_size=32, model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
            attention_resolutions=(16, 8), num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
            learn_sigma=True, num_classes=1000)  # fmt: skip
CLASSIFIER = dict(image_size=32, model_channels=64, num_res_blocks=2, attention_resolutions=(16, 8),
                  num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True, pool="attention",
                  out_channels=1000)  # fmt: skip


# tiny: for the test of the benchmark runner only
TINY_UNET = dict(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                 num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True,
                 num_classes=10)  # fmt: skip
TINY_CLASSIFIER = dict(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(8,), num_head_channels=32, use_scale_shift_norm=True,
                       resblock_updown=True, pool="attention", out_channels=10)  # fmt: skip


def build(seed: int = 0, unet: dict | None = None, classifier: dict | None = None):
    """(ours, our classifier, reference U-Net, reference classifier, our T=1000 process, create_gaussian_diffusion):
    the same (randomised) weights in both implementations."""
    from guided_diffusion.script_util import create_gaussian_diffusion
    from guided_diffusion.unet import EncoderUNetModel as RefEncoder
    from guided_diffusion.unet import UNetModel as RefUNet

    from diffusion_pl.diffusion import create_diffusion
    from diffusion_pl.models import EncoderUNetModel, UNetModel, export_openai_state_dict

    unet, classifier = dict(unet or UNET), dict(classifier or CLASSIFIER)
    torch.manual_seed(seed)
    ours = UNetModel(**unet).eval()
    clf = EncoderUNetModel(**classifier).eval().requires_grad_(False)
    with torch.no_grad():  # zero-initialised output layers -> random, so the guidance gradient is non-trivial
        for p in list(ours.parameters()) + list(clf.parameters()):
            if p.ndim > 1 and bool((p == 0).all()):
                p.normal_(0, 0.02)
    size = unet["image_size"]
    # create_model's keyword set, built directly (its channel_mult table does not know every size)
    ref = RefUNet(image_size=size, in_channels=3, model_channels=unet["model_channels"], out_channels=6,
                  num_res_blocks=unet["num_res_blocks"],
                  attention_resolutions=tuple(size // r for r in unet["attention_resolutions"]),
                  channel_mult=unet["channel_mult"], num_classes=unet["num_classes"],
                  num_head_channels=unet["num_head_channels"], use_scale_shift_norm=True, resblock_updown=True,
                  ).eval()  # fmt: skip
    ref.load_state_dict(export_openai_state_dict(ours))
    # create_classifier only knows 64..512 px: build the reference EncoderUNetModel as it would (attention at ds).
    csize = classifier["image_size"]
    ref_clf = RefEncoder(image_size=csize, in_channels=3, model_channels=classifier["model_channels"],
                         out_channels=classifier["out_channels"], num_res_blocks=classifier["num_res_blocks"],
                         attention_resolutions=tuple(csize // r for r in classifier["attention_resolutions"]),
                         channel_mult=classifier.get("channel_mult", (1, 2, 2, 2)),
                         num_head_channels=classifier["num_head_channels"], use_scale_shift_norm=True,
                         resblock_updown=True, pool="attention").eval()  # fmt: skip
    ref_clf.load_state_dict(export_openai_state_dict(clf))
    ref_clf.requires_grad_(False)
    return ours, clf, ref, ref_clf, create_diffusion(diffusion_steps=1000), create_gaussian_diffusion


def run_ours(ours, clf, diffusion, steps, batch, dtype):
    from diffusion_pl.sampling import SampleEngine

    size = ours.image_size
    precision = {"fp32": "32-true", "bf16": "bf16-mixed"}[dtype]  # --dtypes as SampleEngine (Lightning) spells them
    engine = SampleEngine(ours, diffusion, (3, size, size), respacing=str(steps), class_cond=True,
                          num_classes=ours.num_classes, classifier=clf, classifier_scale=1.0, precision=precision,
                          progress=False)  # fmt: skip
    start = time.perf_counter()
    out = engine.sample(range(batch)).images
    return time.perf_counter() - start, out


def run_ref(ref, ref_clf, create_gaussian_diffusion, steps, batch, dtype):
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="cosine",
                                          timestep_respacing=str(steps))  # fmt: skip
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def cond_fn(x, t, y=None):  # classifier_sample.py
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            with autocast:
                logits = ref_clf(x_in, t)
            log_probs = F.log_softmax(logits.float(), dim=-1)
            selected = log_probs[range(len(logits)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * 1.0

    def model_fn(x, t, y=None):
        with autocast:
            return ref(x, t, y).float()

    classes = torch.randint(0, ref.num_classes, (batch,))
    size = ref.image_size
    start = time.perf_counter()
    out = diffusion.p_sample_loop(model_fn, (batch, 3, size, size), clip_denoised=True, model_kwargs={"y": classes},
                                  cond_fn=cond_fn, device="cpu", progress=False)  # fmt: skip
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    ours, clf, ref, ref_clf, diffusion, create_gd = build()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_ours(ours, clf, diffusion, args.steps, args.batch, "fp32")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return
    results = []
    for dtype in args.dtypes.split(","):
        times = {"ours": [], "reference": []}
        run_ours(ours, clf, diffusion, 2, args.batch, dtype)  # warm-up (allocator, oneDNN primitives)
        run_ref(ref, ref_clf, create_gd, 2, args.batch, dtype)
        for _ in range(args.rounds):
            times["ours"].append(run_ours(ours, clf, diffusion, args.steps, args.batch, dtype)[0])
            times["reference"].append(run_ref(ref, ref_clf, create_gd, args.steps, args.batch, dtype)[0])
        row = {"dtype": dtype, "steps": args.steps, "batch": args.batch}
        for impl, ts in times.items():
            per_step = statistics.median(ts) / args.steps
            row[f"{impl}_s_per_step"] = round(per_step, 4)
            row[f"{impl}_images_per_s_250"] = round(args.batch / (per_step * 250), 4)
        row["speedup"] = round(row["reference_s_per_step"] / row["ours_s_per_step"], 3)
        results.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__}))  # fmt: skip


if __name__ == "__main__":
    main()
