"""The "Fast samplers" section of BENCHMARKS.md, written by bench_solvers.py --render between two markers and kept by
run_all.py when it rewrites the rest of the file (:func:`keep_section`)."""

from __future__ import annotations

import os

BEGIN, END = "<!-- bench_solvers:begin -->", "<!-- bench_solvers:end -->"


def section_of(text: str) -> str | None:
    """The marked section of ``text`` (markers included), or None."""
    if BEGIN not in text or END not in text:
        return None
    return text[text.index(BEGIN) : text.index(END) + len(END)]


def keep_section(old_text: str | None, new_text: str) -> str:
    """``new_text`` with the marked section of ``old_text`` (replacing its own, or appended)."""
    section = section_of(old_text or "")
    if section is None:
        return new_text
    own = section_of(new_text)
    if own is not None:
        return new_text.replace(own, section)
    return new_text.rstrip() + "\n\n" + section + "\n"


def _quality_table(result: dict) -> list[str]:
    rows = result["rows"]
    has_acc = any("digit_accuracy" in r for r in rows)
    has_median = any("rms_median" in r for r in rows)
    head = "| method | --steps | NFE | RMS to 1000-step DDIM |" + (" median per sample |" if has_median else "")
    head += (" digit accuracy |" if has_acc else "") + " s |"
    lines = [head, "|---|---|---|---|" + ("---|" if has_median else "") + ("---|" if has_acc else "") + "---|"]
    for r in rows:
        rms = "(stochastic)" if r["rms"] is None else f"{r['rms']:.4f}"
        median = (f" {r['rms_median']:.4f} |" if "rms_median" in r else " |") if has_median else ""
        acc = f" {r['digit_accuracy']:.3f} |" if has_acc else ""
        lines.append(f"| {r['method']} | {r['steps']} | {r['nfe']} | {rms} |{median}{acc} {r['seconds']} |")
    return lines


TARGET = (("dpmpp_2m", "karras20"), ("ddim", "50"))  # the target: DPM-Solver++(2M) at 20 NFE vs DDIM at 50


def rms_ratio(a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """RMS(a) / RMS(b) of paired per-sample RMS values (RMS = sqrt(mean of squares): every sample has the same pixel
    count), and the 5 % / 95 % quantiles of the ratio over bootstrap resamples of the samples (pairs kept)."""
    import numpy as np

    sq_a, sq_b = np.square(np.asarray(a, dtype=np.float64)), np.square(np.asarray(b, dtype=np.float64))
    if sq_a.shape != sq_b.shape or sq_a.size == 0:
        raise ValueError(f"paired per-sample RMS values needed, got {sq_a.size} and {sq_b.size}")
    pick = np.random.default_rng(seed).integers(0, sq_a.size, size=(resamples, sq_a.size))
    ratios = np.sqrt(sq_a[pick].mean(1) / sq_b[pick].mean(1))
    low, high = np.quantile(ratios, [0.05, 0.95])
    return float(np.sqrt(sq_a.mean() / sq_b.mean())), float(low), float(high)


def _target_line(rows: list[dict]) -> list[str]:
    """The target comparison with its sampling uncertainty, when both rows carry per-sample values."""
    found = {(r["method"], r["steps"]): r.get("rms_per_sample") for r in rows}
    (fast, fast_steps), (slow, slow_steps) = TARGET
    a, b = found.get((fast, fast_steps)), found.get((slow, slow_steps))
    if not a or not b:
        return []
    ratio, low, high = rms_ratio(a, b)
    verdict = ("the first is closer" if high < 1 else "the second is closer" if low > 1
               else "it contains 1, so these samples do not tell which is closer")  # fmt: skip
    return [f"RMS of {fast} {fast_steps} / RMS of {slow} {slow_steps}: {ratio:.2f}; paired bootstrap over the "
            f"{len(a)} samples, 90 % interval {low:.2f}-{high:.2f}: {verdict}.", ""]


def render(results: list[dict]) -> str:
    lines = [BEGIN, "## Fast samplers (benchmarks/bench_solvers.py)", "",
             "Written by `benchmarks/bench_solvers.py --render` (kept when run_all.py rewrites this file). Every "
             "method starts sample i from the same x_T (same seed); RMS is over pixels in [-1, 1]. See "
             "docs/SAMPLERS.md.", ""]  # fmt: skip
    for result in results:
        m = result["machine"]
        lines += [f"### {result['kind']}: {result.get('model', 'guided sampling speed')}", "",
                  f"Command: `{result['command']}`  ", f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, "
                  f"{m['threads']} threads, torch {m['torch']}; load average {m['load_average']} before, "
                  f"{result['load_after']} after (a shared machine: times are indicative); {result['seconds']} s.",
                  ""]  # fmt: skip
        if "rows" in result:
            lines += [f"{result['samples']} samples, guidance: {result['guidance']}, precision {result['precision']}.",
                      "", *_quality_table(result), "", *_target_line(result["rows"])]  # fmt: skip
        if "accuracy_rows" in result:
            lines += [f"{result['samples']} samples (balanced labels), guidance: {result['guidance']}, precision "
                      f"{result['precision']}.", "", "| method | --steps | NFE | digit accuracy | s |",
                      "|---|---|---|---|---|"]  # fmt: skip
            lines += [f"| {r['method']} | {r['steps']} | {r['nfe']} | {r['digit_accuracy']:.3f} | {r['seconds']} |"
                      for r in result["accuracy_rows"]] + [""]  # fmt: skip
        if "order_rows" in result:
            lines += [f"{result['samples']} samples, guidance: {result['guidance']}, 32-true; RMS of x_0 to a "
                      "400-level DPM-Solver++(2M) solution from sigma = 80 (logSNR-uniform levels).", "",
                      "| clip_denoised | method | --steps | NFE | RMS |", "|---|---|---|---|---|"]  # fmt: skip
            lines += [f"| {r['clip_denoised']} | {r['method']} | {r['steps']} | {r['nfe']} | {r['rms']:.4f} |"
                      for r in result["order_rows"]] + [""]  # fmt: skip
        if "speed" in result:
            s = result["speed"]
            lines += ["| sampler | images/s |", "|---|---|",
                      f"| ours: {s['ours']} | {s['ours_images_per_s']} |",
                      f"| reference: {s['reference']} | {s['reference_images_per_s']} |", "",
                      f"Speed-up {s['speedup']}x (batch {s['batch']}, {s['rounds']} round(s), {s['precision']}).",
                      ""]  # fmt: skip
    lines.append(END)
    return "\n".join(lines)


def render_into(path: str, results: list[dict]) -> None:
    """Replace (or append) the marked section of ``path`` with the rendering of ``results``."""
    from diffusion_pl.utils.files import write_text

    old = open(path).read() if os.path.isfile(path) else "# Benchmarks\n"
    write_text(path, keep_section(render(results), old))
