"""Shared pieces of the benchmarks: interleaved timing, ratio rows, peak-memory probe, machine description, and the
markdown report (docs/benchmarks.md) that ``scripts/benchmark.py`` writes.

Every table row compares a *candidate* with a *baseline* measured in the same run. The two are timed in interleaved
repetitions (order rotated each repetition), so a slow-down from other jobs on the shared machine hits both; the
ratio of each repetition's pair is computed and the table gives the median and the range of those ratios.
Ratios are oriented so that > 1 means the candidate is better: baseline time / candidate time for speed, baseline
MB / candidate MB for memory.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "Sizes",
    "interleave",
    "time_row",
    "memory_row",
    "PeakRSS",
    "machine",
    "markdown",
    "fmt",
]

COLUMNS = ("benchmark", "candidate", "baseline", "ratio (median, min-max)", "units", "n")


class Sizes:
    """The run size a benchmark is asked for: ``full`` (default), ``quick`` (the sized-down set) or ``tiny``
    (tests: minimal sizes, seconds); ``repeats`` overrides the number of interleaved repetitions."""

    def __init__(self, quick: bool = False, tiny: bool = False, repeats: int | None = None):
        self.mode = "tiny" if tiny else "quick" if quick else "full"
        self.repeats = repeats

    def pick(self, full, quick, tiny):
        return {"full": full, "quick": quick, "tiny": tiny}[self.mode]

    def reps(self, full: int, quick: int, tiny: int = 1) -> int:
        return max(1, int(self.repeats)) if self.repeats else self.pick(full, quick, tiny)


def interleave(
    variants: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    memory: dict | None = None,
) -> dict[str, list[float]]:
    """Wall times (s) of each variant: ``warmup`` untimed calls each, then ``repeats`` rounds in which every
    variant runs once, the order rotated each round (no variant always runs first or last).

    ``memory``, when given (a dict), receives ``{name: [peak RSS growth, MB]}`` of each variant's call in the first
    timed round (:class:`PeakRSS`; its reset runs before the clock starts, so no extra call is needed).
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            probe = PeakRSS() if (memory is not None and r == 0) else None
            if probe is not None:
                probe.__enter__()
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
            if probe is not None:
                probe.__exit__(None, None, None)
                memory[name] = [probe.mb]
    return times


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _ratio_stats(ratios: Sequence[float]) -> dict:
    ratios = [float(r) for r in ratios if _finite(r) and r > 0]
    if not ratios:
        return {"ratio": float("nan"), "ratio_min": float("nan"), "ratio_max": float("nan"), "n": 0}
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios), "n": len(ratios)}


def time_row(
    benchmark: str,
    candidate: str,
    baseline: str,
    cand_s: Sequence[float],
    base_s: Sequence[float],
    per: float = 1.0,
    unit: str = "s",
    scale: float = 1.0,
    throughput: str | None = None,
    note: str = "",
) -> dict:
    """A speed row from paired times: ratio_i = base_i / cand_i (> 1: candidate faster).

    The cells show the median time per ``per`` items in ``unit`` (``scale`` converts seconds, e.g. 1e3 for ms) or,
    with ``throughput`` (e.g. "images/s"), ``per`` / median time.
    """
    n = min(len(cand_s), len(base_s))
    stats = _ratio_stats([b / c for b, c in zip(base_s[:n], cand_s[:n], strict=True) if c > 0])
    mc, mb = statistics.median(cand_s), statistics.median(base_s)
    if throughput:
        vc, vb, u = per / mc, per / mb, throughput
        units = f"speed-up (baseline time / candidate time); {throughput}"
    else:
        vc, vb, u = mc * scale / per, mb * scale / per, unit
        units = f"speed-up (baseline time / candidate time); {unit}"
    return {
        "benchmark": benchmark,
        "candidate": candidate,
        "baseline": baseline,
        "candidate_value": vc,
        "baseline_value": vb,
        "value_unit": u,
        "units": units,
        "kind": "speed",
        "note": note,
        **stats,
    }


def memory_row(
    benchmark: str, candidate: str, baseline: str, cand_mb: Sequence[float], base_mb: Sequence[float], note: str = ""
) -> dict:
    """A memory row from paired peak-RSS growths (MB): ratio_i = base_i / cand_i (> 1: candidate smaller)."""
    n = min(len(cand_mb), len(base_mb))
    floor = 1.0  # MB: a growth below the page-level noise is counted as 1 MB, so a ratio stays finite
    stats = _ratio_stats([max(b, floor) / max(c, floor) for b, c in zip(base_mb[:n], cand_mb[:n], strict=True)])
    return {
        "benchmark": benchmark,
        "candidate": candidate,
        "baseline": baseline,
        "candidate_value": statistics.median(cand_mb),
        "baseline_value": statistics.median(base_mb),
        "value_unit": "MB",
        "units": "memory (baseline MB / candidate MB); peak RSS growth, MB",
        "kind": "memory",
        "note": note,
        **stats,
    }


