"""MIMIC-CXR-JPG 2.0.0 (+ MIMIC-IV demographics, REFLACX ellipses, MS-CXR boxes) -> datalist records.

Files (datasets.md B4), found under ``--root`` (the mimic-cxr-jpg/2.0.0 folder, or a folder holding it and the
others), plain or .gz:
- ``mimic-cxr-2.0.0-metadata.csv``: one row per image (dicom_id, subject_id, study_id, ViewPosition, Rows,
  Columns, StudyDate) -> the records; image path ``files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg``.
- ``mimic-cxr-2.0.0-chexpert.csv``: study-level labels 1/0/-1/blank: Lung Lesion -> nodule_mass, Pleural Effusion
  -> pleural_effusion, Edema -> edema; -1 and blank -> -1 (``blank=0`` makes "not mentioned" negative). A study
  without a label row gets -1 everywhere (counted).
- ``mimic-cxr-2.0.0-split.csv``: the official train/validate/test split.
- MIMIC-IV ``patients.csv(.gz)`` (anywhere below --root, e.g. ``hosp/patients.csv.gz``): gender M/F, age =
  ``anchor_age + StudyDate//10000 - anchor_year`` (``age="study"``, default) or ``anchor_age`` (``age="anchor"``);
  anchor_age 91 means "over 89". Without it, sex/age are unknown (noted).
- REFLACX ``metadata_phase_{1,2,3}.csv`` + ``{id}/anomaly_location_ellipses.csv``: ellipse bounding rectangles
  (``ellipse_bbox`` [xmin, ymin, xmax, ymax]) in image_size_x x image_size_y pixels; label columns
  "Lung nodule or mass" (phases 1-2: "Mass", "Nodule"), "Pleural abnormality" (phases 1-2: "Pleural
  effusion") and "Pulmonary edema" (phases 1-2: "Edema"); ellipses with certainty < ``min_certainty`` (default
  3, i.e. > 2 as in a published loader) are dropped. dicom_id = basename of the metadata ``image`` path.
- MS-CXR ``MS_CXR_Local_Alignment_*.csv``: boxes x, y, w, h (``bbox_xywh``) in image_width x image_height;
  categories Edema and Pleural Effusion (MS-CXR has no nodule/mass).
``attention`` = "all" (default: every source found) | "reflacx" | "ms-cxr" | "none". Attention never changes
the labels; attention on an image whose label is not positive is kept and counted.
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
    parse_sex,
    parse_tristate,
    read_csv,
)
from bundle.data.converters.registry import BLANK_OPTION, Converter, option

NAME = "mimic"
LABEL_MAP = {"nodule_mass": "Lung Lesion", "pleural_effusion": "Pleural Effusion", "edema": "Edema"}
#: REFLACX label column (any phase, lower case) -> condition
REFLACX_MAP = {
    "lung nodule or mass": "nodule_mass",
    "mass": "nodule_mass",
    "nodule": "nodule_mass",
    "pleural abnormality": "pleural_effusion",
    "pleural effusion": "pleural_effusion",
    "pulmonary edema": "edema",
    "edema": "edema",
}
MSCXR_MAP = {"pleural effusion": "pleural_effusion", "edema": "edema"}
_PREFIX = "mimic-cxr-2.0.0"


def _find(root: Path, stem: str, what: str, required: bool = True) -> Path | None:
    pats = [
        f"{stem}.csv",
        f"{stem}.csv.gz",
        f"*/{stem}.csv",
        f"*/{stem}.csv.gz",
        f"*/*/{stem}.csv.gz",
        f"*/*/{stem}.csv",
    ]
    return find_file(root, pats, what, required)


def _reflacx(root: Path, report: ConversionReport, min_certainty: int) -> tuple[list, list]:
    metas = find_files(
        root,
        [
            "metadata_phase_*.csv",
            "main_data/metadata_phase_*.csv",
            "*/main_data/metadata_phase_*.csv",
            "*/*/main_data/metadata_phase_*.csv",
        ],
    )
    keys, shapes = [], []
    if not metas:
        return keys, shapes
    n_cases = n_missing = n_low = 0
    for meta in metas:
        report.files[f"reflacx_{meta.stem}"] = str(meta)
        df = match_columns(read_csv(meta), {"id": [], "image": [], "image_size_x": [], "image_size_y": []}, meta)
        size = df[["image_size_x", "image_size_y"]].apply(pd.to_numeric, errors="coerce")
        dicom = (
            df["image"]
            .str.replace("\\", "/", regex=False)
            .str.rsplit("/", n=1)
            .str[-1]
            .str.replace(r"\.(dcm|dicom|jpg)$", "", regex=True)
        )
        lines = file_lines(df)
        for cid, did, w, h, ln in zip(df["id"], dicom, size["image_size_x"], size["image_size_y"], lines, strict=False):
            f = meta.parent / str(cid) / "anomaly_location_ellipses.csv"
            if not f.is_file():
                n_missing += 1
                continue
            if np.isnan(w) or np.isnan(h):
                report.add_rows("REFLACX case without image_size_x/y", meta, [ln], [cid], "case skipped")
                continue
            n_cases += 1
            ell = read_csv(f)
            norm = {str(c).strip().lower(): c for c in ell.columns}
            if not {"xmin", "ymin", "xmax", "ymax"} <= set(norm):
                raise ConversionError(f"{f}: needs columns xmin, ymin, xmax, ymax; found {list(ell.columns)}")
            xy = ell[[norm[k] for k in ("xmin", "ymin", "xmax", "ymax")]].apply(pd.to_numeric, errors="coerce")
            cert = (
                pd.to_numeric(ell[norm["certainty"]], errors="coerce")
                if "certainty" in norm
                else pd.Series(5, index=ell.index)
            )
            for k, col in norm.items():
                cls = REFLACX_MAP.get(k)
                if cls is None:
                    continue
                flag = ell[col].astype(str).str.strip().str.lower().isin(["true", "1", "1.0"])
                low = flag & (cert < min_certainty)
                n_low += int(low.sum())
                for i in np.flatnonzero((flag & ~low & xy.notna().all(axis=1)).to_numpy()):
                    keys.append(did)
                    shapes.append(
                        {
                            "class": cls,
                            "type": "ellipse_bbox",
                            "coords": [float(v) for v in xy.iloc[i]],
                            "frame": [int(w), int(h)],
                        }
                    )
    report.note(f"REFLACX: {n_cases} cases with ellipses, {len(shapes)} ellipses kept")
    report.add("REFLACX case folder without anomaly_location_ellipses.csv", n_missing, [], "case skipped")
    report.add(f"REFLACX ellipse with certainty < {min_certainty}", n_low, [], "ellipse dropped")
    return keys, shapes


def _mscxr(root: Path, report: ConversionReport) -> tuple[list, list]:
    files = find_files(
        root, ["MS_CXR_Local_Alignment*.csv", "*/MS_CXR_Local_Alignment*.csv", "*/*/MS_CXR_Local_Alignment*.csv"]
    )
    keys, shapes = [], []
    for f in files[:1]:
        report.files["ms_cxr"] = str(f)
        spec = {
            "dicom_id": [],
            "category_name": [],
            "x": [],
            "y": [],
            "w": [],
            "h": [],
            "image_width": [],
            "image_height": [],
        }
        df = match_columns(read_csv(f), spec, f)
        lines = file_lines(df)
        num = df[["x", "y", "w", "h", "image_width", "image_height"]].apply(pd.to_numeric, errors="coerce")
        cls = df["category_name"].str.strip().str.lower().map(MSCXR_MAP)
        bad = num.isna().any(axis=1).to_numpy()
        if bad.any():
            report.add_rows("unparsable MS-CXR box", f, lines[bad], df.loc[bad, "dicom_id"].tolist(), "box dropped")
        ok = ~bad & cls.notna().to_numpy()
        for did, c, (x, y, w, h, iw, ih) in zip(
            df["dicom_id"][ok], cls[ok], num[ok].itertuples(index=False), strict=False
        ):
            keys.append(str(did).strip())
            shapes.append(
                {
                    "class": c,
                    "type": "bbox_xywh",
                    "coords": [float(x), float(y), float(w), float(h)],
                    "frame": [int(iw), int(ih)],
                }
            )
    return keys, shapes


def convert(
    root: str | os.PathLike,
    report: ConversionReport | None = None,
    blank: int = -1,
    age: str = "study",
    attention: str = "all",
    min_certainty: int = 3,
) -> tuple[list[dict], ConversionReport]:
    """One record per image of the metadata file."""
    if age not in ("study", "anchor"):
        raise ConversionError(f"mimic: age must be 'study' or 'anchor', got {age!r}")
    if attention not in ("all", "reflacx", "ms-cxr", "none"):
        raise ConversionError(f"mimic: attention must be all|reflacx|ms-cxr|none, got {attention!r}")
    root = Path(root).resolve()
    report = report or ConversionReport(NAME)
    meta_p = _find(root, f"{_PREFIX}-metadata", f"the MIMIC-CXR-JPG metadata file {_PREFIX}-metadata.csv(.gz)")
    lab_p = _find(root, f"{_PREFIX}-chexpert", f"the MIMIC-CXR-JPG label file {_PREFIX}-chexpert.csv(.gz)")
    split_p = _find(root, f"{_PREFIX}-split", "", required=False)
    report.files.update(metadata=str(meta_p), labels=str(lab_p))
    base = meta_p.parent

    meta = match_columns(
        read_csv(meta_p),
        {"dicom_id": [], "subject_id": [], "study_id": [], "ViewPosition": [], "StudyDate": []},
        meta_p,
        optional=["ViewPosition", "StudyDate"],
    )
    mlines = file_lines(meta)
    meta["dicom_id"] = meta["dicom_id"].str.strip()
    meta, mlines = drop_duplicates(meta, "dicom_id", report, meta_p, mlines)
    for c in ("subject_id", "study_id"):
        num = pd.to_numeric(meta[c], errors="coerce")
        bad = num.isna().to_numpy()
        if bad.any():
            report.add_rows(f"unparsable {c}", meta_p, mlines[bad], meta.loc[bad, c].tolist(), "row dropped")
            meta, mlines, num = meta.loc[~bad].reset_index(drop=True), mlines[~bad], num[~bad].reset_index(drop=True)
        meta[c] = num.astype("int64").astype(str)

    lab = match_columns(
        read_csv(lab_p), {"subject_id": [], "study_id": [], **{v: [] for v in LABEL_MAP.values()}}, lab_p
    )
    llines = file_lines(lab)
    lab["study_id"] = pd.to_numeric(lab["study_id"], errors="coerce").astype("Int64").astype(str)
    lab, llines = drop_duplicates(lab, "study_id", report, lab_p, llines)
    for c in CLASSES:
        lab[c] = parse_tristate(lab[LABEL_MAP[c]], report, lab_p, llines, LABEL_MAP[c], blank=blank)
    df = meta.merge(lab[["study_id", *CLASSES]], on="study_id", how="left")
    nolab = df[CLASSES[0]].isna().to_numpy()
    if nolab.any():
        report.add(
            "image whose study has no label row",
            int(nolab.sum()),
            df.loc[nolab, "dicom_id"].tolist()[:5],
            "labels set to -1",
        )
    labels = df[list(CLASSES)].fillna(-1).to_numpy(dtype=np.int8)

    if split_p is not None:
        report.files["split"] = str(split_p)
        sp = match_columns(read_csv(split_p), {"dicom_id": [], "split": []}, split_p)
        sp["dicom_id"] = sp["dicom_id"].str.strip()
        split = df[["dicom_id"]].merge(sp.drop_duplicates("dicom_id")[["dicom_id", "split"]], how="left")["split"]
        split = split.str.strip().str.lower().to_numpy(dtype=object)
        report.add("image not in the split file", int(pd.isna(split).sum()), [], "split by patient")
    else:
        report.note(f"{_PREFIX}-split.csv not found: patient-level split")
        split = np.full(len(df), None, dtype=object)

    sex = np.full(len(df), "unknown", dtype=object)
    ages = np.full(len(df), np.nan)
    pat_p = find_file(
        root,
        [
            "patients.csv.gz",
            "patients.csv",
            "*/patients.csv.gz",
            "*/patients.csv",
            "*/*/patients.csv.gz",
            "*/*/patients.csv",
            "*/*/*/patients.csv.gz",
        ],
        "",
        required=False,
    )
    if pat_p is None:
        report.note("MIMIC-IV patients.csv(.gz) not found under --root: sex and age unknown")
    else:
        report.files["patients"] = str(pat_p)
        pat = match_columns(
            read_csv(pat_p),
            {"subject_id": [], "gender": [], "anchor_age": [], "anchor_year": []},
            pat_p,
            optional=["anchor_year"],
        )
        pat["subject_id"] = pd.to_numeric(pat["subject_id"], errors="coerce").astype("Int64").astype(str)
        pat = pat.drop_duplicates("subject_id")
        m = df[["subject_id"]].merge(pat, on="subject_id", how="left")
        sex = parse_sex(m["gender"])
        anchor = pd.to_numeric(m["anchor_age"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        if age == "study" and "anchor_year" in m and "StudyDate" in df:
            year = pd.to_numeric(df["StudyDate"], errors="coerce").to_numpy(dtype=float, na_value=np.nan) // 10000
            ay = pd.to_numeric(m["anchor_year"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
            ages = np.where(np.isnan(year) | np.isnan(ay), anchor, anchor + year - ay)
        else:
            ages = anchor
        unknown = m["gender"].isna().to_numpy()
        report.add(
            "subject not in patients.csv",
            int(unknown.sum()),
            df.loc[unknown, "subject_id"].tolist()[:5],
            "sex/age unknown",
        )
    ages = np.where((ages < 0) | (ages > 110), np.nan, ages)

    att: dict[str, list] = {}
    keys: list = []
    shapes: list = []
    if attention in ("all", "reflacx"):
        k, s = _reflacx(root, report, min_certainty)
        keys += k
        shapes += s
    if attention in ("all", "ms-cxr"):
        k, s = _mscxr(root, report)
        keys += k
        shapes += s
    known = set(df["dicom_id"])
    lab_of = dict(zip(df["dicom_id"], labels.tolist(), strict=False))
    ci = {c: i for i, c in enumerate(CLASSES)}
    unknown_ids, not_pos = [], 0
    for k, s in zip(keys, shapes, strict=False):
        if k not in known:
            unknown_ids.append(k)
            continue
        not_pos += lab_of[k][ci[s["class"]]] != 1
        att.setdefault(k, []).append(s)
    report.add("attention for a dicom_id not in the metadata", len(unknown_ids), unknown_ids[:5], "dropped")
    report.add("attention on an image whose label is not positive", int(not_pos), [], "kept")

    view = (
        df["ViewPosition"].str.strip().str.upper().fillna("unknown")
        if "ViewPosition" in df
        else pd.Series("unknown", index=df.index)
    )
    subj = df["subject_id"]
    paths = (
        str(base / "files") + "/p" + subj.str[:2] + "/p" + subj + "/s" + df["study_id"] + "/" + df["dicom_id"] + ".jpg"
    )
    recs = [
        {
            "image": p,
            "label": lab,
            "attention": att.get(d, []),
            "sex": s,
            "age": a,
            "patient_id": pid,
            "dataset": NAME,
            "view": v,
            "split_source": sp if isinstance(sp, str) else None,
        }
        for p, d, lab, s, a, pid, v, sp in zip(
            paths, df["dicom_id"], labels.tolist(), sex, age_list(ages), subj, view, split, strict=False
        )
    ]
    return recs, report


CONVERTERS = (
    Converter(
        NAME,
        convert,
        "MIMIC-CXR-JPG (+ MIMIC-IV, REFLACX, MS-CXR)",
        options=(
            option("--attention", default=None, help="all|reflacx|ms-cxr|none (default all)"),
            BLANK_OPTION,
            option("--age-mode", "age", choices=["study", "anchor"], default="study", help="age at study or anchor"),
            option("--min-certainty", type=int, default=3, help="lowest REFLACX ellipse certainty kept"),
        ),
    ),
)
