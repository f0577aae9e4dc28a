"""CheXpert (train.csv / valid.csv) and CheXlocalize (val/test labels + polygon and RLE annotations) -> records.

CheXpert (datasets.md B3): ``train.csv`` and ``valid.csv`` in ``CheXpert-v1.0-small/`` or ``CheXpert-v1.0/``
(``--root`` may be that folder or its parent). ``Path`` carries either prefix; images are found relative to
the folder that holds the CSV. Sex Male/Female/Unknown; Age 0 is a placeholder (-> unknown, counted).
Labels: Lung Lesion -> nodule_mass, Pleural Effusion -> pleural_effusion, Edema -> edema; 1 -> 1, 0 -> 0,
-1 (uncertain) -> -1, blank (not mentioned) -> -1 (``blank=0`` makes "not mentioned" negative instead).
Official split: train -> training pool, valid -> validation. If CheXlocalize annotations are found under
``--root`` they are attached to the matching valid images.

CheXlocalize: ``CheXpert/{val,test}_labels.csv`` (0/1 radiologist labels; Sex/Age used when present; the test
labels are said to have none, UNCONFIRMED, so demographics are also taken from a CheXpert ``valid.csv`` or a
``CHEXPERT DEMO`` table (.csv, or .xlsx with openpyxl) found under ``--root``), and
``CheXlocalize/gt_annotations_{val,test}.json`` (polygons, ``img_size`` = [h, w], points [x, y] in
full-resolution pixels; one attention entry per contour, ``frame`` = [w, h]) and
``CheXlocalize/gt_segmentations_{val,test}.json`` (pycocotools RLE ``{"size": [h, w], "counts": str}``; all ten
pathologies are present, all-zero when negative: empty masks are skipped). ``attention="auto"`` uses the
polygons of a CXR when they exist and its RLE otherwise; "polygon", "rle" and "both" force a choice.
The CXR id is ``patientX_studyY_viewZ_frontal`` (the Path without split prefix and extension, joined by "_").
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
    find_files,
    match_columns,
    parse_age,
    parse_sex,
    parse_tristate,
    read_csv,
    read_json_file,
)
from bundle.data.converters.registry import BLANK_OPTION, Converter, option

NAME = "chexpert"
#: condition -> CheXpert / CheXlocalize pathology name
LABEL_MAP = {"nodule_mass": "Lung Lesion", "pleural_effusion": "Pleural Effusion", "edema": "Edema"}
COLUMNS = {
    "path": ["Path"],
    "sex": ["Sex"],
    "age": ["Age"],
    "frontal_lateral": ["Frontal/Lateral"],
    "ap_pa": ["AP/PA"],
    **{v: [] for v in LABEL_MAP.values()},
}
_ID_RX = r"(patient\d+)/(study\d+)/([^/]+?)\.[A-Za-z]+$"


def cxr_ids(paths: pd.Series) -> pd.Series:
    """CheXlocalize ids (patient64541_study1_view1_frontal) from CheXpert paths of any prefix."""
    m = paths.str.replace("\\", "/", regex=False).str.extract(_ID_RX)
    return m[0] + "_" + m[1] + "_" + m[2]


def read_labels(
    path: Path, report: ConversionReport, blank: int, split_source: str, image_base: Path | None = None
) -> pd.DataFrame:
    """One CheXpert-style label CSV -> DataFrame(cxr_id, image, patient_id, sex, age, view, labels..., split)."""
    df = match_columns(read_csv(path), COLUMNS, path, optional=["sex", "age", "frontal_lateral", "ap_pa"])
    lines = file_lines(df)
    df["path"] = df["path"].str.strip()
    df, lines = drop_duplicates(df, "path", report, path, lines)
    out = pd.DataFrame({"cxr_id": cxr_ids(df["path"])})
    bad = out["cxr_id"].isna().to_numpy()
    if bad.any():
        report.add_rows(
            "Path not of the form .../patientN/studyN/viewN_*.jpg",
            path,
            lines[bad],
            df.loc[bad, "path"].tolist(),
            "row dropped",
        )
        df, out, lines = df.loc[~bad].reset_index(drop=True), out.loc[~bad].reset_index(drop=True), lines[~bad]
    out["patient_id"] = out["cxr_id"].str.extract(r"^(patient\d+)")[0]
    rel = df["path"].str.replace("\\", "/", regex=False)
    if image_base is None:  # CheXpert: Path is relative to the parent of the folder holding the CSV
        folder = path.parent.name
        first = rel.str.split("/").str[0]
        rest = rel.str.split("/", n=1).str[1]
        prefixed = first.str.startswith("CheXpert-v1.0").fillna(False)
        out["image"] = np.where(
            first == folder,
            str(path.parent.parent) + "/" + rel,
            np.where(prefixed, str(path.parent) + "/" + rest.fillna(""), str(path.parent) + "/" + rel),
        )
    else:  # CheXlocalize: images under <labels folder>/<val|test>/patientX/studyY/viewZ.jpg
        tail = rel.str.extract(r"(patient\d+/study\d+/[^/]+)$")[0]
        out["image"] = str(image_base) + "/" + tail
    out["sex"] = parse_sex(df["sex"]) if "sex" in df else "unknown"
    out["age"] = (
        parse_age(df["age"], report, path, lines, zero_is_missing=True, column="Age") if "age" in df else np.nan
    )
    view = df["ap_pa"].str.strip().str.upper() if "ap_pa" in df else pd.Series(pd.NA, index=df.index, dtype="string")
    if "frontal_lateral" in df:
        lat = df["frontal_lateral"].str.strip().str.lower().eq("lateral").fillna(False)
        view = view.mask(view.isna() & lat, "LATERAL")
    out["view"] = view.fillna("unknown").to_numpy()
    for c in CLASSES:
        out[c] = parse_tristate(df[LABEL_MAP[c]], report, path, lines, LABEL_MAP[c], blank=blank)
    out["split_source"] = split_source
    return out


def read_annotations(folder: Path, splits: list[str], report: ConversionReport, mode: str = "auto") -> dict:
    """cxr_id -> attention entries from gt_annotations_* (polygons) and gt_segmentations_* (RLE) JSON files."""
    if mode not in ("auto", "polygon", "rle", "both"):
        raise ConversionError(f"chexlocalize attention must be auto|polygon|rle|both, got {mode!r}")
    from pycocotools import mask as mask_utils  # noqa: PLC0415

    names = {v: k for k, v in LABEL_MAP.items()}
    poly: dict[str, list] = {}
    rle: dict[str, list] = {}
    for split in splits:
        pa = find_file(folder, [f"gt_annotations_{split}.json", f"*/gt_annotations_{split}.json"], "", False)
        if pa is not None and mode != "rle":
            report.files[f"polygons_{split}"] = str(pa)
            bad = []
            for cid, entry in read_json_file(pa, "CheXlocalize").items():
                size = entry.get("img_size") if isinstance(entry, dict) else None
                if not (isinstance(size, list) and len(size) == 2):
                    bad.append(cid)
                    continue
                frame = [int(size[1]), int(size[0])]  # img_size is [h, w]; frame is [w, h]
                for patho, contours in entry.items():
                    if patho not in names:
                        continue
                    for contour in contours:
                        if not isinstance(contour, list) or len(contour) < 3:
                            bad.append(f"{cid}:{patho}")
                            continue
                        poly.setdefault(cid, []).append(
                            {
                                "class": names[patho],
                                "type": "polygon",
                                "coords": [[float(x), float(y)] for x, y in contour],
                                "frame": frame,
                            }
                        )
            report.add(
                "CheXlocalize polygon without img_size or with < 3 points",
                len(bad),
                bad[:5],
                "contour skipped",
                file=pa.name,
            )
        ps = find_file(folder, [f"gt_segmentations_{split}.json", f"*/gt_segmentations_{split}.json"], "", False)
        if ps is not None and mode != "polygon":
            report.files[f"segmentations_{split}"] = str(ps)
            bad = []
            for cid, entry in read_json_file(ps, "CheXlocalize").items():
                for patho, seg in entry.items():
                    if patho not in names:
                        continue
                    try:
                        h, w = (int(v) for v in seg["size"])
                        counts = seg["counts"]
                        area = int(
                            mask_utils.area(
                                {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
                            )
                        )
                    except (KeyError, TypeError, ValueError) as e:
                        bad.append(f"{cid}:{patho}: {e}")
                        continue
                    if area > 0:
                        rle.setdefault(cid, []).append(
                            {
                                "class": names[patho],
                                "type": "rle",
                                "coords": {"size": [h, w], "counts": counts},
                                "frame": [w, h],
                            }
                        )
            report.add("CheXlocalize RLE without size/counts", len(bad), bad[:5], "mask skipped", file=ps.name)
    if mode in ("polygon", "rle"):
        return poly if mode == "polygon" else rle
    if mode == "both":
        return {k: poly.get(k, []) + rle.get(k, []) for k in set(poly) | set(rle)}
    return {k: poly.get(k) or rle.get(k, []) for k in set(poly) | set(rle)}


def _records(df: pd.DataFrame, att: dict, report: ConversionReport, dataset: str = NAME) -> list[dict]:
    labels = df[list(CLASSES)].to_numpy(dtype=np.int8).tolist()
    if att:
        missing = sorted(set(att) - set(df["cxr_id"]))
        report.add("annotated CXR id not in the label files", len(missing), missing[:5], "annotation unused")
    return [
        {
            "image": img,
            "label": lab,
            "attention": att.get(cid, []),
            "sex": s,
            "age": a,
            "patient_id": p,
            "dataset": dataset,
            "view": v,
            "split_source": sp,
        }
        for img, cid, lab, s, a, p, v, sp in zip(
            df["image"],
            df["cxr_id"],
            labels,
            df["sex"],
            age_list(df["age"].to_numpy(dtype=float)),
            df["patient_id"],
            df["view"],
            df["split_source"],
            strict=False,
        )
    ]


def convert(
    root: str | os.PathLike, report: ConversionReport | None = None, blank: int = -1, attention: str = "auto"
) -> tuple[list[dict], ConversionReport]:
    """CheXpert train + valid (+ CheXlocalize annotations of valid when found under ``root``)."""
    root = Path(root).resolve()
    report = report or ConversionReport(NAME)
    pats = ["{}", "CheXpert-v1.0-small/{}", "CheXpert-v1.0/{}", "*/{}"]
    train = find_file(root, [p.format("train.csv") for p in pats], "CheXpert train.csv")
    valid = find_file(train.parent, ["valid.csv"], "", required=False)
    report.files["train"] = str(train)
    frames = [read_labels(train, report, blank, "train")]
    if valid is None:
        report.note("valid.csv not found next to train.csv: validation split drawn by patient from train")
    else:
        report.files["valid"] = str(valid)
        frames.append(read_labels(valid, report, blank, "valid"))
    df = pd.concat(frames, ignore_index=True)
    n_sources = df.groupby("patient_id")["split_source"].transform("nunique")
    overlap = df["patient_id"].duplicated(keep=False) & (n_sources > 1)
    if overlap.any():
        report.add(
            "patient in both train.csv and valid.csv",
            int(df.loc[overlap, "patient_id"].nunique()),
            df.loc[overlap, "patient_id"].unique().tolist()[:5],
            "moved to the official split",
        )
    att = {}
    loc = [
        d
        for d in (root, root.parent)
        if find_files(
            d,
            [
                "gt_annotations_val.json",
                "*/gt_annotations_val.json",
                "gt_segmentations_val.json",
                "*/gt_segmentations_val.json",
            ],
        )
    ]
    if loc:
        att = read_annotations(loc[0], ["val"], report, attention)
        report.note(f"CheXlocalize validation annotations attached from {loc[0]}")
    return _records(df, att, report), report


def _demographics(root: Path, report: ConversionReport) -> pd.DataFrame | None:
    """patient_id -> sex, age from a CheXpert CSV with Path/Sex/Age or the CHEXPERT DEMO table, if found."""
    for p in find_files(root, ["valid.csv", "*/valid.csv", "*/*/valid.csv"]):
        df = read_csv(p)
        if {"path", "sex", "age"} <= {str(c).strip().lower() for c in df.columns}:
            df = match_columns(df, {"path": ["Path"], "sex": ["Sex"], "age": ["Age"]}, p)
            report.files["demographics"] = str(p)
            out = pd.DataFrame(
                {
                    "patient_id": df["path"].str.extract(r"(patient\d+)")[0],
                    "sex": parse_sex(df["sex"]),
                    "age": parse_age(df["age"], report, p, file_lines(df), zero_is_missing=True),
                }
            )
            return out.drop_duplicates("patient_id")
    for p in find_files(root, ["CHEXPERT DEMO*.csv", "CHEXPERT DEMO*.xlsx", "*/CHEXPERT DEMO*.*"]):
        if p.suffix.lower() == ".xlsx":
            try:
                df = pd.read_excel(p, dtype=str)
            except ImportError:
                report.note(
                    f"{p.name}: reading .xlsx needs openpyxl (pip install openpyxl) or save it as CSV; "
                    "demographics not used"
                )
                continue
        else:
            df = read_csv(p)
        df = match_columns(df, {"patient": ["PATIENT"], "gender": ["GENDER"], "age": ["AGE_AT_CXR"]}, p)
        report.files["demographics"] = str(p)
        return pd.DataFrame(
            {
                "patient_id": df["patient"].str.extract(r"(patient\d+)")[0],
                "sex": parse_sex(df["gender"]),
                "age": parse_age(df["age"], report, p, file_lines(df), zero_is_missing=True),
            }
        ).drop_duplicates("patient_id")
    return None


def convert_chexlocalize(
    root: str | os.PathLike, report: ConversionReport | None = None, attention: str = "auto"
) -> tuple[list[dict], ConversionReport]:
    """The CheXlocalize download: val and test CXRs with their 0/1 labels and polygon/RLE attention."""
    root = Path(root).resolve()
    report = report or ConversionReport("chexlocalize")
    val = find_file(
        root,
        ["CheXpert/val_labels.csv", "val_labels.csv", "*/CheXpert/val_labels.csv"],
        "CheXlocalize's CheXpert/val_labels.csv",
    )
    test = find_file(val.parent, ["test_labels.csv"], "", required=False)
    frames = []
    for p, split, sub in ((val, "valid", "val"), (test, "test", "test")):
        if p is None:
            report.note(f"{sub}_labels.csv not found: no {sub} CXRs")
            continue
        report.files[f"{sub}_labels"] = str(p)
        frames.append(read_labels(p, report, 0, split, image_base=p.parent / sub))
    df = pd.concat(frames, ignore_index=True)
    if (df["sex"] == "unknown").all() or df["age"].isna().all():
        demo = _demographics(root, report)
        if demo is None and root.parent != root:
            demo = _demographics(root.parent, report)
        if demo is not None:
            m = df[["patient_id"]].merge(demo, on="patient_id", how="left")
            df["sex"] = np.where(df["sex"] == "unknown", m["sex"].fillna("unknown"), df["sex"])
            df["age"] = df["age"].where(df["age"].notna(), m["age"].to_numpy())
        else:
            report.note("no Sex/Age in the label files and no demographics table found: sex/age unknown")
    folder = find_files(root, ["CheXlocalize/gt_*.json", "gt_*.json", "*/CheXlocalize/gt_*.json"])
    if not folder:
        raise ConversionError(
            f"--root {root}: expected CheXlocalize/gt_annotations_val.json or gt_segmentations_val.json but none is "
            f"there. Found: {sorted(os.listdir(root))[:30]}. Fix: point --root at the unpacked CheXlocalize download."
        )
    att = read_annotations(folder[0].parent, ["val", "test"], report, attention)
    return _records(df, att, report, dataset=NAME), report


_ATTENTION = option("--attention", default=None, help="auto|polygon|rle|both (default auto)")
CONVERTERS = (
    Converter(NAME, convert, "CheXpert train.csv / valid.csv", options=(_ATTENTION, BLANK_OPTION)),
    Converter(
        "chexlocalize",
        convert_chexlocalize,
        "CheXlocalize val/test labels with polygons and RLE",
        options=(_ATTENTION,),
    ),
)
