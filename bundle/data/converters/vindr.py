"""VinDr-CXR -> datalist records (PhysioNet 1.0.0 release and the Kaggle VinBigData ``train.csv``).

PhysioNet layout (datasets.md B2): ``annotations/image_labels_{train,test}.csv`` (image_id, rad_id, 28 0/1
columns; the test file spells ``Other disease``, train ``Other diseases``: columns are matched by name and
only the three used here are required), ``annotations/annotations_{train,test}.csv`` (image_id, rad_id,
class_name, x_min, y_min, x_max, y_max; "No finding" rows have empty coordinates), DICOMs in
``train/{image_id}.dicom`` and ``test/{image_id}.dicom``.

Kaggle VinBigData layout: one ``train.csv`` (image_id, class_name, class_id, rad_id, x_min..y_max) with
class_id 0..14 (14 = No finding; 8 = Nodule/Mass, 10 = Pleural effusion; there is no Edema class, so edema is
-1 = unknown), DICOMs in ``train/``. Its test images carry no labels and are not converted.

Reader aggregation (training images have 3 readers; test labels are a 5-radiologist consensus, one row):
``aggregate="any"`` (default): positive if any reader marks it; ``"majority"``: positive if more than half of
the image's readers do (2 of 3). Boxes of a class are kept (from every reader who drew one) only on images
positive for it after aggregation. Labels are exhaustive per reader, so a finding nobody marks is 0.

Demographics and the box frame come from the DICOM headers, read without pixel data
(``pydicom.dcmread(stop_before_pixels=True)``): PatientSex M/F (O or empty -> unknown), PatientAge "045Y"
(missing for about 13k images -> unknown), Columns x Rows = the frame of the boxes (float pixels, x = column).
When a DICOM is absent, the record keeps its labels with sex/age unknown, and its boxes are dropped (counted:
without Columns x Rows their frame is unknown). VinDr has no patient
identifier, so each image is its own patient (``patient_id`` = image_id).
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
)
from bundle.data.converters.registry import Converter, option

NAME = "vindr"
#: condition -> VinDr label/box class name
LABEL_MAP = {"nodule_mass": "Nodule/Mass", "pleural_effusion": "Pleural effusion", "edema": "Edema"}
#: Kaggle VinBigData class_id -> name (competition definition)
KAGGLE_CLASSES = {
    0: "Aortic enlargement",
    1: "Atelectasis",
    2: "Calcification",
    3: "Cardiomegaly",
    4: "Consolidation",
    5: "ILD",
    6: "Infiltration",
    7: "Lung Opacity",
    8: "Nodule/Mass",
    9: "Other lesion",
    10: "Pleural effusion",
    11: "Pleural thickening",
    12: "Pneumothorax",
    13: "Pulmonary fibrosis",
    14: "No finding",
}
BOX_COLUMNS = {"image_id": [], "rad_id": [], "class_name": [], "x_min": [], "y_min": [], "x_max": [], "y_max": []}
_DICOM_TAGS = ["PatientSex", "PatientAge", "Rows", "Columns", "ViewPosition"]


def _dicom_path(root: Path, split: str, image_id: str) -> Path:
    for ext in (".dicom", ".dcm"):
        p = root / split / f"{image_id}{ext}"
        if p.exists():
            return p
    return root / split / f"{image_id}.dicom"


def read_headers(paths: list[Path], report: ConversionReport) -> pd.DataFrame:
    """Sex, age, Rows, Columns, view from DICOM headers (no pixel data is read). Missing/unreadable counted."""
    import pydicom  # noqa: PLC0415

    rows, missing, bad = [], [], []
    for p in paths:
        if not p.is_file():
            missing.append(str(p))
            rows.append((None, None, None, None, None))
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=_DICOM_TAGS)
            rows.append(
                (ds.get("PatientSex"), ds.get("PatientAge"), ds.get("Rows"), ds.get("Columns"), ds.get("ViewPosition"))
            )
        except Exception as e:  # noqa: BLE001 - any unreadable header is reported, not fatal
            bad.append({"file": str(p), "error": f"{type(e).__name__}: {e}"[:160]})
            rows.append((None, None, None, None, None))
    report.add("DICOM missing (sex/age unknown, boxes dropped)", len(missing), missing, "record kept")
    report.add("DICOM header unreadable (sex/age unknown, boxes dropped)", len(bad), bad, "record kept")
    return pd.DataFrame(rows, columns=["sex", "age", "rows", "cols", "view"], dtype=object)


def _aggregate(df: pd.DataFrame, cols: list[str], how: str) -> pd.DataFrame:
    g = df.groupby("image_id", sort=False)[cols]
    if how == "any":
        return (g.max() > 0).astype(np.int8)
    if how == "majority":
        return (g.mean() > 0.5).astype(np.int8)
    raise ConversionError(f"vindr: aggregate must be 'any' or 'majority', got {how!r}")


def _read_boxes(path: Path, report: ConversionReport, split: str) -> pd.DataFrame:
    df = match_columns(read_csv(path), BOX_COLUMNS, path)
    lines = file_lines(df)
    df["class_name"] = df["class_name"].str.strip()
    df["split"] = split
    return _clean_boxes(df, lines, path, report)


def _clean_boxes(df, lines, path, report):
    xyxy = df[["x_min", "y_min", "x_max", "y_max"]].apply(pd.to_numeric, errors="coerce")
    nofind = df["class_name"].str.lower().eq("no finding").to_numpy()
    nan = xyxy.isna().any(axis=1).to_numpy()
    bad = ~nofind & (nan | (xyxy["x_max"] <= xyxy["x_min"]).to_numpy() | (xyxy["y_max"] <= xyxy["y_min"]).to_numpy())
    if bad.any():
        vals = df.loc[bad, ["class_name", "x_min", "y_min", "x_max", "y_max"]].astype(str).agg(",".join, axis=1)
        report.add_rows("unparsable or empty box", path, lines[bad], vals.tolist(), "box dropped")
    df[["x_min", "y_min", "x_max", "y_max"]] = xyxy
    keep = ~bad
    df, lines = df.loc[keep].reset_index(drop=True), lines[keep]
    df, lines = drop_duplicates(
        df, ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"], report, path, lines
    )
    return df


def _physionet(root: Path, ann: Path, report: ConversionReport, aggregate: str):
    cols = list(LABEL_MAP.values())
    spec = {"image_id": [], "rad_id": [], **{c: [] for c in cols}}
    labels, boxes = [], []
    for split in ("train", "test"):
        p = find_file(ann, [f"image_labels_{split}.csv"], f"image_labels_{split}.csv", required=(split == "train"))
        if p is None:
            report.note(f"annotations/image_labels_{split}.csv not found: no {split} images")
            continue
        report.files[f"labels_{split}"] = str(p)
        df = match_columns(read_csv(p), spec, p, optional=["rad_id"])
        lines = file_lines(df)
        if "rad_id" not in df:  # consensus files may come without reader ids: one reader per row
            df["rad_id"] = [f"row{i}" for i in lines]
        df["image_id"] = df["image_id"].str.strip()
        vals = df[cols].apply(pd.to_numeric, errors="coerce")
        bad = ~vals.isin([0, 1]).all(axis=1).to_numpy()
        if bad.any():
            report.add_rows(
                "unparsable 0/1 label",
                p,
                lines[bad],
                df.loc[bad, cols].astype(str).agg(",".join, axis=1),
                "reader row dropped",
            )
        df = df.loc[~bad].copy()
        df[cols] = vals.loc[~bad].astype(np.int8)
        df, _ = drop_duplicates(df, ["image_id", "rad_id"], report, p, lines[~bad])
        agg = _aggregate(df, cols, aggregate)
        agg["split"] = split
        agg["n_readers"] = df.groupby("image_id", sort=False).size()
        labels.append(agg)
        bp = find_file(ann, [f"annotations_{split}.csv"], "", required=False)
        if bp is None:
            report.note(f"annotations/annotations_{split}.csv not found: no {split} boxes")
        else:
            report.files[f"boxes_{split}"] = str(bp)
            boxes.append(_read_boxes(bp, report, split))
    lab = pd.concat(labels)
    dup = lab.index.duplicated()
    if dup.any():
        report.add(
            "image in both train and test label files",
            int(dup.sum()),
            lab.index[dup].tolist()[:5],
            "train occurrence kept",
        )
        lab = lab.loc[~dup]
    box = pd.concat(boxes, ignore_index=True) if boxes else pd.DataFrame(columns=[*BOX_COLUMNS, "split"])
    lab_arr = np.stack([lab[LABEL_MAP[c]].to_numpy() for c in CLASSES], axis=1).astype(np.int8)
    return lab.index.to_numpy(), lab["split"].to_numpy(), lab_arr, box


def _kaggle(root: Path, path: Path, report: ConversionReport, aggregate: str):
    df = read_csv(path)
    spec = {
        "image_id": [],
        "rad_id": [],
        "class_id": [],
        "x_min": [],
        "y_min": [],
        "x_max": [],
        "y_max": [],
        "class_name": [],
    }
    df = match_columns(df, spec, path, optional=["class_id", "class_name"])
    if "class_id" not in df and "class_name" not in df:
        raise ConversionError(f"{path}: needs a 'class_id' (0..14) or 'class_name' column; found {list(df.columns)}")
    lines = file_lines(df)
    df["image_id"] = df["image_id"].str.strip()
    if "class_id" in df:
        cid = pd.to_numeric(df["class_id"], errors="coerce")
        name = cid.map(KAGGLE_CLASSES)
        bad = name.isna().to_numpy()
        if bad.any():
            report.add_rows("class_id not in 0..14", path, lines[bad], df.loc[bad, "class_id"].tolist(), "row dropped")
        df["class_name"] = name
        df, lines = df.loc[~bad].reset_index(drop=True), lines[~bad]
    else:
        df["class_name"] = df["class_name"].str.strip()
    df["split"] = "train"
    box = _clean_boxes(df, lines, path, report)
    # labels from the rows (every kept row, including those whose box was bad: the reader still said so)
    df["one"] = 1
    names = [LABEL_MAP["nodule_mass"], LABEL_MAP["pleural_effusion"]]
    marks = (
        df.pivot_table(index=["image_id", "rad_id"], columns="class_name", values="one", aggfunc="max")
        .reindex(columns=names)
        .fillna(0)
        .reset_index()
    )
    agg = _aggregate(marks, names, aggregate)
    ids = agg.index.to_numpy()
    lab = np.stack([agg[names[0]].to_numpy(), agg[names[1]].to_numpy(), np.full(len(agg), -1)], 1).astype(np.int8)
    report.note("VinBigData train.csv has no Edema class: edema = -1 (unknown)")
    return ids, np.full(len(ids), "train", dtype=object), lab, box


def convert(
    root: str | os.PathLike, report: ConversionReport | None = None, aggregate: str = "any"
) -> tuple[list[dict], ConversionReport]:
    """Records for every labelled image; ``aggregate`` = "any" | "majority" over the readers."""
    if aggregate not in ("any", "majority"):
        raise ConversionError(f"vindr: aggregate must be 'any' or 'majority', got {aggregate!r}")
    root = Path(root).resolve()
    report = report or ConversionReport(NAME)
    ann_dir = next((d for d in (root / "annotations", root) if (d / "image_labels_train.csv").is_file()), None)
    kaggle = find_file(root, ["train.csv"], "", required=False) if ann_dir is None else None
    if ann_dir is not None:
        report.note(f"PhysioNet layout; reader aggregation: {aggregate}")
        ids, split, labels, box = _physionet(root, ann_dir, report, aggregate)
    elif kaggle is not None:
        report.files["train_csv"] = str(kaggle)
        report.note(f"Kaggle VinBigData train.csv; reader aggregation: {aggregate}")
        ids, split, labels, box = _kaggle(root, kaggle, report, aggregate)
    else:
        find_file(
            root,
            ["annotations/image_labels_train.csv", "image_labels_train.csv", "train.csv"],
            "VinDr-CXR labels: annotations/image_labels_train.csv (PhysioNet) or train.csv (Kaggle VinBigData)",
        )

    paths = [_dicom_path(root, s, i) for s, i in zip(split, ids, strict=False)]
    hdr = read_headers(paths, report)
    sex = parse_sex(hdr["sex"].astype("string"))
    age = parse_age(hdr["age"].astype("string"), report, "DICOM PatientAge", np.arange(len(ids)), column="PatientAge")
    view = hdr["view"].astype("string").str.strip().str.upper().replace("", pd.NA).fillna("unknown").tolist()
    frame = {
        i: ([int(c), int(r)] if c is not None and r is not None else None)
        for i, c, r in zip(ids, hdr["cols"], hdr["rows"], strict=False)
    }

    att: dict[str, list[dict]] = {}
    cls_of = {v.lower(): k for k, v in LABEL_MAP.items()}
    if len(box):
        box = box.assign(cls=box["class_name"].str.lower().map(cls_of)).dropna(subset=["cls"])
        lab_of = dict(zip(ids, labels.tolist(), strict=False))
        ci = {c: i for i, c in enumerate(CLASSES)}
        dropped = noframe = 0
        for img, c, x0, y0, x1, y1 in zip(
            box["image_id"], box["cls"], box["x_min"], box["y_min"], box["x_max"], box["y_max"], strict=False
        ):
            lab = lab_of.get(img)
            if lab is None or lab[ci[c]] != 1:
                dropped += 1
                continue
            if frame.get(img) is None:
                noframe += 1
                continue
            att.setdefault(img, []).append(
                {
                    "class": c,
                    "type": "bbox_xyxy",
                    "coords": [float(x0), float(y0), float(x1), float(y1)],
                    "frame": frame.get(img),
                }
            )
        report.add(
            "box of an image whose DICOM header is unavailable (frame unknown)",
            noframe,
            [],
            "box dropped (labels kept); supply the DICOM to keep it",
        )
        if dropped:
            report.add("box on an image negative (or unlabelled) after reader aggregation", dropped, [], "box dropped")
    recs = [
        {
            "image": str(p),
            "label": lab,
            "attention": att.get(i, []),
            "sex": s,
            "age": a,
            "patient_id": str(i),
            "dataset": NAME,
            "view": v,
            "split_source": sp,
        }
        for p, i, lab, s, a, v, sp in zip(paths, ids, labels.tolist(), sex, age_list(age), view, split, strict=False)
    ]
    return recs, report


CONVERTERS = (
    Converter(
        NAME,
        convert,
        "VinDr-CXR (PhysioNet annotations/ or Kaggle train.csv)",
        options=(option("--aggregate", choices=["any", "majority"], default="any", help="reader aggregation"),),
    ),
)
