"""NIH ChestX-ray14 -> datalist records.

Reads, as distributed (shared/docs/datasets.md B1):
- ``Data_Entry_2017_v2020.csv`` (preferred when present: corrected ages) or ``Data_Entry_2017.csv``; columns are
  matched by name, so the bracketed ``OriginalImage[Width,Height]`` headers that pandas splits and the trailing
  comma of the 2017 file (``Unnamed: 11``) do not matter; ``Patient Gender`` and ``Patient Sex`` both work;
  ages may be integers or DICOM-style "058Y".
- ``BBox_List_2017.csv``: its header ``Bbox [x,y,w,h],,,`` splits into nonsense names, so the six columns are
  read by position (image, finding, x, y, w, h); ``Infiltrate`` (not ``Infiltration``) is accepted.
- ``train_val_list.txt`` / ``test_list.txt``: the official, patient-disjoint split.
- images in ``images_001..012/images/*.png`` or a flat ``images/`` folder, located by listing folders (never read).

Labels: Nodule or Mass -> nodule_mass, Effusion -> pleural_effusion, Edema -> edema; the labels are mined from
the reports and exhaustive, so an absent finding is 0 (negative), never unknown. Attention: boxes of Nodule,
Mass and Effusion as ``bbox_xywh`` in the 1024x1024 PNG frame (there are no Edema boxes).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from bundle.data.converters.common import (
    CLASSES,
    ConversionError,
    ConversionReport,
    age_list,
    drop_duplicates,
    file_lines,
    find_file,
    match_columns,
    parse_age,
    parse_sex,
    read_csv,
    require_key,
)
from bundle.data.converters.registry import Converter

NAME = "nih"
FRAME = [1024, 1024]
FINDINGS = {
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Infiltrate",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
    "No Finding",
}
#: condition -> NIH finding names that make it positive
LABEL_MAP = {"nodule_mass": ("Nodule", "Mass"), "pleural_effusion": ("Effusion",), "edema": ("Edema",)}
#: BBox_List "Finding Label" -> condition (the other boxed findings are not conditions of this bundle)
BOX_MAP = {"Nodule": "nodule_mass", "Mass": "nodule_mass", "Effusion": "pleural_effusion"}

ENTRY_COLUMNS = {
    "image": ["Image Index"],
    "findings": ["Finding Labels"],
    "patient_id": ["Patient ID"],
    "age": ["Patient Age"],
    "sex": ["Patient Gender", "Patient Sex"],
    "view": ["View Position"],
}
ENTRY_FILES = [
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017.csv",
    "Data_Entry_2017*.csv",
    "Data_Entry*.csv",
    "*/Data_Entry_2017_v2020.csv",
    "*/Data_Entry_2017*.csv",
]


def _image_index(root: Path) -> dict[str, str]:
    """image name -> absolute path, by listing the image folders of the distribution (no file is opened)."""
    found: dict[str, str] = {}
    dirs = sorted(root.glob("images_*/images")) + sorted(root.glob("images_*")) + [root / "images"]
    for d in dirs:
        if not d.is_dir():
            continue
        with os.scandir(d) as it:
            for e in it:
                if e.name.lower().endswith(".png"):
                    found.setdefault(e.name, e.path)
    return found


def _read_list(path: Path | None) -> set[str]:
    if path is None:
        return set()
    with open(path) as f:
        return {ln.strip() for ln in f if ln.strip()}


def read_boxes(path: Path, report: ConversionReport) -> pd.DataFrame:
    """BBox_List_2017.csv by position -> DataFrame(image, finding, x, y, w, h, line), bad rows counted."""
    raw = read_csv(path)
    if raw.shape[1] < 6:
        raise ConversionError(
            f"{path}: expected 6 columns (Image Index, Finding Label, x, y, w, h), found {raw.shape[1]}: "
            f"{list(map(str, raw.columns))}. Fix: use BBox_List_2017.csv as distributed."
        )
    first = str(raw.columns[0]).strip().lower()
    if first != "image index":
        raise ConversionError(
            f"{path}: first column must be 'Image Index', found {str(raw.columns[0])!r} (columns: "
            f"{list(map(str, raw.columns))}). Fix: use BBox_List_2017.csv as distributed, header included."
        )
    df = raw.iloc[:, :6].copy()
    df.columns = ["image", "finding", "x", "y", "w", "h"]
    lines = file_lines(df)
    df["image"] = df["image"].str.strip()
    df["finding"] = df["finding"].str.strip()
    xywh = df[["x", "y", "w", "h"]].apply(pd.to_numeric, errors="coerce")
    bad = (
        xywh.isna().any(axis=1).to_numpy()
        | (xywh[["w", "h"]] <= 0).any(axis=1).to_numpy()
        | df["image"].isna().to_numpy()
    )
    if bad.any():
        vals = df.loc[bad, ["x", "y", "w", "h"]].astype(str).agg(",".join, axis=1).tolist()
        report.add_rows("unparsable box", path, lines[bad], vals, "box dropped")
    df[["x", "y", "w", "h"]] = xywh
    df["line"] = lines
    df = df.loc[~bad].reset_index(drop=True)
    df, _ = drop_duplicates(
        df.drop(columns="line"), ["image", "finding", "x", "y", "w", "h"], report, path, df["line"].to_numpy()
    )
    return df


def convert(root: str | os.PathLike, report: ConversionReport | None = None) -> tuple[list[dict], ConversionReport]:
    """Records (absolute image paths, labels in CLASSES order) and the report of what was dropped or repaired."""
    root = Path(root).resolve()
    report = report or ConversionReport(NAME)
    entry_path = find_file(root, ENTRY_FILES, "the NIH label table Data_Entry_2017.csv")
    report.files["entries"] = str(entry_path)
    df = match_columns(read_csv(entry_path), ENTRY_COLUMNS, entry_path)[list(ENTRY_COLUMNS)]
    lines = file_lines(df)

    df, lines = require_key(df, "image", report, entry_path, lines, "Image Index")

    # findings: normalise separators, one-hot by token (vectorised), unknown tokens counted
    findings = df["findings"].fillna("").str.replace(r"\s*\|\s*", "|", regex=True).str.strip()
    onehot = findings.str.get_dummies(sep="|")
    unknown = [c for c in onehot.columns if c not in FINDINGS]
    if unknown:
        m = onehot[unknown].any(axis=1).to_numpy()
        report.add_rows(
            f"unknown finding label(s) {sorted(unknown)[:10]}",
            entry_path,
            lines[m],
            findings[m].tolist(),
            "token ignored, other labels kept",
        )
    empty = (findings == "").to_numpy()
    labels = np.zeros((len(df), len(CLASSES)), dtype=np.int8)
    for ci, c in enumerate(CLASSES):
        cols = [f for f in LABEL_MAP[c] if f in onehot.columns]
        if cols:
            labels[:, ci] = onehot[cols].any(axis=1).to_numpy()
    if empty.any():
        report.add_rows("empty Finding Labels", entry_path, lines[empty], action="labels set to -1 (unknown)")
        labels[empty] = -1

    age = parse_age(df["age"], report, entry_path, lines, column="Patient Age")
    sex = parse_sex(df["sex"])
    pid = df["patient_id"].str.strip()
    num = pd.to_numeric(pid, errors="coerce")
    pid = pid.where(num.isna(), num.astype("Int64").astype("string"))  # "00012" and "12" are one patient
    missing_pid = pid.isna().to_numpy()
    if missing_pid.any():
        from_name = df["image"].str.extract(r"^(\d+)_")[0]
        fallback = pd.to_numeric(from_name, errors="coerce").astype("Int64").astype("string")
        report.add_rows(
            "missing Patient ID",
            entry_path,
            lines[missing_pid],
            df.loc[missing_pid, "image"].tolist(),
            "taken from the image name prefix",
        )
        pid = pid.fillna(fallback).fillna(df["image"])
    view = df["view"].fillna("unknown").str.strip().str.upper()

    # official split
    tv = _read_list(find_file(root, ["train_val_list.txt", "*/train_val_list.txt"], "", required=False))
    te = _read_list(find_file(root, ["test_list.txt", "*/test_list.txt"], "", required=False))
    if not tv and not te:
        report.note("train_val_list.txt / test_list.txt not found: patient-level split of all images")
        split = np.full(len(df), None, dtype=object)
    else:
        names = df["image"].tolist()  # set membership in Python: Series.isin on arrow strings is ~100x slower
        in_te = np.fromiter((n in te for n in names), bool, len(names))
        in_tv = np.fromiter((n in tv for n in names), bool, len(names))
        split = np.where(in_te, "test", np.where(in_tv, "train_val", None))
        both = in_te & in_tv
        if both.any():
            report.add_rows(
                "image in both train_val_list and test_list",
                entry_path,
                lines[both],
                df.loc[both, "image"].tolist(),
                "kept in test",
            )
        neither = ~in_te & ~in_tv
        if neither.any():
            report.add_rows(
                "image in neither official list",
                entry_path,
                lines[neither],
                df.loc[neither, "image"].tolist(),
                "split by patient with the training pool",
            )

    # boxes
    att: dict[str, list[dict]] = {}
    box_path = find_file(root, ["BBox_List_2017.csv", "BBox_List*.csv", "*/BBox_List_2017.csv"], "", required=False)
    if box_path is None:
        report.note("BBox_List_2017.csv not found: no attention")
    else:
        report.files["boxes"] = str(box_path)
        boxes = read_boxes(box_path, report)
        table_images = set(df["image"].tolist())
        known = np.array([i in table_images for i in boxes["image"].tolist()], dtype=bool)
        if (~known).any():
            report.add(
                "box for an image not in the label table",
                int((~known).sum()),
                boxes.loc[~known, "image"].tolist()[:5],
                "box dropped",
                file=box_path.name,
            )
        boxes = boxes.loc[known]
        cls = boxes["finding"].map(BOX_MAP)
        other = cls.isna()
        if other.any():
            report.note(
                f"{int(other.sum())} boxes of findings that are not conditions here ignored "
                f"({sorted(boxes.loc[other, 'finding'].unique().tolist())})"
            )
        boxes = boxes.loc[~other].assign(cls=cls[~other])
        lab_of = dict(zip(df["image"], map(tuple, labels), strict=False))
        ci = boxes["cls"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
        inconsistent = np.array([lab_of[i][c] != 1 for i, c in zip(boxes["image"], ci, strict=False)], dtype=bool)
        if inconsistent.any():
            report.add(
                "box whose finding is absent from the image's Finding Labels",
                int(inconsistent.sum()),
                boxes.loc[inconsistent, ["image", "finding"]].astype(str).agg(":".join, axis=1).tolist()[:5],
                "box kept (training uses attention of positive labels only)",
                file=box_path.name,
            )
        for img, c, x, y, w, h in zip(
            boxes["image"], boxes["cls"], boxes["x"], boxes["y"], boxes["w"], boxes["h"], strict=False
        ):
            att.setdefault(img, []).append(
                {"class": c, "type": "bbox_xywh", "coords": [float(x), float(y), float(w), float(h)], "frame": FRAME}
            )

    index = _image_index(root)
    if not index:
        report.note("no image folders (images_*/images or images/) found: paths point to images/<name>")
    elif len(index) < len(df):
        report.note(
            f"{sum(i not in index for i in df['image'].tolist())} images of the table are not on disk "
            f"(use --check-images to leave them out)"
        )
    flat = str(root / "images")
    names = df["image"].to_numpy(dtype=object)  # iterate numpy objects: iterating arrow strings is ~10x slower
    paths = [index.get(i) or f"{flat}/{i}" for i in names]
    recs = [
        {
            "image": p,
            "label": lab,
            "attention": att.get(img, []),
            "sex": s,
            "age": a,
            "patient_id": pi,
            "dataset": NAME,
            "view": v,
            "split_source": sp,
        }
        for p, img, lab, s, a, pi, v, sp in zip(
            paths,
            names,
            labels.tolist(),
            sex,
            age_list(age),
            pid.to_numpy(dtype=object),
            view.to_numpy(dtype=object),
            split.tolist(),
            strict=False,
        )
    ]
    return recs, report


CONVERTERS = (Converter(NAME, convert, "NIH ChestX-ray14 (Data_Entry_2017*.csv, BBox_List_2017.csv)"),)
