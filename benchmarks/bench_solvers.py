"""Fast samplers per network evaluations (NFE): distance to the 1000-step DDIM solution, digit accuracy, images/s.

    python benchmarks/bench_solvers.py --model random                    # randomly initialised CPU-sized ADM
    python benchmarks/bench_solvers.py --model mnist --ckpt CKPT         # the quickstart model (diffusion-pl demo)
    python benchmarks/bench_solvers.py --model mnist_accuracy --ckpt CKPT --samples 500   # digit accuracy only
    python benchmarks/bench_solvers.py --model mnist_order --ckpt CKPT --samples 16   # solver order, clamp on / off
    python benchmarks/bench_solvers.py --model speed                     # images/s vs the reference, guided
    python benchmarks/bench_solvers.py --render results/*.json           # write the section into BENCHMARKS.md

Every sample set uses SampleEngine with the same seed, so sample i starts from the same x_T for every method.
* RMS: root-mean-square distance (images in [-1, 1]) of x_0 to the same-noise 1000-step DDIM (eta 0) solution, for the
  deterministic methods at NFE 5, 10, 20, 50 (ddim: respacing "N"; dpmpp_2m: karrasN, logsnrN and uniformN; heun:
  karrasK with 2K - 1 <= NFE). MNIST: with classifier-free guidance w = --cfg; random ADM: class-conditional, unguided.
* Digit accuracy (MNIST): the demo's 3-nearest-neighbour vote of the training digits (diffusion_pl.commands.demo) on
  balanced labels, for every method including ancestral (ddpm) and dpmpp_2m_sde, and for 100-step ancestral sampling;
  --model mnist_accuracy measures it alone on many samples for --runs (a few dozen samples cannot resolve 0.02).
* Speed: classifier-guided sampling (scale 1) of the CPU-sized ADM of benchmarks/bench_sampling.py, ours with
  dpmpp_2m_sde karras20 vs the reference's 250-step ancestral p_sample_loop (time per step measured on --ref-steps
  steps, images/s for 250 steps extrapolated from it), interleaved.
Results: one JSON per run (--json); --render writes the "Fast samplers" section of BENCHMARKS.md between its markers
(benchmarks/run_all.py keeps that section when it rewrites the file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

NFES = (5, 10, 20, 50)


def schedules(nfe: int) -> list[tuple[str, str]]:
    """(method, --steps) pairs with at most ``nfe`` network evaluations."""
    heun_steps = nfe // 2 + 1  # 2K - 2 evaluations: the top crossing is one Euler step
    return [("ddim", str(nfe)), ("dpmpp_2m", f"karras{nfe}"), ("dpmpp_2m", f"logsnr{nfe}"),
            ("dpmpp_2m", f"uniform{nfe}"), ("heun", f"karras{heun_steps}")]  # fmt: skip


def draw(model, diffusion, shape, method, steps, n, batch, **kw) -> torch.Tensor:
    from diffusion_pl.sampling import SampleEngine

    engine = SampleEngine(model, diffusion, shape, respacing=steps, method=method, progress=False, seed=0, **kw)
    return torch.cat([b.images for b in engine.generate(range(n), batch)])


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def rms_row(x: torch.Tensor, reference: torch.Tensor) -> dict:
    """RMS over all samples, the median of the per-sample RMS (a few samples that flip to another digit between two
    solutions dominate the RMS of a few dozen samples; the median shows the typical sample) and the per-sample RMS."""
    per_sample = (x - reference).pow(2).flatten(1).mean(1).sqrt()
    return {"rms": round(rms(x, reference), 5), "rms_median": round(float(per_sample.median()), 5),
            "rms_per_sample": [round(float(v), 6) for v in per_sample]}  # for the report's bootstrap interval


def quality_run(model, diffusion, shape, n, batch, knn=None, **kw) -> dict:
    """RMS to the 1000-step DDIM solution per (method, schedule, NFE); digit accuracy when ``knn`` is given."""
    from diffusion_pl.diffusion import get_sampler

    t0 = time.perf_counter()
    reference = draw(model, diffusion, shape, "ddim", "1000", n, batch, **kw)
    rows = [{"method": "ddim", "steps": "1000", "nfe": 1000, "rms": 0.0,
             "seconds": round(time.perf_counter() - t0, 1)}]  # fmt: skip
    runs = [(m, s) for nfe in NFES for m, s in schedules(nfe)]
    if knn is not None:
        runs += [(m, s) for nfe in NFES for m, s in (("ddpm", str(nfe)), ("dpmpp_2m_sde", f"karras{nfe}"))]
        runs.append(("ddpm", "100"))
    for method, steps in runs:
        t0 = time.perf_counter()
        x = draw(model, diffusion, shape, method, steps, n, batch, **kw)
        spec = get_sampler(method)
        row = {"method": method, "steps": steps, "nfe": nfe_of(diffusion, method, steps), "rms": None,
               **({} if spec.draws_noise(spec.default_eta) else rms_row(x, reference)),
               "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        if knn is not None:
            row["digit_accuracy"] = knn(x)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "rms_per_sample"}), flush=True)
    if knn is not None:
        rows[0]["digit_accuracy"] = knn(reference)
    return {"rows": rows, "samples": n}


def nfe_of(diffusion, method: str, steps: str) -> int:
    """Network evaluations per sample of ``method`` on the step schedule ``steps`` ("50", "karras20", ...)."""
    from diffusion_pl.diffusion.registry import schedule_nfe

    return schedule_nfe(diffusion, method, steps)


def quickstart(args):
    """The quickstart DiffusionModule of --ckpt, its image shape, the SampleEngine options of a balanced-label CFG run
    (sample i has class i mod 10), the demo's kNN digit accuracy of images in that label order, and a description."""
    from diffusion_pl.commands.demo import knn_digit_accuracy, mnist_split
    from diffusion_pl.lightning import DiffusionModule
    from diffusion_pl.utils.images import to_uint8

    module = DiffusionModule.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    hp = module.hparams
    train_x, train_y = mnist_split("train")

    def knn(images: torch.Tensor) -> float:
        labels = (torch.arange(len(images)) % int(hp.num_classes)).numpy()
        pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
        return round(knn_digit_accuracy(pixels, labels, train_x, train_y), 4)

    options = dict(class_cond=True, num_classes=int(hp.num_classes), null_class=module.null_label,
                   cfg_scale=args.cfg, label_mode="balanced", precision=args.precision)  # fmt: skip
    shape = (int(hp.in_channels), int(hp.image_size), int(hp.image_size))
    model = f"quickstart MNIST-5k model {args.ckpt} (global step {_global_step(args.ckpt)})"
    return module, shape, options, knn, model


