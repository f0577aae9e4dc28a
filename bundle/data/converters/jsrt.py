"""JSRT -> datalist records (the OOD nodule test set).

Files (datasets.md B6): 247 headerless raw ``*.IMG`` images (2048x2048, big-endian uint16, 12-bit,
0.175 mm/pixel) directly under ``--root`` or in a sub-folder (e.g. ``All247images/``), located by listing
(opened only with --check-images, which checks the byte size 2048*2048*2); ``CLNDAT_EN.txt`` (154 nodule
cases) and ``CNNDAT_EN.TXT`` (93 non-nodule cases), tab-separated without header, any file-name case.
CLNDAT fields: filename, subtlety 1-5, size_mm, age, sex (male/female), x, y, malignant|benign, location,
diagnosis; CNNDAT: filename, age, sex, ... (only the first three are used: its documented schema is unreliable).
Lines whose fields are separated by runs of spaces instead of tabs are accepted.

Labels: nodule_mass = 1 for JPCLN*, 0 for JPCNN*; pleural_effusion and edema are not assessed in JSRT: -1.
Attention: ``point_radius`` [x, y, r] with the nodule centre (x = column, y = row) in the 2048x2048 frame and
r = size_mm / 2 / 0.175 pixels. One image per patient: patient_id = file stem; view PA.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from bundle.data.converters.common import (
    ConversionReport,
    age_list,
    find_file,
    parse_age,
    parse_sex,
)
from bundle.data.converters.registry import Converter

NAME = "jsrt"
FRAME = [2048, 2048]
MM_PER_PIXEL = 0.175


def _split_line(line: str) -> list[str]:
    fields = [f.strip() for f in line.rstrip("\r\n").split("\t")]
    while fields and not fields[-1]:
        fields.pop()
    if len(fields) < 3:  # not tab separated: fall back to runs of 2+ spaces
        fields = [f.strip() for f in re.split(r"\s{2,}", line.strip())]
    return fields


def _read(path: Path, min_fields: int, report: ConversionReport) -> list[tuple[int, list[str]]]:
    rows = []
    with open(path, encoding="latin-1") as f:  # the distributed files are plain ASCII; latin-1 never fails
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = _split_line(line)
            if not re.match(r"^JPC[LN]N\d+", fields[0], re.IGNORECASE):
                if ln == 1:  # a header line someone added
                    continue
                report.add_rows(
                    "line not starting with a JPCLN/JPCNN file name", path, [ln], [line.strip()[:60]], "line skipped"
                )
                continue
            if len(fields) < min_fields:
                report.add_rows(
                    f"line with fewer than {min_fields} fields", path, [ln], [line.strip()[:60]], "line skipped"
                )
                continue
            rows.append((ln, fields))
    return rows


def _image_index(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for d, dirs, files in os.walk(root):
        if Path(d).relative_to(root).parts.__len__() >= 2:
            dirs[:] = []
        for f in files:
            if f.lower().endswith(".img"):
                out.setdefault(f.upper(), os.path.join(d, f))
    return out


def convert(root: str | os.PathLike, report: ConversionReport | None = None) -> tuple[list[dict], ConversionReport]:
    root = Path(root).resolve()
    report = report or ConversionReport(NAME)
    cln = find_file(
        root, ["CLNDAT_EN.txt", "CLNDAT*.txt", "*/CLNDAT_EN.txt", "*/CLNDAT*.txt"], "the JSRT nodule list CLNDAT_EN.txt"
    )
    cnn = find_file(
        root,
        ["CNNDAT_EN.txt", "CNNDAT*.txt", "*/CNNDAT_EN.txt", "*/CNNDAT*.txt"],
        "the JSRT non-nodule list CNNDAT_EN.TXT",
    )
    report.files.update(nodules=str(cln), non_nodules=str(cnn))
    rows = []  # (file, line, name, age, sex, label, x, y, size)
    for ln, f in _read(cln, 7, report):
        rows.append((cln, ln, f[0], f[3], f[4], 1, f[5], f[6], f[2]))
    for ln, f in _read(cnn, 3, report):
        rows.append((cnn, ln, f[0], f[1], f[2], 0, None, None, None))
    df = pd.DataFrame(rows, columns=["file", "line", "name", "age", "sex", "nm", "x", "y", "size"])
    upper = df["name"].str.upper()
    df["name"] = upper.where(upper.str.endswith(".IMG"), upper + ".IMG")
    dup = df["name"].duplicated().to_numpy()
    if dup.any():
        report.add(
            "duplicated file name in the lists",
            int(dup.sum()),
            df.loc[dup, "name"].tolist()[:5],
            "first occurrence kept",
        )
        df = df.loc[~dup].reset_index(drop=True)
    age = np.full(len(df), np.nan)
    for f in (cln, cnn):
        m = (df["file"] == f).to_numpy()
        if m.any():
            age[m] = parse_age(df.loc[m, "age"], report, f, df.loc[m, "line"].to_numpy())
    sex = parse_sex(df["sex"])
    num = df[["x", "y", "size"]].apply(pd.to_numeric, errors="coerce")
    bad = (df["nm"] == 1).to_numpy() & (num.isna().any(axis=1) | (num["size"] <= 0)).to_numpy()
    if bad.any():
        report.add_rows(
            "nodule with unparsable x, y or size",
            cln,
            df.loc[bad, "line"].to_numpy(),
            df.loc[bad, ["x", "y", "size"]].astype(str).agg(",".join, axis=1).tolist(),
            "label kept, no attention",
        )
    index = _image_index(root)
    if not index:
        report.note("no *.IMG files found under --root: paths point to <root>/<name>")
    recs = []
    for i, (name, nm, s, a) in enumerate(zip(df["name"], df["nm"], sex, age_list(age), strict=False)):
        att = []
        if nm == 1 and not bad[i]:
            x, y, size = num.iloc[i]
            att = [
                {
                    "class": "nodule_mass",
                    "type": "point_radius",
                    "coords": [float(x), float(y), round(float(size) / 2 / MM_PER_PIXEL, 3)],
                    "frame": FRAME,
                }
            ]
        recs.append(
            {
                "image": index.get(name, str(root / name)),
                "label": [int(nm), -1, -1],
                "attention": att,
                "sex": s,
                "age": a,
                "patient_id": name[:-4],
                "dataset": NAME,
                "view": "PA",
            }
        )
    return recs, report


CONVERTERS = (Converter(NAME, convert, "JSRT (CLNDAT_EN.txt, CNNDAT_EN.txt, .IMG files)"),)
