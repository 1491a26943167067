"""U-Net benchmark: diffusion_pl.models.UNetModel vs the reference guided_diffusion UNetModel, same configuration.

(`make bench` / benchmarks/run_all.py runs this together with every other benchmark and rewrites BENCHMARKS.md;
this script stays for single experiments and the --profile table.)

Each measurement runs in a FRESH subprocess (so ``resource.getrusage(...).ru_maxrss`` is that measurement's peak);
ours and the reference are interleaved within every round and the median over rounds is reported, because other
processes share the CPU.

    # full matrix for the CPU-sized config, 3 rounds; ADM-64 paper config (batch 2) fp32/bf16, 1 round
    python benchmarks/bench_unet.py --config cpu --rounds 3
    python benchmarks/bench_unet.py --config adm64 --rounds 1 --channels-last off --iters 2 --warmup 1
    # one measurement (what the driver spawns), prints a JSON line
    python benchmarks/bench_unet.py --single --impl ours --config cpu --mode train --dtype bf16 --channels-last on
    # torch.profiler table of one training step
    python benchmarks/bench_unet.py --profile --impl ours --config cpu --dtype fp32
    # our fused CPU path vs our plain path (fused_norm=True / False), ONE process, steps interleaved
    python benchmarks/bench_unet.py --paths --config cpu --rounds 5 --threads 1

Training step = forward + MSE loss + backward + AdamW step (set_to_none zero_grad). Inference = forward under
``torch.inference_mode``. "peak MiB" = peak RSS minus the RSS after importing torch and both model packages
(weights + grads + optimizer state + activations + allocator slack).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    # CPU-sized ADM: 64 ch, 32x32, mult (1,2,2,2), 2 res blocks, attention at 16 and 8, 64 head channels,
    # AdaGN, BigGAN up/down, learn sigma; batch 16
    "cpu": dict(
        batch=16,
        kw=dict(image_size=32, model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                attention_resolutions=(16, 8), num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
                learn_sigma=True),
    ),  # fmt: skip
    # ADM ImageNet-64 paper configuration (295.9M parameters), batch 2
    "adm64": dict(batch=2, preset="adm_imagenet64"),
    # tiny: for the test of the benchmark runner only (seconds, not a meaningful measurement)
    "tiny": dict(
        batch=2,
        kw=dict(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True),
    ),  # fmt: skip
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(impl: str, config: str):
    """(model, num_classes) for ``impl`` in {"ours", "ref"} with the settings of ``config``."""
    from diffusion_pl.models import UNetModel, released_config

    spec = CONFIGS[config]
    kw = dict(released_config(spec["preset"])[1]) if "preset" in spec else dict(spec["kw"])
    if impl == "ours":
        return UNetModel(**kw), kw.get("num_classes")
    from guided_diffusion.unet import UNetModel as RefUNet

    size, learn_sigma = kw["image_size"], kw.pop("learn_sigma")
    ref = RefUNet(
        image_size=size,
        in_channels=3,
        model_channels=kw["model_channels"],
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=kw["num_res_blocks"],
        attention_resolutions=tuple(size // r for r in kw["attention_resolutions"]),
        dropout=kw.get("dropout", 0.0),
        channel_mult=kw["channel_mult"],
        num_classes=kw.get("num_classes"),
        num_heads=kw.get("num_heads", 1),
        num_head_channels=kw.get("num_head_channels", -1),
        use_scale_shift_norm=kw["use_scale_shift_norm"],
        resblock_updown=kw["resblock_updown"],
        use_new_attention_order=kw.get("use_new_attention_order", False),
    )
    return ref, kw.get("num_classes")


def make_step(model, mode, dtype, channels_last, batch, num_classes, generator=None):
    """(step, forward): one training step (forward + MSE to a random 6-channel target + backward + AdamW) or one
    inference forward of ``model`` on a fixed random batch; ``forward`` is the bare forward under the same autocast.
    The model is moved to the requested memory format."""
    import torch

    size = model.image_size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    x = torch.randn(batch, 3, size, size, generator=generator).to(memory_format=fmt)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    y = torch.randint(0, num_classes, (batch,), generator=generator) if num_classes else None
    target = torch.randn(batch, 6, size, size, generator=generator)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def forward():
        with amp:
            return model(x, t, y)

    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = (forward().float() - target).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.inference_mode():
                forward()

    return step, forward


def measure(impl, config, mode, dtype, channels_last, iters, warmup, profile=False):
    import guided_diffusion.unet  # noqa: F401 - imported by both so the baseline is identical
    import torch

    import diffusion_pl.models  # noqa: F401

    base = _current_rss_mib()
    torch.manual_seed(0)
    model, num_classes = build(impl, config)
    batch = CONFIGS[config]["batch"]
    step, _ = make_step(model, mode, dtype, channels_last, batch, num_classes)
    for _ in range(warmup):
        step()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        steps = 3
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(steps):
                step()
        events = p.key_averages()
        print(events.table(sort_by="self_cpu_time_total", row_limit=22))
        print(profile_groups(events, steps))
        return None
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    dt = time.perf_counter() - t0
    return dict(images_per_s=batch * iters / dt, peak_mib=_rss_mib() - base)


PROFILE_GROUPS = {
    "convolution backward": ("aten::convolution_backward", "aten::_slow_conv2d_backward"),
    "convolution forward": ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward"),
    "attention (bmm/softmax or SDPA)": ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data",
                                        "aten::_scaled_dot_product_flash_attention_for_cpu",
                                        "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "Linear GEMMs (mm/addmm)": ("aten::mm", "aten::addmm"),
    "AdamW step (lerp_/addcdiv_/sqrt)": ("aten::lerp_", "aten::addcdiv_", "aten::sqrt"),
}  # fmt: skip


def profile_groups(events, steps: int) -> str:
    """Self CPU seconds per step by group; everything else = norms, activations, element-wise, copies, Python."""
    totals = dict.fromkeys(PROFILE_GROUPS, 0.0)
    rest = 0.0
    for e in events:
        group = next((g for g, names in PROFILE_GROUPS.items() if e.key in names), None)
        if group is None:
            rest += e.self_cpu_time_total
        else:
            totals[group] += e.self_cpu_time_total
    lines = [f"{g}: {v / 1e6 / steps:.3f} s/step" for g, v in totals.items()]
    lines.append(f"everything else: {rest / 1e6 / steps:.3f} s/step")
    lines.append(f"total: {(sum(totals.values()) + rest) / 1e6 / steps:.3f} s/step (self CPU, under the profiler)")
    return "\n".join(lines)


def run_single(args) -> dict:
    cmd = [sys.executable, __file__, "--single", "--impl", args["impl"], "--config", args["config"],
           "--mode", args["mode"], "--dtype", args["dtype"], "--channels-last", "on" if args["cl"] else "off",
           "--iters", str(args["iters"]), "--warmup", str(args["warmup"])]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


PATHS = {  # name: (fused_norm, input/weights in channels_last)
    "fused": (True, False),  # runs channels_last internally whatever the input layout
    "plain": (False, False),
    "plain-nhwc": (False, True),
}


def compare_paths(config: str, rounds: int, warmup: int, modes, dtypes) -> None:
    """Median seconds per step of our U-Net with ``fused_norm`` True vs False, same weights and batch, in ONE process:
    each round runs one step of every path in turn (rotating the order), so load from other processes hits all paths
    alike. Reports wall-clock and CPU time (``time.process_time``: time lost to other processes is not counted) and,
    for training, the activation memory autograd keeps (run_all.saved_activation_mib)."""
    import torch
    from run_all import saved_activation_mib

    from diffusion_pl.models import UNetModel

    spec = CONFIGS[config]
    batch = spec["batch"]
    print(f"config={config} batch={batch} rounds={rounds} warmup={warmup} threads={torch.get_num_threads()}")
    print("| mode | dtype | path | wall s/step | CPU s/step | speed vs plain (CPU) | activation MiB |")
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        for dtype in dtypes:
            steps, memory = {}, {}
            for name, (fused, cl) in PATHS.items():
                torch.manual_seed(0)
                model = UNetModel(**spec["kw"], fused_norm=fused)
                gen = torch.Generator().manual_seed(1)
                steps[name], fwd = make_step(model, mode, dtype, cl, batch, spec["kw"].get("num_classes"), gen)
                memory[name] = f"{saved_activation_mib(fwd, model.parameters()):.0f}" if mode == "train" else "-"
            times: dict = {name: [] for name in PATHS}
            names = list(PATHS)
            for r in range(warmup + rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    w0, c0 = time.perf_counter(), time.process_time()
                    steps[name]()
                    if r >= warmup:
                        times[name].append((time.perf_counter() - w0, time.process_time() - c0))
            cpu_plain = statistics.median(c for _, c in times["plain"])
            for name in names:
                wall = statistics.median(w for w, _ in times[name])
                cpu = statistics.median(c for _, c in times[name])
                speedup = cpu_plain / cpu
                row = f"| {mode} | {dtype} | {name} | {wall:.3f} | {cpu:.3f} | {speedup:.2f}x | {memory[name]} |"
                print(row, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(CONFIGS), default="cpu")
    p.add_argument("--impl", choices=["ours", "ref"], default="ours")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--channels-last", choices=["on", "off", "both"], default="both")
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--single", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--paths", action="store_true", help="fused vs plain path of our U-Net, one process")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    iters = a.iters or (5 if a.config == "cpu" else 2)
    warmup = a.warmup if a.warmup is not None else (2 if a.config == "cpu" else 1)
    import warnings

    warnings.filterwarnings("ignore")
    if a.paths:
        compare_paths(a.config, a.rounds, warmup, a.modes.split(","), a.dtypes.split(","))
        return
    if a.single or a.profile:
        res = measure(a.impl, a.config, a.mode, a.dtype, a.channels_last == "on", iters, warmup, profile=a.profile)
        if res is not None:
            print(json.dumps(res))
        return
    cls = {"on": [True], "off": [False], "both": [False, True]}[a.channels_last]
    cells = [(m, d, c) for m in a.modes.split(",") for d in a.dtypes.split(",") for c in cls]
    results: dict = {}
    for r in range(a.rounds):
        for m, d, c in cells:
            for impl in ("ref", "ours") if r % 2 == 0 else ("ours", "ref"):  # interleave, alternate order
                res = run_single(dict(impl=impl, config=a.config, mode=m, dtype=d, cl=c, iters=iters, warmup=warmup))
                results.setdefault((m, d, c, impl), []).append(res)
                print(f"round {r} {m} {d} cl={c} {impl}: {res}", file=sys.stderr, flush=True)
    print(f"\nconfig={a.config} batch={CONFIGS[a.config]['batch']} rounds={a.rounds} iters={iters} warmup={warmup}")
    print("| mode | dtype | channels_last | ref img/s | ours img/s | speed-up | ref peak MiB | ours peak MiB | "
          "mem ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for m, d, c in cells:
        med = {
            impl: (
                statistics.median(x["images_per_s"] for x in results[(m, d, c, impl)]),
                statistics.median(x["peak_mib"] for x in results[(m, d, c, impl)]),
            )
            for impl in ("ref", "ours")
        }
        (rs, rm), (os_, om) = med["ref"], med["ours"]
        print(f"| {m} | {d} | {'on' if c else 'off'} | {rs:.2f} | {os_:.2f} | {os_ / rs:.2f}x | {rm:.0f} | {om:.0f} | "
              f"{om / rm:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
