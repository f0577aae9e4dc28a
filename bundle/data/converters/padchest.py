"""PadChest (BIMCV) + PadChest-GR -> datalist records.

PadChest (datasets.md B5): ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (or .csv.gz, any name
starting with PADCHEST). Column names are matched case-insensitively (the README spells some differently).
``Labels`` is a stringified Python list, e.g. ``['pleural effusion', 'nodule']``: terms are lower-cased,
stripped and matched *exactly* against :data:`TERMS` (not by substring: "pseudonodule" is not a nodule and
"breast mass" is not a lung mass). The labels are mined from every report and exhaustive, so a term that is
absent is 0 (negative); a missing or unparsable ``Labels`` gives -1 (counted).
Age = year of StudyDate_DICOM - PatientBirth; sex = PatientSex_DICOM; view = Projection; patient = PatientID.
Images: ``{ImageDir}/{ImageID}`` (the unzipped folders 0..54) or a flat ``images/`` folder.

PadChest-GR (when ``grounded_reports*.json`` is found under ``--root``): per image, findings with ``labels`` and
``boxes`` [[x1, y1, x2, y2], ...] -> ``bbox_xyxy`` attention of the conditions of the finding's labels
(``extra_boxes`` are not used). The boxes are said to be normalised to 0-1 (UNCONFIRMED): a box whose coordinates
all lie in [0, 1] is stored with ``"normalized": true``; otherwise it is taken as pixels of the image
(``frame`` = [Columns_DICOM, Rows_DICOM]; dropped, counted, when the size is unknown); both kinds are
counted in the report. ``master_table.csv``'s ``split``
is the official split of the GR images. Without the main PadChest CSV, the GR release alone is converted from
``master_table.csv`` (ImageID, PatientID or StudyID, PatientSex_DICOM, PatientAge, split) with labels from its
grounded findings.
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
    read_csv,
    read_json_file,
    require_key,
)
from bundle.data.converters.registry import Converter

NAME = "padchest"
#: condition -> PadChest label terms (exact, lower case) that make it positive
TERMS = {
    "nodule_mass": frozenset({"nodule", "multiple nodules", "pulmonary mass", "mass", "lung mass"}),
    "pleural_effusion": frozenset({"pleural effusion", "loculated pleural effusion", "loculated fissural effusion"}),
    "edema": frozenset({"pulmonary edema", "edema"}),
}
COLUMNS = {
    "ImageID": [],
    "ImageDir": [],
    "StudyDate_DICOM": [],
    "StudyID": [],
    "PatientID": [],
    "PatientBirth": [],
    "PatientSex_DICOM": [],
    "Projection": [],
    "Labels": [],
    "Rows_DICOM": [],
    "Columns_DICOM": [],
}
OPTIONAL = [
    "ImageDir",
    "StudyDate_DICOM",
    "StudyID",
    "PatientBirth",
    "PatientSex_DICOM",
    "Projection",
    "Rows_DICOM",
    "Columns_DICOM",
]


def label_matrix(terms: pd.Series) -> np.ndarray:
    """(n, 3) 0/1 from a Series of term lists (vectorised: explode, exact set membership, group-any)."""
    ex = terms.explode().dropna().astype(str).str.strip().str.lower()
    out = np.zeros((len(terms), len(CLASSES)), dtype=np.int8)
    pos = pd.Series(np.arange(len(terms)), index=terms.index)
    for ci, c in enumerate(CLASSES):
        hit = ex[ex.isin(TERMS[c])]
        out[pos.loc[hit.index.unique()].to_numpy(), ci] = 1
    return out


def parse_label_lists(s: pd.Series, report: ConversionReport, file, lines: np.ndarray) -> tuple[pd.Series, np.ndarray]:
    """Stringified lists -> Series of lists; mask of rows whose Labels are missing or not a list string."""
    st = s.astype("string").str.strip()
    missing = st.isna() | (st == "")
    islist = st.str.startswith("[").fillna(False) & st.str.endswith("]").fillna(False)
    bad = (~missing & ~islist).to_numpy()
    if missing.any():
        report.add_rows("missing Labels", file, lines[missing.to_numpy()], action="labels set to -1")
    if bad.any():
        report.add_rows(
            "unparsable Labels (not a ['...'] list)", file, lines[bad], st[bad].tolist(), "labels set to -1"
        )
    terms = st.str.findall(r"'([^']*)'|\"([^\"]*)\"").map(
        lambda xs: [a or b for a, b in xs] if isinstance(xs, list) else [], na_action="ignore"
    )
    return terms, missing.to_numpy() | bad


def _read_gr(root: Path, report: ConversionReport) -> tuple[dict, pd.DataFrame | None]:
    """ImageID -> [(class, box)] from grounded_reports*.json, and master_table.csv (or None)."""
    jf = find_files(root, ["grounded_reports*.json", "*/grounded_reports*.json", "*/*/grounded_reports*.json"])
    if not jf:
        return {}, None
    report.files["padchest_gr"] = str(jf[-1])
    data = read_json_file(jf[-1], "PadChest-GR")
    if isinstance(data, dict):  # tolerate {ImageID: entry} as well as the documented list of entries
        data = [dict(v, ImageID=v.get("ImageID", k)) for k, v in data.items()]
    boxes: dict[str, list] = {}
    labels: dict[str, set] = {}
    bad = 0
    for entry in data:
        img = str(entry.get("ImageID", "")).strip()
        if not img:
            bad += 1
            continue
        labels.setdefault(img, set())
        for fnd in entry.get("findings", []) or []:
            terms = {str(t).strip().lower() for t in (fnd.get("labels") or [])}
            classes = [c for c in CLASSES if terms & TERMS[c]]
            labels[img].update(classes)
            for b in fnd.get("boxes") or []:
                try:
                    x1, y1, x2, y2 = (float(v) for v in b)
                except (TypeError, ValueError):
                    bad += 1
                    continue
                for c in classes:
                    boxes.setdefault(img, []).append((c, [x1, y1, x2, y2]))
    report.add("PadChest-GR entry/box that cannot be parsed", bad, [], "skipped", file=jf[-1].name)
    mt = find_file(jf[-1].parent, ["master_table*.csv", "*/master_table*.csv"], "", required=False)
    table = None
    if mt is not None:
        report.files["padchest_gr_master"] = str(mt)
        table = match_columns(
            read_csv(mt),
            {"ImageID": [], "PatientID": [], "StudyID": [], "PatientSex_DICOM": [], "PatientAge": [], "split": []},
            mt,
            optional=["PatientID", "StudyID", "PatientSex_DICOM", "PatientAge", "split"],
        )
        table["_lines"] = file_lines(table)
        table["_path"] = str(mt)
    return {"boxes": boxes, "labels": labels}, table


def _box_entries(items, frame, counter) -> list[dict]:
    out = []
    for c, b in items:
        if all(0.0 <= v <= 1.0 for v in b):
            counter["normalized"] += 1
            out.append({"class": c, "type": "bbox_xyxy", "coords": b, "frame": frame or [1, 1], "normalized": True})
        elif frame is None:
            counter["pixels_without_frame"] += 1
        else:
            counter["pixels"] += 1
            out.append({"class": c, "type": "bbox_xyxy", "coords": b, "frame": frame})
    return out


def _gr_note(report: ConversionReport, counter: dict):
    report.note(f"PadChest-GR boxes: {counter['normalized']} normalised (0-1), {counter['pixels']} in pixels")
    report.add(
        "PadChest-GR box in pixels for an image of unknown size (no Rows/Columns_DICOM)",
        counter["pixels_without_frame"],
        [],
        "box dropped",
    )


def convert(root: str | os.PathLike, report: ConversionReport | None = None) -> tuple[list[dict], ConversionReport]:
    root = Path(root).resolve()
    report = report or ConversionReport(NAME)
    main = find_file(
        root,
        [
            "PADCHEST_chest_x_ray_images_labels_160K*.csv",
            "PADCHEST_chest_x_ray_images_labels_160K*.csv.gz",
            "PADCHEST*.csv",
            "PADCHEST*.csv.gz",
            "*/PADCHEST*.csv",
            "*/PADCHEST*.csv.gz",
        ],
        "",
        False,
    )
    gr, table = _read_gr(root, report)
    if main is None and table is None:
        find_file(
            root,
            ["PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", "grounded_reports_*.json"],
            "the PadChest label table PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz) or the "
            "PadChest-GR grounded_reports_*.json + master_table.csv",
        )
    if main is None:
        return _convert_gr_only(root, gr, table, report)
    report.files["labels"] = str(main)
    df = match_columns(read_csv(main), COLUMNS, main, optional=OPTIONAL)
    lines = file_lines(df)
    df, lines = require_key(df, "ImageID", report, main, lines, "ImageID")

    terms, unknown = parse_label_lists(df["Labels"], report, main, lines)
    labels = label_matrix(terms)
    labels[unknown] = -1

    if "StudyDate_DICOM" in df and "PatientBirth" in df:
        year = pd.to_numeric(df["StudyDate_DICOM"].str.strip().str[:4], errors="coerce")
        birth = pd.to_numeric(df["PatientBirth"], errors="coerce")
        bad = (birth.isna() & df["PatientBirth"].notna()).to_numpy()
        if bad.any():
            report.add_rows(
                "unparsable PatientBirth", main, lines[bad], df.loc[bad, "PatientBirth"].tolist(), "age unknown"
            )
        age = parse_age((year - birth).round(2).astype("string"), report, main, lines, column="age (study - birth)")
    else:
        report.note("StudyDate_DICOM or PatientBirth missing: age unknown")
        age = np.full(len(df), np.nan)
    sex = parse_sex(df["PatientSex_DICOM"]) if "PatientSex_DICOM" in df else np.full(len(df), "unknown", object)
    pid = df["PatientID"].str.strip()
    nopid = pid.isna().to_numpy()
    if nopid.any():
        report.add_rows(
            "missing PatientID", main, lines[nopid], df.loc[nopid, "ImageID"].tolist(), "image is its own patient"
        )
        pid = pid.fillna(df["ImageID"])
    view = df["Projection"].str.strip().fillna("unknown") if "Projection" in df else pd.Series("unknown", df.index)
    if "ImageDir" in df:
        idir = pd.to_numeric(df["ImageDir"], errors="coerce").astype("Int64").astype("string")
        idir = idir.fillna(df["ImageDir"].astype("string"))
    else:
        idir = pd.Series(pd.NA, index=df.index, dtype="string")
    flat = (root / "images").is_dir() and not any((root / str(d)).is_dir() for d in idir.dropna().unique()[:5])
    paths = np.where(
        idir.isna() | flat,
        str(root / "images") + "/" + df["ImageID"],
        str(root) + "/" + idir.fillna("") + "/" + df["ImageID"],
    )
    frame = {}
    if "Rows_DICOM" in df and "Columns_DICOM" in df:
        r = pd.to_numeric(df["Rows_DICOM"], errors="coerce")
        c = pd.to_numeric(df["Columns_DICOM"], errors="coerce")
        frame = {i: [int(cc), int(rr)] for i, cc, rr in zip(df["ImageID"], c, r, strict=False) if cc == cc and rr == rr}

    split = np.full(len(df), None, dtype=object)
    att: dict[str, list] = {}
    if gr:
        counter = {"normalized": 0, "pixels": 0, "pixels_without_frame": 0}
        known = set(df["ImageID"])
        for img, items in gr["boxes"].items():
            if img in known:
                att[img] = _box_entries(items, frame.get(img), counter)
        missing = [i for i in gr["labels"] if i not in known]
        report.add("PadChest-GR image not in the PadChest table", len(missing), missing[:5], "ignored")
        _gr_note(report, counter)
        if table is not None and "split" in table:
            sp = dict(zip(table["ImageID"].str.strip(), table["split"].str.strip().str.lower(), strict=False))
            split = df["ImageID"].map(sp).to_numpy(dtype=object)
            split = np.where(pd.isna(split), None, split)
    recs = [
        {
            "image": p,
            "label": lab,
            "attention": att.get(i, []),
            "sex": s,
            "age": a,
            "patient_id": pi,
            "dataset": NAME,
            "view": v,
            "split_source": sp,
        }
        for p, i, lab, s, a, pi, v, sp in zip(
            paths, df["ImageID"], labels.tolist(), sex, age_list(age), pid, view, split, strict=False
        )
    ]
    return recs, report


def _convert_gr_only(root: Path, gr: dict, table: pd.DataFrame | None, report: ConversionReport):
    if table is None:
        raise ConversionError(
            f"--root {root}: PadChest-GR grounded reports found but no master_table.csv next to "
            f"them (needed for sex, age, split). Found: {sorted(os.listdir(root))[:30]}"
        )
    report.note("PadChest main table not found: converting the PadChest-GR release alone")
    path, lines = table["_path"].iloc[0], table["_lines"].to_numpy()
    table["ImageID"] = table["ImageID"].str.strip()
    table, lines = drop_duplicates(table.drop(columns=["_lines", "_path"]), "ImageID", report, path, lines)
    images = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.lower().endswith(".png"):
                images.setdefault(f, os.path.join(d, f))
    labels = np.array(
        [[int(c in gr["labels"].get(i, set())) for c in CLASSES] for i in table["ImageID"]], dtype=np.int8
    ).reshape(len(table), len(CLASSES))
    nogr = ~table["ImageID"].isin(gr["labels"].keys()).to_numpy()
    labels[nogr] = -1
    report.add("master_table image without grounded report", int(nogr.sum()), [], "labels set to -1")
    age = parse_age(table["PatientAge"], report, path, lines) if "PatientAge" in table else np.full(len(table), np.nan)
    sex = parse_sex(table["PatientSex_DICOM"]) if "PatientSex_DICOM" in table else ["unknown"] * len(table)
    pid = table.get("PatientID", table.get("StudyID", table["ImageID"])).fillna(table["ImageID"])
    split = table["split"].str.strip().str.lower() if "split" in table else pd.Series([None] * len(table))
    counter = {"normalized": 0, "pixels": 0, "pixels_without_frame": 0}
    recs = []
    for i, lab, s, a, p, sp in zip(table["ImageID"], labels.tolist(), sex, age_list(age), pid, split, strict=False):
        recs.append(
            {
                "image": images.get(i, str(root / "images" / i)),
                "label": lab,
                "attention": _box_entries(gr["boxes"].get(i, []), None, counter),
                "sex": s,
                "age": a,
                "patient_id": str(p),
                "dataset": NAME,
                "view": "unknown",
                "split_source": sp if isinstance(sp, str) else None,
            }
        )
    _gr_note(report, counter)
    return recs, report


CONVERTERS = (Converter(NAME, convert, "PadChest (+ PadChest-GR boxes)"),)
