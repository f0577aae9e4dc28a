#!/usr/bin/env python
"""Convert a public chest X-ray dataset (as downloaded) into the bundle's datalist, or compose several.

    python scripts/prepare_data.py nih --root /data/NIH --out data/nih/datalist.json
    python scripts/prepare_data.py vindr --root /data/vindr --out data/vindr/datalist.json --aggregate majority
    python scripts/prepare_data.py chexlocalize --root /data/CheXlocalize --out data/chexlocalize/datalist.json
    python scripts/prepare_data.py compose --config configs/datasets/edema.yaml --out data/edema.json

A summary (counts per split, class, sex, age group, positives with attention, bad rows) is printed and
written beside the datalist as <name>.summary.json. See docs/datasets.md for every dataset;
``prepare_data.py <dataset> --help`` lists a dataset's own options.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bundle.data.converters import ConversionError, commands  # noqa: E402


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser with one sub-command per registered converter (and compose), and the sub-parsers by name."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="dataset", required=True, metavar="dataset")
    parsers = {}
    for name, cmd in commands().items():
        parsers[name] = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(parsers[name])
    return ap, parsers


def main(argv=None) -> int:
    ap, parsers = build_parser()
    args = ap.parse_args(argv)
    try:
        commands()[args.dataset].run(args, parsers[args.dataset])
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
