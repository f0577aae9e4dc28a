#!/usr/bin/env python
"""Convert a public chest X-ray dataset (as downloaded) into the bundle's datalist, or compose several.

    python scripts/prepare_data.py nih --root /data/NIH --out data/nih/datalist.json
    python scripts/prepare_data.py vindr --root /data/vindr --out data/vindr/datalist.json --aggregate majority
    python scripts/prepare_data.py chexlocalize --root /data/CheXlocalize --out data/chexlocalize/datalist.json
    python scripts/prepare_data.py compose --config configs/datasets/edema.yaml --out data/edema.json

A summary (counts per split, class, sex, age group, positives with attention, bad rows) is printed and
written beside the datalist as <name>.summary.json. See docs/datasets.md for every dataset.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bundle.data.convert_common import CLASSES, CONVERTERS, ConversionError, prepare  # noqa: E402

#: per-dataset options: argparse dest -> convert() keyword
OPTIONS = {
    "vindr": {"aggregate": "aggregate"},
    "chexpert": {"attention": "attention", "blank": "blank"},
    "chexlocalize": {"attention": "attention"},
    "mimic": {"attention": "attention", "blank": "blank", "age_mode": "age", "min_certainty": "min_certainty"},
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=sorted(CONVERTERS) + ["compose"])
    ap.add_argument("--root", help="the dataset folder as downloaded")
    ap.add_argument("--out", required=True, help="datalist JSON to write (summary goes beside it)")
    ap.add_argument("--config", help="compose: the composition YAML (configs/datasets/*.yaml)")
    ap.add_argument("--data-root", default=None, help="compose: folder the config's datalist paths are relative to")
    ap.add_argument("--check-images", action="store_true",
                    help="open every image header; missing/unreadable images are listed, counted and left out")
    ap.add_argument("--classes", nargs="+", default=None, choices=list(CLASSES), help="conditions to keep")
    ap.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="patient share for validation (if no official)")
    ap.add_argument("--test-fraction", type=float, default=0.2, help="patient share for test (if no official)")
    ap.add_argument("--absolute-paths", action="store_true", help="write absolute image paths")
    ap.add_argument("--aggregate", choices=["any", "majority"], default="any", help="vindr: reader aggregation")
    ap.add_argument("--attention", default=None,
                    help="chexpert/chexlocalize: auto|polygon|rle|both; mimic: all|reflacx|ms-cxr|none")
    ap.add_argument("--blank", type=int, choices=[-1, 0], default=-1,
                    help="chexpert/mimic: label of 'not mentioned' (blank) findings")
    ap.add_argument("--age-mode", choices=["study", "anchor"], default="study", help="mimic: age at study or anchor")
    ap.add_argument("--min-certainty", type=int, default=3, help="mimic: lowest REFLACX ellipse certainty kept")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.dataset == "compose":
            if not args.config:
                ap.error("compose needs --config configs/datasets/<condition>.yaml")
            from bundle.data.compose import compose  # noqa: PLC0415

            compose(args.config, args.out, data_root=args.data_root, check=args.check_images)
            return 0
        if not args.root:
            ap.error(f"{args.dataset} needs --root DIR (the dataset folder as downloaded)")
        opts = {kw: getattr(args, dest) for dest, kw in OPTIONS.get(args.dataset, {}).items()
                if getattr(args, dest) is not None}
        prepare(args.dataset, args.root, args.out, classes=args.classes, seed=args.seed,
                val_fraction=args.val_fraction, test_fraction=args.test_fraction, check=args.check_images,
                absolute_paths=args.absolute_paths, **opts)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
