"""benchmarks/solvers_report.py: the "Fast samplers" section is written between its markers and survives run_all.py
rewriting BENCHMARKS.md."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("solvers_report", ROOT / "benchmarks" / "solvers_report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

MACHINE = {"cpu": "x86_64", "logical_cpus": 2, "threads": 2, "torch": "2.x", "load_average": "9.0 / 9.0 / 9.0"}
RESULT = {"kind": "random", "model": "random ADM", "command": "python benchmarks/bench_solvers.py --model random",
          "machine": MACHINE, "load_after": "8.0 / 8.0 / 8.0", "seconds": 12, "samples": 2, "guidance": "none",
          "precision": "32-true",
          "rows": [{"method": "ddim", "steps": "1000", "nfe": 1000, "rms": 0.0, "seconds": 9.0},
                   {"method": "dpmpp_2m", "steps": "karras20", "nfe": 20, "rms": 0.0123, "rms_median": 0.01,
                    "seconds": 1.0}]}  # fmt: skip


def test_section_is_written_and_kept_by_a_rerender(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nold numbers\n")
    report.render_into(str(path), [RESULT])
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nold numbers") and "| dpmpp_2m | karras20 | 20 | 0.0123 | 0.0100 |" in text
    assert "| ddim | 1000 | 1000 | 0.0000 | | 9.0 |" in text  # the reference row has no per-sample median
    assert "python benchmarks/bench_solvers.py --model random" in text and "load average 9.0" in text
    # run_all.py renders the rest anew: the section is carried over; a second render replaces it, once.
    rerendered = report.keep_section(text, "# Benchmarks\n\nnew numbers\n")
    assert "new numbers" in rerendered and "| dpmpp_2m | karras20 | 20 | 0.0123 |" in rerendered
    path.write_text(rerendered)
    report.render_into(str(path), [{**RESULT, "rows": RESULT["rows"][:1]}])
    final = path.read_text()
    assert final.count(report.BEGIN) == 1 and "karras20" not in final and "new numbers" in final


def test_target_ratio_and_its_bootstrap_interval():
    """RMS ratio of paired per-sample RMS values: sqrt(mean a^2 / mean b^2); identical pairs give a zero-width
    interval; the interval of a mixed set brackets the ratio and is written under the table."""
    ratio, low, high = report.rms_ratio([0.1] * 8, [0.2] * 8)
    assert (round(ratio, 12), round(low, 12), round(high, 12)) == (0.5, 0.5, 0.5)
    a, b = [0.1, 0.3, 0.05, 0.2, 0.1, 0.4], [0.2, 0.1, 0.1, 0.25, 0.3, 0.2]
    ratio, low, high = report.rms_ratio(a, b)
    expected = (sum(v * v for v in a) / sum(v * v for v in b)) ** 0.5
    assert abs(ratio - expected) < 1e-12 and low < ratio < high and low > 0
    assert report.rms_ratio(a, b) == (ratio, low, high)  # seeded
    with pytest.raises(ValueError, match="paired per-sample RMS values needed, got 6 and 5"):
        report.rms_ratio(a, b[:5])
    rows = [{"method": "dpmpp_2m", "steps": "karras20", "nfe": 20, "rms": 0.1, "rms_median": 0.1,
             "rms_per_sample": a, "seconds": 1.0},
            {"method": "ddim", "steps": "50", "nfe": 50, "rms": 0.1, "rms_median": 0.1, "rms_per_sample": b,
             "seconds": 1.0}]  # fmt: skip
    text = report.render([{**RESULT, "rows": RESULT["rows"] + rows}])
    assert f"RMS of dpmpp_2m karras20 / RMS of ddim 50: {ratio:.2f}" in text
    assert f"over the 6 samples, 90 % interval {low:.2f}-{high:.2f}: it contains 1" in text
    assert low < 1 < high
    closer = [{**r, "rms_per_sample": [v / (3 if r["method"] == "dpmpp_2m" else 1) for v in r["rms_per_sample"]]}
              for r in rows]  # fmt: skip
    _, low3, high3 = report.rms_ratio(closer[0]["rms_per_sample"], b)
    assert high3 < 1 and f"interval {low3:.2f}-{high3:.2f}: the first is closer." in report.render(
        [{**RESULT, "rows": RESULT["rows"] + closer}])
    assert "/ RMS of" not in report.render([RESULT])  # without both rows' per-sample values: no line