def mnist(args) -> dict:
    module, shape, options, knn, model = quickstart(args)
    result = quality_run(module, module.diffusion, shape, args.samples, args.batch, knn=knn, **options)
    result.update(model=model, guidance=f"classifier-free w = {args.cfg}", precision=args.precision)
    return result


ACCURACY_RUNS = "ddpm:100,dpmpp_2m:karras20,dpmpp_2m:uniform20,dpmpp_2m_sde:karras20,ddim:20,ddim:100"


def mnist_accuracy(args) -> dict:
    """Digit accuracy only (no 1000-step reference), for many samples: --runs METHOD:STEPS,..."""
    module, shape, options, knn, model = quickstart(args)
    rows = []
    for method, steps in (run.split(":") for run in args.runs.split(",")):
        t0 = time.perf_counter()
        x = draw(module, module.diffusion, shape, method, steps, args.samples, args.batch, **options)
        rows.append({"method": method, "steps": steps, "nfe": nfe_of(module.diffusion, method, steps),
                     "digit_accuracy": knn(x), "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return {"accuracy_rows": rows, "samples": args.samples, "guidance": f"classifier-free w = {args.cfg}",
            "precision": args.precision, "model": model}  # fmt: skip


def ddim_on_levels(denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """DDIM (eta 0) between arbitrary noise levels: x_{i+1} = D_i + (sigma_{i+1} / sigma_i) (x_i - D_i)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        denoised = denoiser(x, sigma)
        x = denoised + float(sigma_next / sigma) * (x - denoised)
    return x


def mnist_order(args) -> dict:
    """Order of DDIM and DPM-Solver++(2M) on the trained model's probability-flow ODE from sigma = 80, with and without
    clamping D to [-1, 1]: RMS of x_0 to a 400-level DPM-Solver++(2M) solution, logSNR-uniform levels."""
    from diffusion_pl.diffusion import DiscreteTimeDenoiser, classifier_free_model, dpm_solver_pp_2m
    from diffusion_pl.diffusion.step_schedules import SIGMA_MAX, logsnr_sigmas, trained_sigmas

    module, shape, options, _, description = quickstart(args)
    model = classifier_free_model(module, args.cfg, module.null_label) if args.cfg else module
    y = torch.arange(args.samples) % options["num_classes"]
    noise = torch.randn((args.samples, *shape), generator=torch.Generator().manual_seed(0))
    x_start = noise * (1.0 + SIGMA_MAX**2) ** 0.5
    sigma_min = float(trained_sigmas(module.diffusion)[0])

    def levels(n: int) -> torch.Tensor:
        return torch.cat([logsnr_sigmas(n, sigma_min, SIGMA_MAX), torch.zeros(1, dtype=torch.float64)])

    rows = []
    for clip in (False, True):
        denoiser = DiscreteTimeDenoiser(module.diffusion, model, {"y": y}, clip_denoised=clip)
        with torch.no_grad():
            reference = dpm_solver_pp_2m(denoiser, x_start, levels(400)).clamp(-1, 1)
            for n in (10, 20, 50):
                for name, solver in (("ddim", ddim_on_levels), ("dpmpp_2m", dpm_solver_pp_2m)):
                    x = solver(denoiser, x_start, levels(n)).clamp(-1, 1)
                    rows.append({"clip_denoised": clip, "method": name, "steps": f"logsnr{n}", "nfe": n,
                                 "rms": round(rms(x, reference), 5)})  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
    return {"order_rows": rows, "samples": args.samples, "guidance": f"classifier-free w = {args.cfg}",
            "model": description}


def _global_step(path: str) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False).get("global_step", -1))


def random_adm(args) -> dict:
    from bench_sampling import build

    ours, _, _, _, diffusion, _ = build()
    result = quality_run(ours, diffusion, (3, 32, 32), args.samples, args.batch, class_cond=True, num_classes=1000,
                         precision=args.precision)  # fmt: skip
    result.update(model="randomly initialised CPU-sized ADM of bench_sampling.py (64 ch, 32 px, learned sigma, "
                        "1000 classes, cosine T = 1000)", guidance="none (class-conditional)",
                  precision=args.precision)  # fmt: skip
    return result


def speed(args) -> dict:
    from bench_sampling import build, run_ref

    from diffusion_pl.sampling import SampleEngine

    ours, clf, ref, ref_clf, diffusion, create_gd = build()
    # dpmpp_2m_sde: the 20-NFE sampler that reaches 100 ancestral steps' digit accuracy on the quickstart model
    engine = SampleEngine(ours, diffusion, (3, 32, 32), respacing="karras20", method="dpmpp_2m_sde", class_cond=True,
                          num_classes=1000, classifier=clf, classifier_scale=1.0, precision=args.precision,
                          progress=False)  # fmt: skip
    engine.sample(range(2))  # warm-up
    ours_s, ref_s = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        engine.sample(range(args.batch))
        ours_s.append(time.perf_counter() - t0)
        dtype = "bf16" if args.precision == "bf16-mixed" else "fp32"  # bench_sampling's spelling
        ref_s.append(run_ref(ref, ref_clf, create_gd, args.ref_steps, args.batch, dtype)[0] / args.ref_steps)
    ours_t, ref_step = sorted(ours_s)[len(ours_s) // 2], sorted(ref_s)[len(ref_s) // 2]
    return {"speed": {"batch": args.batch, "rounds": args.rounds, "precision": args.precision,
                      "ours": "dpmpp_2m_sde karras20 (20 NFE), classifier scale 1",
                      "ours_images_per_s": round(args.batch / ours_t, 4),
                      "reference": f"p_sample_loop 250 steps, classifier scale 1 (per-step time of {args.ref_steps} "
                                   "steps x 250)",
                      "reference_images_per_s": round(args.batch / (ref_step * 250), 4),
                      "speedup": round(ref_step * 250 / ours_t, 2)}}  # fmt: skip


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": " / ".join(f"{v:.1f}" for v in os.getloadavg())}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["random", "mnist", "mnist_accuracy", "mnist_order", "speed"])
    p.add_argument("--runs", default=ACCURACY_RUNS, help="--model mnist_accuracy: METHOD:STEPS,...")
    p.add_argument("--ckpt", help="the quickstart DiffusionModule checkpoint (--model mnist)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--ref-steps", type=int, default=25)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--render", nargs="+", help="JSON results to render into --output")
    p.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"))
    args = p.parse_args(argv)
    if args.render:
        from solvers_report import render_into

        render_into(args.output, [json.load(open(path)) for path in args.render])
        return
    started = time.time()
    before = machine()
    result = {"random": random_adm, "mnist": mnist, "mnist_accuracy": mnist_accuracy, "mnist_order": mnist_order,
              "speed": speed}[args.model](args)
    result.update(kind=args.model, machine=before, load_after=machine()["load_average"],
                  seconds=round(time.time() - started), command="python benchmarks/bench_solvers.py "
                  + " ".join(sys.argv[1:] if argv is None else argv))  # fmt: skip
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
