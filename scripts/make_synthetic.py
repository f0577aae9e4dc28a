#!/usr/bin/env python
"""Generate the built-in synthetic chest X-ray benchmark (docs/synthetic.md).

    python scripts/make_synthetic.py --out data/synthetic --seed 0
    python scripts/make_synthetic.py --out /tmp/syn --seed 1 --n-train 600 --workers 2 --force
    python scripts/make_synthetic.py --out data/synthetic --sample-grid docs/images/synthetic_samples.png

Writes DIR/datalist.json, DIR/synthetic_summary.json, DIR/images/<split>/ and DIR/masks/<split>/.
Same seed and parameters -> the same bytes, whatever --workers. An up-to-date DIR is left alone
unless --force is given.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bundle.data import synthetic  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (replaced atomically)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=None, help="training images (default 2400)")
    ap.add_argument("--n-val", type=int, default=None, help="validation images (default 400)")
    ap.add_argument("--n-test", type=int, default=None, help="site A test images (default 600)")
    ap.add_argument("--n-ood", type=int, default=None, help="site B test_ood images (default 600)")
    ap.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="any other generator parameter, e.g. --param 'shortcut_weak=[0.5,0.5]' (repeatable)",
    )
    ap.add_argument("--workers", type=int, default=None, help="processes (default: min(4, CPUs)); output is identical")
    ap.add_argument("--force", action="store_true", help="regenerate even if DIR is up to date")
    ap.add_argument("--sample-grid", default=None, metavar="PNG", help="also write a grid of samples with masks")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    params = {
        k: v
        for k, v in {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test, "n_ood": args.n_ood}.items()
        if v is not None
    }
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--param needs KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value  # plain strings, e.g. strong_rule=sex
    try:
        path = synthetic.ensure_synthetic(
            args.out, seed=args.seed, workers=args.workers, progress=not args.quiet, force=args.force, **params
        )
    except ValueError as e:
        ap.error(str(e))
    summary = os.path.join(os.path.dirname(path), synthetic.SUMMARY_NAME)
    print(f"datalist: {path}\nsummary:  {summary}")
    if args.sample_grid:
        print(f"samples:  {synthetic.save_sample_grid(path, args.sample_grid)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
