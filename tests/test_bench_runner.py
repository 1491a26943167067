"""The benchmark runner (benchmarks/run_all.py, `make bench`): its quick machinery on tiny networks, in-process,
writes a complete Markdown report to a temporary path (never the real BENCHMARKS.md) whose numbers all parse."""

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("guided_diffusion")

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "run_all.py"


def load_runner():
    spec = importlib.util.spec_from_file_location("bench_run_all", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sections(text: str) -> dict[str, list[list[str]]]:
    """'## title' -> table rows (cells) of that section, header and separator rows dropped."""
    out: dict[str, list[list[str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            out[current] = []
        elif current is not None and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(re.fullmatch(r"-+", c) for c in cells):
                continue
            out[current].append(cells)
    for rows in out.values():
        if rows:
            rows.pop(0)  # header
    return out


def number(cell: str) -> float:
    value = float(cell.rstrip("x"))
    assert not math.isinf(value), cell
    return value


def test_runner_writes_every_table_with_parseable_numbers(tmp_path):
    real = ROOT / "BENCHMARKS.md"
    before = real.read_bytes() if real.exists() else None
    notes = tmp_path / "NOTES.md"
    notes.write_text("## Notes\n\nhand-written analysis\n")
    out = tmp_path / "BENCH.md"
    threads = torch.get_num_threads()
    try:
        text = load_runner().main(
            ["--tiny", "--in-process", "--threads", "1", "--output", str(out), "--notes", str(notes)]
        )
    finally:
        torch.set_num_threads(threads)
    assert out.read_text() == text
    assert (real.read_bytes() if real.exists() else None) == before  # the real report is untouched

    secs = sections(text)
    unet = next(k for k in secs if k.startswith("U-Net: tiny"))
    for name in ("Command", "Machine", unet, "Sampling: classifier-guided ancestral sampling",
                 "Evaluation: Inception feature extraction", "Targets", "Notes"):  # fmt: skip
        assert name in secs, name
    assert "benchmarks/run_all.py --tiny --in-process" in text  # the exact command is recorded
    assert "hand-written analysis" in text

    machine = {row[0]: row[1] for row in secs["Machine"]}
    keys = ("cpu model", "logical CPUs (lscpu)", "CPUs usable (affinity)", "RAM", "torch", "threads per measurement",
            "load average before (1/5/15 min)", "load average after (1/5/15 min)")  # fmt: skip
    for key in keys:
        assert machine.get(key), key
    assert machine["threads per measurement"] == "1"
    assert machine["torch"] == torch.__version__
    for key in ("load average before (1/5/15 min)", "load average after (1/5/15 min)"):
        assert len([number(v) for v in machine[key].split(" / ")]) == 3

    rows = secs[unet]
    assert {(r[0], r[1], r[2]) for r in rows} == {
        (m, d, c) for m in ("train", "infer") for d in ("fp32", "bf16") for c in ("off", "on")
    }
    for r in rows:
        assert len(r) == 14
        values = [number(c) for c in r[3:6] + r[8:11]]
        assert values[0] > 0 and values[1] > 0 and values[2] == pytest.approx(values[1] / values[0], rel=0.02)
        for spread in r[6:8]:
            assert all(number(v) > 0 for v in spread.split("-"))
        if r[0] == "train":
            ref_act, ours_act, ratio = (number(c) for c in r[11:14])
            assert ref_act > 0 and ours_act > 0 and ratio == pytest.approx(ours_act / ref_act, abs=0.02)
        else:
            assert r[11:14] == ["-", "-", "-"]

    samp = secs["Sampling: classifier-guided ancestral sampling"]
    assert [r[0] for r in samp] == ["fp32 vs fp32", "bf16 vs bf16 (both autocast)",
                                    "ours bf16 vs reference fp32 (as users run it)"]  # fmt: skip
    for r in samp:
        assert len(r) == 10 and all(number(c) > 0 for c in r[1:6]) and all(number(c) >= 0 for c in r[8:10])

    ev = secs["Evaluation: Inception feature extraction"]
    assert [r[0] for r in ev] == ["fp32", "bf16"]
    assert all(number(r[1]) > 0 and number(r[2]) >= 0 for r in ev)

    targets = secs["Targets"]
    assert len(targets) == 2 * 7 + 3  # per channels_last setting: 1 fp32 + 2x2 memory + 2 bf16; 3 sampling rows
    assert all(r[2] in ("**met**", "**not met**") for r in targets)
    assert all(re.search(r"\d", r[1]) for r in targets)


def test_a_failing_measurement_is_reported_not_fatal(tmp_path, monkeypatch):
    runner = load_runner()

    def broken(**kwargs):
        raise RuntimeError("worker exploded")

    monkeypatch.setitem(runner.WORKERS, "eval", broken)
    monkeypatch.setattr(runner, "FAILURES", [])
    out = tmp_path / "BENCH.md"
    threads = torch.get_num_threads()
    try:
        text = runner.main(["--tiny", "--in-process", "--threads", "1", "--output", str(out), "--notes", "",
                            "--skip-sampling", "--cells", "infer:fp32:off"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    secs = sections(text)
    assert [r[0] for r in secs["Evaluation: Inception feature extraction"]] == ["fp32", "bf16"]
    assert all(r[1] == "nan" for r in secs["Evaluation: Inception feature extraction"])
    assert "## Failures" in text and "worker exploded" in text
    unet = next(k for k in secs if k.startswith("U-Net: tiny"))
    assert [r[:3] for r in secs[unet]] == [["infer", "fp32", "off"]]
