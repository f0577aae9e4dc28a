#!/usr/bin/env python
"""Benchmarks: speed and memory goals, each reported as a ratio against a baseline measured in the same run.

    python scripts/benchmark.py                 # all benchmarks
    python scripts/benchmark.py pipeline        # one of: see --list
    python scripts/benchmark.py --out results/benchmark.json

Each benchmark lives in ``bundle/benchmarks/<name>.py`` and exposes ``run(quick: bool) -> dict``.
"""

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bundle.benchmarks  # noqa: E402
from bundle.utils.atomic import write_json_atomic  # noqa: E402


def available():
    return sorted(m.name for m in pkgutil.iter_modules(bundle.benchmarks.__path__) if not m.name.startswith("_"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    ap.add_argument("--out", default=None, help="write all results to this JSON file")
    args = ap.parse_args(argv)
    names = available()
    if args.list:
        print("\n".join(names))
        return 0
    unknown = [n for n in args.names if n not in names]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; available: {names}")
    results = {}
    for name in args.names or names:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        res = importlib.import_module(f"bundle.benchmarks.{name}").run(quick=args.quick)
        res["wall_s"] = round(time.perf_counter() - t0, 2)
        results[name] = res
        print(json.dumps(res, indent=2), flush=True)
    if args.out:
        write_json_atomic(args.out, results, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
