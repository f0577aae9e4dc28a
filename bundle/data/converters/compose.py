"""Compose per-dataset datalists into the paper's training/evaluation datalist of one condition.

A composition config (``configs/datasets/*.yaml``, documented in docs/datasets.md) names the training datasets,
the out-of-domain test datasets and the classes:

    name: edema
    classes: [edema]
    seed: 0
    val_fraction: 0.1
    test_fraction: 0.2
    train:
      - {dataset: nih, datalist: data/nih/datalist.json}
      - {dataset: mimic, datalist: data/mimic/datalist.json, views: [PA, AP]}
    ood:
      - {dataset: chexpert, datalist: data/chexlocalize/datalist.json, split: test_ood}

Rules (why): patient ids are prefixed with the dataset name ("nih:123"), because ids of different datasets
collide; every training dataset is re-split by patient on its own (seeded; official validation/test splits
kept, see ``common.assign_splits``), so no patient crosses splits and every source appears in
every split; labels and attention are re-indexed to ``classes`` (``rename`` maps a dataset's class names);
records whose labels are all unknown for the selected classes carry no training signal and are dropped
(counted; ``keep_unlabelled: true`` keeps them); ``dataset`` stays on every record so fairness can be cut by
source. OOD datasets go whole (or ``from_splits``) into their own split (default ``test_ood``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from bundle.data.converters.common import (
    CLASSES,
    ConversionError,
    ConversionReport,
    assign_splits,
    check_images,
    select_classes,
    write_datalist,
)
from bundle.data.converters.registry import Command, add_output_arguments
from bundle.data.datalist import load as load_datalist

__all__ = ["COMMAND", "compose", "compose_datalists", "load_config"]

_META_KEYS = {"name", "classes", "description", "metadata"}


def load_config(path: str | os.PathLike) -> dict:
    import yaml  # noqa: PLC0415

    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConversionError(f"{path}: cannot read the composition config ({e})") from e
    if not isinstance(cfg, dict) or not cfg.get("train") and not cfg.get("ood"):
        raise ConversionError(
            f"{path}: a composition config needs a 'train' and/or 'ood' list of "
            "{dataset: <name>, datalist: <path>} entries (see configs/datasets/edema.yaml)"
        )
    return cfg


def _read_datalist(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(
            f"datalist {path} not found. Fix: create it first with "
            f"`python scripts/prepare_data.py <dataset> --root ... --out {path}`"
        )
    return load_datalist(path)


def _records(entry: Mapping, data_root: Path, classes: list[str], report: ConversionReport, keep_unlabelled: bool):
    if "dataset" not in entry or "datalist" not in entry:
        raise ConversionError(f"composition entry {dict(entry)} needs 'dataset' and 'datalist' keys")
    name = str(entry["dataset"])
    path = Path(entry["datalist"])
    path = path if path.is_absolute() else (data_root / path)
    dl = _read_datalist(path)
    base = path.resolve().parent
    src_classes = list(dl.get("classes", CLASSES))
    want = list(entry.get("from_splits", []) or [])
    out = []
    for split, recs in dl.items():
        if split in _META_KEYS or not isinstance(recs, list) or (want and split not in want):
            continue
        out.extend(recs)
    out = select_classes(out, src_classes, classes, entry.get("rename"))
    views = entry.get("views")
    kept = []
    n_view = n_unl = 0
    for r in out:
        if views and str(r.get("view", "")).upper() not in {str(v).upper() for v in views}:
            n_view += 1
            continue
        if not keep_unlabelled and all(v == -1 for v in r["label"]):
            n_unl += 1
            continue
        img = r["image"]
        r["image"] = img if os.path.isabs(img) else str((base / img).resolve())
        r["dataset"] = r.get("dataset") or name
        r["patient_id"] = f"{name}:{r.get('patient_id', r['image'])}"
        kept.append(r)
    report.add(f"{name}: records of other views than {views}", n_view, [], "left out")
    report.add(f"{name}: records with every selected label unknown", n_unl, [], "left out")
    report.files[name] = str(path)
    return name, kept


def compose_datalists(cfg: Mapping, data_root: str | os.PathLike = ".", report: ConversionReport | None = None) -> dict:
    """The composed datalist (absolute image paths) from a config mapping."""
    report = report or ConversionReport(str(cfg.get("name", "composed")))
    classes = list(cfg.get("classes") or CLASSES)
    seed = int(cfg.get("seed", 0))
    val, test = float(cfg.get("val_fraction", 0.1)), float(cfg.get("test_fraction", 0.2))
    keep_unl = bool(cfg.get("keep_unlabelled", False))
    data_root = Path(data_root)
    out: dict = {"name": cfg.get("name", "composed"), "classes": classes, "training": [], "validation": [], "test": []}
    for entry in cfg.get("train") or []:
        name, recs = _records(entry, data_root, classes, report, keep_unl)
        parts = assign_splits(
            recs,
            float(entry.get("val_fraction", val)),
            float(entry.get("test_fraction", test)),
            seed,
            report,
            respect_official=bool(entry.get("respect_official", True)),
        )
        for split, rs in parts.items():
            out[split].extend(rs)
    for entry in cfg.get("ood") or []:
        name, recs = _records(entry, data_root, classes, report, keep_unl)
        out.setdefault(str(entry.get("split", "test_ood")), []).extend(recs)
    seen: dict[str, str] = {}
    for split, recs in out.items():
        if split in _META_KEYS:
            continue
        for r in recs:
            prev = seen.setdefault(r["patient_id"], split)
            if prev != split:
                raise ConversionError(
                    f"patient {r['patient_id']} is in both {prev!r} and {split!r}: the same dataset "
                    "is listed twice (train and ood?). Fix the composition config."
                )
    return {k: v for k, v in out.items() if k in _META_KEYS or v}


def compose(
    config: str | os.PathLike | Mapping,
    out: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    check: bool = False,
    absolute_paths: bool = False,
    verbose: bool = True,
) -> tuple[dict, dict]:
    """Compose, write ``out`` (+ ``<stem>.summary.json``). Config paths are relative to ``data_root`` (default:
    the config's ``data_root`` key, else the current directory). Returns (datalist, summary)."""
    cfg = load_config(config) if not isinstance(config, Mapping) else dict(config)
    data_root = data_root or cfg.get("data_root") or "."
    report = ConversionReport(str(cfg.get("name", "composed")))
    dl = compose_datalists(cfg, data_root, report)
    outp = Path(out).resolve()
    for split, recs in dl.items():
        if split in _META_KEYS:
            continue
        if check:
            recs[:] = check_images(recs, report)
        if not absolute_paths:
            for r in recs:
                r["image"] = os.path.relpath(r["image"], outp.parent)
    return dl, write_datalist(dl, outp, report, verbose=verbose)


def _add_arguments(parser):
    parser.add_argument("--config", help="the composition YAML (configs/datasets/*.yaml)")
    parser.add_argument("--data-root", default=None, help="folder the config's datalist paths are relative to")
    add_output_arguments(parser)


def _run(args, parser):
    if not args.config:
        parser.error("compose needs --config configs/datasets/<condition>.yaml")
    return compose(args.config, args.out, data_root=args.data_root, check=args.check_images)


#: ``prepare_data.py compose --config configs/datasets/<condition>.yaml --out ...``
COMMAND = Command("compose", "compose per-dataset datalists into one condition's datalist", _add_arguments, _run)
