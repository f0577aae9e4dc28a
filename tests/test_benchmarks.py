"""scripts/benchmark.py and bundle/benchmarks: the report a user reads (docs/benchmarks.md) is produced, complete and
finite in a tiny configuration; the ratio arithmetic and the interleaving are right. No timing assertions."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from bundle.benchmarks import _common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import benchmark  # noqa: E402  (scripts/benchmark.py)

RATIO = re.compile(r"^(\S+) \((\S+)-(\S+)\)$")


def _table(md: str) -> list[list[str]]:
    lines = md.splitlines()
    head = lines.index("| " + " | ".join(_common.COLUMNS) + " |")
    rows = []
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def test_quick_tiny_run_writes_the_markdown_report(tmp_path):
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    names = ["network", "pipeline", "bootstrap", "inference"]
    argv = [*names, "--quick", "--tiny", "--repeats", "1", "--md", str(md), "--out", str(js), "--note", "test run"]
    assert benchmark.main(argv) == 0
    text = md.read_text()
    assert text.startswith("# Benchmarks")
    assert "Machine: " in text and " cores" in text and "torch " in text and " thread(s) (" in text
    assert "Command: `python scripts/benchmark.py network pipeline bootstrap inference --quick --tiny" in text
    assert "Conditions: test run" in text
    rows = _table(text)
    assert {r[0].split(":")[0] for r in rows} == set(names)  # every benchmark contributed rows
    for bench, cand, base, ratio, units, n in rows:
        m = RATIO.match(ratio)
        assert m, ratio
        med, lo, hi = (float(x) for x in m.groups())
        assert all(math.isfinite(x) and x > 0 for x in (med, lo, hi)) and lo <= med <= hi, (bench, ratio)
        assert int(n) >= 1 and units and cand and base
    # the paper-level comparisons a reader looks for are all in the table
    text_rows = "\n".join(r[0] for r in rows)
    for what in ("alignment cost", "bf16 autocast", "VLM vs plain ViT", "peak memory", "odd16_jpeg2000", "batch 4"):
        assert what in text_rows, what
    data = json.loads(js.read_text())
    assert set(data["results"]) == set(names) and data["info"]["mode"] == "tiny"


def test_list_and_unknown_name(capsys):
    assert benchmark.main(["--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"network", "pipeline", "bootstrap", "inference", "converters", "synthetic"} <= set(listed)
    with pytest.raises(SystemExit):
        benchmark.main(["no_such_benchmark"])


def test_time_row_ratio_is_per_repetition_median_and_range():
    # baseline 2 s vs candidate 1 s in the first repetition, 3 vs 1 in the second, 4 vs 2 in the third
    r = _common.time_row("b", "c", "base", [1.0, 1.0, 2.0], [2.0, 3.0, 4.0], per=1.0, unit="ms", scale=1e3)
    assert (r["ratio"], r["ratio_min"], r["ratio_max"], r["n"]) == (2.0, 2.0, 3.0, 3)
    assert r["candidate_value"] == 1000.0 and r["baseline_value"] == 3000.0
    t = _common.time_row("b", "c", "base", [0.5, 0.25], [1.0, 1.0], per=8, throughput="images/s")
    assert t["candidate_value"] == pytest.approx(8 / 0.375) and t["ratio"] == pytest.approx(3.0)
    m = _common.memory_row("b", "c", "base", [50.0], [100.0])
    assert m["ratio"] == 2.0  # > 1: the candidate uses less


def test_interleave_rotates_the_order():
    calls = []
    variants = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = _common.interleave(variants, repeats=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(len(v) == 3 for v in times.values())


def test_peak_rss_sees_numpy_allocations():
    import numpy as np

    with _common.PeakRSS() as m:
        a = np.ones(64 * 2**20 // 8)  # 64 MB
        del a
    assert m.mb > 48


def test_cli_help_runs_from_a_fresh_process():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--quick" in out.stdout and "--tiny" in out.stdout
