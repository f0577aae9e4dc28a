#!/usr/bin/env python
"""Benchmarks: speed and memory, each reported as a ratio against a baseline measured in the same run.

    python scripts/benchmark.py --quick         # the sized-down set (minutes), writes docs/benchmarks.md
    python scripts/benchmark.py                 # all benchmarks at full size, writes docs/benchmarks.md
    python scripts/benchmark.py pipeline        # one or more of: see --list (no markdown unless --md)
    python scripts/benchmark.py --quick --note "machine shared with a training run" --out results/benchmark.json

Each benchmark lives in ``bundle/benchmarks/<name>.py`` and exposes ``run(quick, tiny, repeats) -> dict`` with
``rows`` (candidate vs baseline, measured in interleaved repetitions; bundle/benchmarks/_common.py). The markdown
report (one table: benchmark, candidate, baseline, ratio (median, min-max), units, n; the machine and the command on
top) is written atomically; the generator owns the whole file.
"""

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bundle.benchmarks  # noqa: E402
from bundle.benchmarks import _common  # noqa: E402
from bundle.utils.atomic import write_json_atomic, write_text_atomic  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MD = os.path.join(ROOT, "docs", "benchmarks.md")
# the order of a run: the heaviest (network) first, while nothing else of ours has filled the memory
ORDER = ("network", "inference", "pipeline", "bootstrap", "converters", "synthetic")


def available():
    names = [m.name for m in pkgutil.iter_modules(bundle.benchmarks.__path__) if not m.name.startswith("_")]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--quick", action="store_true", help="the sized-down set (under 10 minutes on 2 cores)")
    ap.add_argument("--tiny", action="store_true", help="minimal sizes, seconds per benchmark (tests)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repetitions per comparison")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: the cores this process may use)"
    )
    ap.add_argument("--out", default=None, help="also write all results to this JSON file")
    ap.add_argument(
        "--md",
        default=None,
        help="markdown report path (default: docs/benchmarks.md when all benchmarks run; none for a subset)",
    )
    ap.add_argument("--note", default="", help="the conditions line of the report (e.g. other jobs running)")
    args = ap.parse_args(argv)
    names = available()
    if args.list:
        print("\n".join(names))
        return 0
    unknown = [n for n in args.names if n not in names]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; available: {names}")
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = _common.load_average()
    if args.threads:
        threads, why = args.threads, "--threads"
    elif load is not None and load >= cores:
        # measured here: on 2 cores under load 14, a demo training step took 3-12 s with 2 OpenMP threads (they
        # spin waiting for each other) and 1.0-1.3 s with one
        threads, why = 1, f"1-min load {load} >= {cores} cores at the start: one thread (set --threads to override)"
    else:
        threads, why = cores, "one per core"
    threads0 = torch.get_num_threads()
    torch.set_num_threads(threads)  # the same for every benchmark; pipeline uses 1 itself, as DataLoader workers
    try:
        shown = argv if argv is not None else sys.argv[1:]
        command = "python scripts/benchmark.py " + " ".join(shlex.quote(a) for a in shown)
        return _run(args, names, md_path_default(args), command.strip(), why, load)
    finally:
        torch.set_num_threads(threads0)  # main() may be called in process (tests)


def md_path_default(args):
    return args.md if args.md is not None else (None if args.names else DEFAULT_MD)


def _run(args, names, md_path, command, why, load):
    info = {
        "command": command,
        "date": _common.now(),
        "conditions": args.note,
        "load_start": load,
        "threads_reason": why,
        "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
        "machine": _common.machine(),
    }
    t_all = time.perf_counter()
    results = {}
    for name in args.names or names:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        fn = importlib.import_module(f"bundle.benchmarks.{name}").run
        accepted = inspect.signature(fn).parameters
        if args.tiny and "tiny" not in accepted:
            print(f"  skipped: bundle/benchmarks/{name}.py has no tiny mode (run(quick, tiny, repeats))", flush=True)
            continue
        kwargs = {"quick": args.quick, "tiny": args.tiny, "repeats": args.repeats}
        res = fn(**{k: v for k, v in kwargs.items() if k in accepted})
        res["wall_s"] = round(time.perf_counter() - t0, 2)
        results[name] = res
        for r in res.get("rows", []):
            print(
                f"  {r['benchmark']}: {r['candidate']} vs {r['baseline']}: ratio {_common.fmt(r['ratio'])} "
                f"({_common.fmt(r['ratio_min'])}-{_common.fmt(r['ratio_max'])}), n={r['n']}",
                flush=True,
            )
    info["load_end"] = _common.load_average()
    info["wall_s"] = time.perf_counter() - t_all
    if args.out:
        write_json_atomic(args.out, {"info": info, "results": results}, indent=2)
    if md_path:
        write_text_atomic(md_path, _common.markdown(results, info))
        print(f"wrote {md_path}", flush=True)
    if not md_path and not args.out:
        print(json.dumps(results, indent=2, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