# ----------------------------------------------------------------------------------------------- memory
def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident-memory growth (MB) of the code inside ``with PeakRSS() as m: ...`` -> ``m.mb``.

    Linux: the kernel's high-water mark (VmHWM) is reset to the current RSS (``/proc/self/clear_refs`` = 5) after
    ``gc.collect()`` and ``malloc_trim(0)`` (freed heap memory goes back to the system, so a block freed by an earlier
    workload is not silently reused); growth = VmHWM after - VmRSS before. This covers torch's CPU allocations,
    numpy, PIL and the decoders alike (tracemalloc sees only Python's allocator). Elsewhere: the growth of
    ``resource.getrusage().ru_maxrss``, a lower bound when an earlier peak was higher (``exact`` is then False).
    """

    def __init__(self):
        self.mb = float("nan")
        self.exact = False

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = _status_mb("VmHWM:") is not None
        except OSError:
            self.exact = False
        self._rss0 = _status_mb("VmRSS:") if self.exact else None
        self._max0 = _ru_maxrss_mb()
        return self

    def __exit__(self, *exc):
        if self.exact:
            self.mb = max(0.0, _status_mb("VmHWM:") - self._rss0)
        else:
            self.mb = max(0.0, _ru_maxrss_mb() - self._max0)
        return False


def _ru_maxrss_mb() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024.0  # bytes on macOS, KiB on Linux


def peak_mb(fn: Callable[[], object]) -> float:
    with PeakRSS() as m:
        fn()
    return m.mb


# ----------------------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine() -> dict:
    import numpy
    import PIL
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        flags = ", ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {x}" in text)
    except OSError:
        pass
    return {
        "cpu": _cpu_model(),
        "cpu_flags": flags,
        "cores": cores,
        "memory_gb": (
            round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
            if hasattr(os, "sysconf")
            else None
        ),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "os": platform.platform(terse=True),
    }


# ----------------------------------------------------------------------------------------------- markdown
def fmt(v: float) -> str:
    """3 significant digits, no exponent for ordinary sizes."""
    if not _finite(v):
        return "nan"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def markdown(results: Mapping[str, Mapping], info: Mapping) -> str:
    """docs/benchmarks.md: the header (command, date, conditions, machine), one table of all rows, then per
    benchmark its baselines/notes and wall time. The generator owns the whole file."""
    m = info["machine"]
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by scripts/benchmark.py; do not edit by hand: the next run rewrites the whole file. -->",
        "",
        f"Command: `{info['command']}` ({info['date']}, {info['wall_s']:.0f} s in all).",
        "",
        f"Conditions: {info.get('conditions') or 'not stated'}; 1-min load average "
        f"{info.get('load_start')} at the start, {info.get('load_end')} at the end.",
        "",
        f"Machine: {m['cpu']} ({m['cpu_flags'] or 'no AVX flags read'}), {m['cores']} cores, "
        f"{m['memory_gb']} GB; torch {m['torch']} with {m['torch_threads']} thread(s) ({info.get('threads_reason')})"
        f"{' (CUDA available, not used)' if m.get('cuda') else ''}; Python {m['python']}, numpy {m['numpy']}, "
        f"Pillow {m['pillow']}; {m['os']}.",
        "",
        "Each row compares a candidate with a baseline measured in the same run, in interleaved repetitions (order "
        "rotated); the ratio is computed per repetition and the table gives its median and range over n "
        "repetitions. **Ratio > 1: the candidate is better** (faster: baseline time / candidate time; smaller: "
        "baseline MB / candidate MB). The candidate and baseline cells give the medians of the measured values.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for name, res in results.items():
        for r in res.get("rows", []):
            u = r["value_unit"]
            lines.append(
                "| "
                + " | ".join(
                    _cell(x)
                    for x in (
                        f"{name}: {r['benchmark']}",
                        f"{r['candidate']}: {fmt(r['candidate_value'])} {u}",
                        f"{r['baseline']}: {fmt(r['baseline_value'])} {u}",
                        f"{fmt(r['ratio'])} ({fmt(r['ratio_min'])}-{fmt(r['ratio_max'])})",
                        r["units"],
                        str(r["n"]),
                    )
                )
                + " |"
            )
    lines += ["", "## Notes per benchmark", ""]
    for name, res in results.items():
        lines.append(f"- **{name}** ({res.get('wall_s', float('nan')):.0f} s): {res.get('description', '').strip()}")
        for r in res.get("rows", []):
            if r.get("note"):
                lines.append(f"  - {r['benchmark']}: {r['note']}")
        if not res.get("rows"):  # a benchmark without table rows: its scalar results, as it returned them
            scalars = {k: v for k, v in res.items() if isinstance(v, (int, float, str)) and k != "description"}
            lines.append("  - (no table rows) " + ", ".join(f"{k} = {v}" for k, v in scalars.items()))
    lines.append("")
    return "\n".join(line.rstrip() for line in lines)


def now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
