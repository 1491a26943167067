"""Run EVERY benchmark of diffusion-pl against the reference (guided_diffusion) and rewrite BENCHMARKS.md.

    make bench                                            # = .venv/bin/python benchmarks/run_all.py
    .venv/bin/python benchmarks/run_all.py --quick        # smoke run (minutes): fewer rounds/steps, no ADM-64
    .venv/bin/python benchmarks/run_all.py --threads 1 --output /tmp/B.md

What runs (ours and the reference interleaved within every round, alternating which goes first):
  * U-Net training step (forward + MSE + backward + AdamW) and inference forward, fp32 and bf16 autocast,
    channels_last off/on: images/s, peak RSS, and saved activation memory (bytes of the distinct tensors autograd
    keeps for backward, counted with torch.autograd.graph.saved_tensors_hooks; parameters excluded). CPU-sized ADM
    config (batch 16) and the ADM ImageNet-64 paper config (batch 2).
  * Classifier-guided ancestral sampling (SampleEngine vs p_sample_loop + classifier_sample.py's cond_fn), fp32 and
    bf16 autocast.
  * Evaluation throughput: Inception-v3 feature extraction (diffusion_pl.evaluation.InceptionFeatures with a
    locally made RANDOM-weight Inception), fp32 and bf16 autocast.
Every measurement runs in a fresh subprocess (its peak RSS is its own) unless --in-process (used by the test).

The generated file contains the numbers, the exact command, the machine (lscpu model, cores, RAM, torch version,
threads, load average before/after) and the status of each target; benchmarks/NOTES.md (hand-written analysis)
is appended verbatim.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

MODES = ("train", "infer")
DTYPES = ("fp32", "bf16")
CHANNELS_LAST = (False, True)
UNET_TITLES = {
    "cpu": "CPU-sized ADM config (64 ch, 32x32, mult (1,2,2,2), 2 res blocks, attention at 16 and 8, 64 head "
    "channels, AdaGN, BigGAN up/down, learn sigma), batch 16",
    "adm64": "ADM ImageNet-64 paper config (295.9M parameters), batch 2",
    "tiny": "tiny config (runner test only), batch 2",
}


# ------------------------------------------------------------------------------------------------------- workers
def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _quiet():
    warnings.filterwarnings("ignore")


def saved_activation_mib(forward, params) -> float:
    """MiB of the distinct storages autograd saves for backward during ``forward()`` (parameters excluded)."""
    import torch

    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip:
            seen.setdefault(ptr, st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values()) / 2**20


def unet_worker(impl: str, config: str, mode: str, dtype: str, channels_last: bool, iters: int, warmup: int) -> dict:
    """One U-Net measurement: images/s (median step), per-step times, peak RSS above the post-import baseline,
    saved activation MiB (train)."""
    import bench_unet
    import torch

    base = _current_rss_mib()
    torch.manual_seed(0)
    model, num_classes = bench_unet.build(impl, config)
    batch = bench_unet.CONFIGS[config]["batch"]
    step, forward = bench_unet.make_step(model, mode, dtype, channels_last, batch, num_classes,
                                         torch.Generator().manual_seed(1))  # fmt: skip
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    res = dict(
        images_per_s=batch / statistics.median(times), step_s=times, peak_rss_mib=max(0.0, _peak_rss_mib() - base)
    )
    if mode == "train":
        res["saved_mib"] = saved_activation_mib(forward, list(model.parameters()))
    return res


def sampling_worker(impl: str, dtype: str, steps: int, batch: int, tiny: bool) -> dict:
    """One guided-sampling run of ``steps`` respaced steps (plus a 2-step warm-up): seconds per step."""
    import bench_sampling as bs
    import torch

    base = _current_rss_mib()
    nets = dict(unet=bs.TINY_UNET, classifier=bs.TINY_CLASSIFIER) if tiny else {}
    ours, clf, ref, ref_clf, diffusion, create_gd = bs.build(**nets)
    torch.manual_seed(0)
    if impl == "ours":
        del ref, ref_clf
        bs.run_ours(ours, clf, diffusion, 2, batch, dtype)
        seconds = bs.run_ours(ours, clf, diffusion, steps, batch, dtype)[0]
    else:
        del ours, clf
        bs.run_ref(ref, ref_clf, create_gd, 2, batch, dtype)
        seconds = bs.run_ref(ref, ref_clf, create_gd, steps, batch, dtype)[0]
    return dict(s_per_step=seconds / steps, peak_rss_mib=max(0.0, _peak_rss_mib() - base))


def eval_worker(dtype: str, batch: int, images: int, weights: str) -> dict:
    """Inception feature extraction throughput (random-weight Inception, 32x32 uint8 inputs resized to 299)."""
    import torch

    from diffusion_pl.evaluation import InceptionFeatures

    base = _current_rss_mib()
    features = InceptionFeatures(weights, device="cpu", batch_size=batch, progress=False)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    with amp:
        features(data[:batch])  # warm-up
        t0 = time.perf_counter()
        out = features(data)
        seconds = time.perf_counter() - t0
    assert out["pool"].shape == (images, 2048)
    return dict(images_per_s=images / seconds, peak_rss_mib=max(0.0, _peak_rss_mib() - base))


WORKERS = {"unet": unet_worker, "sampling": sampling_worker, "eval": eval_worker}


FAILURES: list[str] = []
_NAN_RESULT = {
    "unet": dict(images_per_s=float("nan"), step_s=[], peak_rss_mib=float("nan"), saved_mib=float("nan")),
    "sampling": dict(s_per_step=float("nan"), peak_rss_mib=float("nan")),
    "eval": dict(images_per_s=float("nan"), peak_rss_mib=float("nan")),
}


def run_measurement(kind: str, kwargs: dict, threads: int, in_process: bool) -> dict:
    """One measurement; a failing one is retried once, then recorded as NaN (listed under "Failures") so that a
    long run still writes its report."""
    for attempt in (1, 2):
        try:
            return _run_measurement(kind, kwargs, threads, in_process)
        except Exception as e:  # any failure of a worker is reported, not fatal
            _log(f"{kind} {kwargs} failed (attempt {attempt}): {str(e)[-2000:]}")
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            error = f"{kind} {json.dumps(kwargs)}: {last}"
    FAILURES.append(error)
    return dict(_NAN_RESULT[kind], error=error)


def _run_measurement(kind: str, kwargs: dict, threads: int, in_process: bool) -> dict:
    if in_process:
        import torch

        torch.set_num_threads(threads)
        return WORKERS[kind](**kwargs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    spec = json.dumps(dict(kind=kind, threads=threads, **kwargs))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({kind} {kwargs}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker_main(spec: str) -> None:
    _quiet()
    import torch

    args = json.loads(spec)
    kind, threads = args.pop("kind"), args.pop("threads")
    torch.set_num_threads(threads)
    print(json.dumps(WORKERS[kind](**args)), flush=True)


# ------------------------------------------------------------------------------------------------------- machine
def machine_info(threads: int) -> dict:
    import torch

    info = {"cpu model": platform.processor() or platform.machine()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["cpu model"] = value.strip()
            elif key.strip() == "CPU(s)":
                info["logical CPUs (lscpu)"] = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
                wanted = ("avx512_bf16", "amx_bf16", "amx_tile")
                info["bf16 / AMX flags"] = ", ".join(f for f in wanted if f in flags) or "none"
    except (OSError, subprocess.CalledProcessError):
        pass
    info["CPUs usable (affinity)"] = str(len(os.sched_getaffinity(0)))
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        info["RAM"] = f"{kib / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        info["RAM"] = "unknown"
    info["torch"] = torch.__version__
    info["python"] = platform.python_version()
    info["threads per measurement"] = str(threads)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        info["git commit"] = commit.stdout.strip() or "unknown"
    except OSError:
        info["git commit"] = "unknown"
    return info


def _loadavg() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


# ------------------------------------------------------------------------------------------------------- plans
def plan(args) -> dict:
    """What to run (sizes, rounds) for the selected mode."""
    if args.tiny:
        return dict(unet=[("tiny", 1, 1, 0)], sampling=dict(steps=2, batch=2, rounds=1, tiny=True),
                    eval=dict(batch=2, images=2))  # fmt: skip
    if args.quick:
        return dict(unet=[("cpu", 1, 2, 1)], sampling=dict(steps=3, batch=4, rounds=1, tiny=False),
                    eval=dict(batch=4, images=8))  # fmt: skip
    unet = [] if args.skip_cpu else [("cpu", args.rounds, 5, 2)]
    if not args.skip_adm64:
        unet.append(("adm64", 1, args.adm64_iters, 1))
    return dict(unet=unet, sampling=dict(steps=args.sampling_steps, batch=8, rounds=args.sampling_rounds, tiny=False),
                eval=dict(batch=16, images=64))  # fmt: skip


def _log(msg: str) -> None:
    print(f"[{_dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def run_all(args) -> dict:
    threads = args.threads or len(os.sched_getaffinity(0))
    p = plan(args)
    results = dict(load_before=_loadavg(), started=_dt.datetime.now().isoformat(timespec="seconds"))
    results["machine"] = machine_info(threads)
    results["plan"] = p

    # U-Net
    results["unet"] = {}
    for config, rounds, iters, warmup in p["unet"]:
        cells: dict = {}
        for r in range(rounds):
            for mode in MODES:
                for dtype in DTYPES:
                    for cl in CHANNELS_LAST:
                        if args.cells and f"{mode}:{dtype}:{'on' if cl else 'off'}" not in args.cells.split(","):
                            continue
                        for impl in ("ref", "ours") if r % 2 == 0 else ("ours", "ref"):
                            kw = dict(impl=impl, config=config, mode=mode, dtype=dtype, channels_last=cl, iters=iters,
                                      warmup=warmup)  # fmt: skip
                            res = run_measurement("unet", kw, threads, args.in_process)
                            cells.setdefault(f"{mode}|{dtype}|{int(cl)}|{impl}", []).append(res)
                            _log(f"unet {config} round {r} {mode} {dtype} cl={int(cl)} {impl}: "
                                 f"{res['images_per_s']:.3f} img/s")  # fmt: skip
        results["unet"][config] = dict(rounds=rounds, iters=iters, warmup=warmup, cells=cells)

    # Sampling
    s = p["sampling"]
    samp: dict = {}
    for r in range(0 if args.skip_sampling else s["rounds"]):
        for dtype in DTYPES:
            for impl in ("ref", "ours") if r % 2 == 0 else ("ours", "ref"):
                kw = dict(impl=impl, dtype=dtype, steps=s["steps"], batch=s["batch"], tiny=s["tiny"])
                res = run_measurement("sampling", kw, threads, args.in_process)
                samp.setdefault(f"{dtype}|{impl}", []).append(res)
                _log(f"sampling round {r} {dtype} {impl}: {res['s_per_step']:.4f} s/step")
    results["sampling"] = dict(s, cells=samp) if samp else None

    # Evaluation (random-weight Inception made locally)
    e = p["eval"]
    results["eval"] = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip_eval:
            results["load_after"] = _loadavg()
            results["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
            results["failures"] = list(FAILURES)
            return results
        weights = args.inception_weights
        if weights is None:
            from diffusion_pl.evaluation.testing import save_random_inception_weights_for_tests

            weights = save_random_inception_weights_for_tests(os.path.join(tmp, "random_inception.pt"))
        ev = {}
        for dtype in DTYPES:
            kw = dict(dtype=dtype, batch=e["batch"], images=e["images"], weights=weights)
            ev[dtype] = run_measurement("eval", kw, threads, args.in_process)
            _log(f"eval {dtype}: {ev[dtype]['images_per_s']:.3f} img/s")
    results["eval"] = dict(e, cells=ev)
    results["load_after"] = _loadavg()
    results["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    results["failures"] = list(FAILURES)
    return results


# ------------------------------------------------------------------------------------------------------- report
def _med(rows, key):
    return statistics.median(r[key] for r in rows)


def _spread(rows, key, fmt="{:.2f}"):
    vals = [r[key] for r in rows]
    return fmt.format(min(vals)) + "-" + fmt.format(max(vals)) if len(vals) > 1 else fmt.format(vals[0])


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _status(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def render(results: dict, command: str, notes: str | None, label: str | None = None) -> str:
    m = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        *([f"**{label}**", ""] if label else []),
        "Generated by `benchmarks/run_all.py` (do not edit the numbers by hand; the hand-written analysis is "
        "`benchmarks/NOTES.md`, appended at the end). diffusion-pl vs the reference implementation "
        "`guided_diffusion` (guided-diffusion-sdk 1.0.0, a community fork of openai/guided-diffusion whose U-Net "
        "and diffusion maths are openai's: see tests/oracle-requirements.txt) on the same machine, same "
        "configurations and weights; "
        "ours and the reference interleaved within every round.",
        "",
        "## Command",
        "",
        *[f"    {c.strip()}" for c in command.split(" ; ")],
        "",
        f"Started {results['started']}, finished {results['finished']}.",
        "",
        "## Machine",
        "",
        "| item | value |",
        "|---|---|",
    ]
    for k, v in m.items():
        lines.append(f"| {k} | {v} |")
    lines += [f"| load average before (1/5/15 min) | {results['load_before']} |",
              f"| load average after (1/5/15 min) | {results['load_after']} |", ""]  # fmt: skip

    targets: list[tuple[str, str, bool]] = []
    for config, data in results["unet"].items():
        cells = data["cells"]
        lines += [
            f"## U-Net: {UNET_TITLES.get(config, config)}",
            "",
            f"{data['rounds']} round(s); per measurement a fresh process, {data['warmup']} warm-up + {data['iters']} "
            "timed steps (median step); img/s = median over rounds, spread = min-max over rounds. Peak RSS = "
            "ru_maxrss minus the RSS after imports (weights, gradients, AdamW state, activations, allocator and "
            "oneDNN buffers). Saved act. = MiB of the distinct tensors autograd keeps for backward "
            "(parameters excluded; training only).",
            "",
            "| mode | dtype | channels_last | ref img/s | ours img/s | speed-up | ref spread | ours spread | "
            "ref peak RSS MiB | ours peak RSS MiB | RSS ratio | ref saved act. MiB | ours saved act. MiB | "
            "act. ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for mode in MODES:
            for dtype in DTYPES:
                for cl in CHANNELS_LAST:
                    if f"{mode}|{dtype}|{int(cl)}|ref" not in cells:
                        continue  # not measured (--cells)
                    ref, ours = cells[f"{mode}|{dtype}|{int(cl)}|ref"], cells[f"{mode}|{dtype}|{int(cl)}|ours"]
                    ri, oi = _med(ref, "images_per_s"), _med(ours, "images_per_s")
                    rm, om = _med(ref, "peak_rss_mib"), _med(ours, "peak_rss_mib")
                    if mode == "train":
                        ra, oa = _med(ref, "saved_mib"), _med(ours, "saved_mib")
                        act = f"{ra:.2f} | {oa:.2f} | {oa / ra:.2f}"
                    else:
                        act = "- | - | -"
                    lines.append(
                        f"| {mode} | {dtype} | {'on' if cl else 'off'} | {ri:.3f} | {oi:.3f} | {oi / ri:.2f}x | "
                        f"{_spread(ref, 'images_per_s', '{:.3f}')} | {_spread(ours, 'images_per_s', '{:.3f}')} | "
                        f"{rm:.0f} | {om:.0f} | {_ratio(om, rm):.2f} | {act} |"
                    )
        lines.append("")
        for cl in CHANNELS_LAST:
            c = "on" if cl else "off"
            if not all(f"train|{d}|{int(cl)}|ref" in cells for d in DTYPES):
                continue  # the training cells of this layout were not measured (--cells)
            r32 = _med(cells[f"train|fp32|{int(cl)}|ref"], "images_per_s")
            o32 = _med(cells[f"train|fp32|{int(cl)}|ours"], "images_per_s")
            targets.append((f"{config}, channels_last {c}: training fp32 throughput >= 1.2x reference",
                            f"{o32:.3f} vs {r32:.3f} img/s = {o32 / r32:.2f}x", o32 / r32 >= 1.2))  # fmt: skip
            for dtype in DTYPES:
                rr, oo = cells[f"train|{dtype}|{int(cl)}|ref"], cells[f"train|{dtype}|{int(cl)}|ours"]
                ra, oa = _med(rr, "saved_mib"), _med(oo, "saved_mib")
                rm, om = _med(rr, "peak_rss_mib"), _med(oo, "peak_rss_mib")
                targets.append((f"{config}, channels_last {c}, {dtype}: training activation memory <= 0.8x",
                                f"{oa:.2f} vs {ra:.2f} MiB = {oa / ra:.2f}", oa / ra <= 0.8))  # fmt: skip
                targets.append((f"{config}, channels_last {c}, {dtype}: training peak RSS <= 0.8x",
                                f"{om:.0f} vs {rm:.0f} MiB = {_ratio(om, rm):.2f}", _ratio(om, rm) <= 0.8))  # fmt: skip
            b16 = _med(cells[f"train|bf16|{int(cl)}|ours"], "images_per_s")
            rb16 = _med(cells[f"train|bf16|{int(cl)}|ref"], "images_per_s")
            targets.append((f"{config}, channels_last {c}: ours bf16 training >= 2x reference fp32",
                            f"{b16:.3f} vs {r32:.3f} img/s = {b16 / r32:.2f}x", b16 / r32 >= 2))  # fmt: skip
            targets.append((f"{config}, channels_last {c}: ours bf16 training >= 2x reference bf16 (both autocast)",
                            f"{b16:.3f} vs {rb16:.3f} img/s = {b16 / rb16:.2f}x", b16 / rb16 >= 2))  # fmt: skip

    s = results["sampling"] or dict(cells={}, steps=0, batch=0, rounds=0)
    cells = s["cells"]
    lines += [
        "## Sampling: classifier-guided ancestral sampling",
        "",
        f"{s['steps']} respaced steps (cosine T = 1000) after a 2-step warm-up, batch {s['batch']}, classifier scale "
        f"1.0, {s['rounds']} round(s), fresh process each; images/s for 250 steps = batch / (s per step x 250). "
        "Ours: `SampleEngine(precision=...)`; reference: `p_sample_loop` with classifier_sample.py's "
        "`cond_fn`/`model_fn`; bf16 = `torch.autocast(cpu, bfloat16)` around both networks in both (the "
        "reference's own fp16 path is CUDA-only, so fp32 is how users run it on a CPU).",
        "",
        "| comparison | ours s/step | ref s/step | ours img/s (250 steps) | ref img/s (250 steps) | speed-up | "
        "ours spread s/step | ref spread s/step | ours peak RSS MiB | ref peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [("fp32 vs fp32", "fp32", "fp32"), ("bf16 vs bf16 (both autocast)", "bf16", "bf16"),
            ("ours bf16 vs reference fp32 (as users run it)", "bf16", "fp32")]  # fmt: skip
    for name, od, rd in rows if cells else []:
        o, r = cells[f"{od}|ours"], cells[f"{rd}|ref"]
        os_, rs = _med(o, "s_per_step"), _med(r, "s_per_step")
        oi, ri = s["batch"] / (os_ * 250), s["batch"] / (rs * 250)
        lines.append(
            f"| {name} | {os_:.4f} | {rs:.4f} | {oi:.4f} | {ri:.4f} | {rs / os_:.2f}x | "
            f"{_spread(o, 's_per_step', '{:.4f}')} | {_spread(r, 's_per_step', '{:.4f}')} | "
            f"{_med(o, 'peak_rss_mib'):.0f} | {_med(r, 'peak_rss_mib'):.0f} |"
        )
        targets.append((f"sampling {name}: >= 2x reference", f"{rs / os_:.2f}x", rs / os_ >= 2))
    lines.append("")

    e = results["eval"] or dict(cells={}, images=0, batch=0)
    lines += [
        "## Evaluation: Inception feature extraction",
        "",
        f"`diffusion_pl.evaluation.InceptionFeatures` (torch-fidelity inception-v3-compat, resize to 299) with a "
        f"locally made RANDOM-weight Inception (`diffusion_pl.evaluation.testing`): same cost as the real weights. "
        f"{e['images']} uint8 32x32 images, batch {e['batch']}, after a one-batch warm-up; fresh process each. bf16 = "
        "autocast around the extractor (benchmark only: the evaluation path runs fp32 to match the TF graph).",
        "",
        "| dtype | images/s | peak RSS MiB |",
        "|---|---|---|",
    ]
    for dtype in DTYPES if e["cells"] else []:
        c = e["cells"][dtype]
        lines.append(f"| {dtype} | {c['images_per_s']:.3f} | {c['peak_rss_mib']:.0f} |")
    if results.get("failures"):
        lines += ["", "## Failures", "", "Measurements that failed twice (their cells show nan):", ""]
        lines += [f"- `{f}`" for f in results["failures"]]
    lines += ["", "## Targets", "", "Computed from the tables above by the runner.", "",
              "| target | measured | status |", "|---|---|---|"]  # fmt: skip
    for name, measured, ok in targets:
        lines.append(f"| {name} | {measured} | {_status(ok)} |")
    lines.append("")
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines)


def write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".bench.", suffix=".md")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"), help="Markdown file to (re)write")
    p.add_argument("--notes", default=os.path.join(HERE, "NOTES.md"), help="hand-written analysis to append")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per measurement (default: all usable)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 3 sampling steps, no ADM-64")
    p.add_argument("--tiny", action="store_true", help="tiny networks (seconds; for the runner's test)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the CPU-config U-Net matrix")
    p.add_argument("--sampling-steps", type=int, default=250)
    p.add_argument("--sampling-rounds", type=int, default=2)
    p.add_argument("--skip-adm64", action="store_true", help="leave out the ADM-64 paper config (~25 min)")
    p.add_argument("--skip-cpu", action="store_true", help="leave out the CPU-sized U-Net config")
    p.add_argument("--skip-sampling", action="store_true", help="leave out the sampling benchmark")
    p.add_argument("--skip-eval", action="store_true", help="leave out the Inception evaluation benchmark")
    p.add_argument("--adm64-iters", type=int, default=2, help="timed steps per ADM-64 measurement")
    p.add_argument("--cells", default="", help="only these U-Net cells, e.g. train:fp32:off,infer:bf16:on")
    p.add_argument("--inception-weights", default=None, help="Inception weights file (default: random, made locally)")
    p.add_argument("--in-process", action="store_true", help="no subprocess per measurement (RSS not isolated)")
    p.add_argument("--json", default=None, help="also write the raw results as JSON here")
    p.add_argument("--from-json", nargs="+", default=None,
                   help="render saved --json results (U-Net configs merged; the first file's other sections) "
                        "instead of measuring; --command then names the command that measured them")
    p.add_argument("--command", default=None, help="the command to state in the report (default: this one)")
    p.add_argument("--label", default=None, help="a line printed under the title (e.g. how the run was pinned)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        _worker_main(args.worker)
        return ""
    _quiet()
    python = shlex.quote(os.path.relpath(sys.executable, ROOT))
    command = args.command or os.environ.get("BENCH_COMMAND") or " ".join(
        [python, "benchmarks/run_all.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
    )
    if args.from_json:
        results = None
        for path in args.from_json:
            with open(path) as f:
                loaded = json.load(f)
            if results is None:
                results = loaded
            else:
                results["unet"].update(loaded["unet"])
                results["load_after"], results["finished"] = loaded["load_after"], loaded["finished"]
    else:
        results = run_all(args)
    notes = None
    if args.notes and os.path.isfile(args.notes):
        with open(args.notes) as f:
            notes = f.read()
    text = render(results, command, notes, args.label)
    if os.path.isfile(args.output):  # keep the section bench_solvers.py wrote (it has its own command)
        from solvers_report import keep_section

        with open(args.output) as f:
            text = keep_section(f.read(), text)
    write_atomic(args.output, text)
    if args.json:
        write_atomic(args.json, json.dumps(results, indent=1))
    _log(f"wrote {args.output}")
    return text


if __name__ == "__main__":
    main()
