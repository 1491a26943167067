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
                      "", *_quality_table(result), ""]  # fmt: skip
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
