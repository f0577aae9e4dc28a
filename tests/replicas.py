"""Small replicas of the public datasets' files, with the quirks the converters must survive (datasets.md B7).

Each ``write_<dataset>(root, ...)`` writes the files under ``root`` exactly in the distributed layout and
returns what the replica contains (``expected``): images, positives per class, sex and age-group counts,
attention shapes per class, bad rows. The expectations are counted from the replica's own row tables here,
independently of the converters.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

CLASSES = ("nodule_mass", "pleural_effusion", "edema")


def _write(path: Path, text: str, gz: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def _png(path: Path, size=(16, 16), bits: int = 8):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if bits == 16:
        arr = rng.integers(0, 65535, size=size[::-1], dtype=np.uint16)
        Image.fromarray(arr).save(path)
    else:
        Image.fromarray(rng.integers(0, 255, size=size[::-1], dtype=np.uint8), mode="L").save(path)


def _agegroup(age):
    if age is None or age < 0 or age > 110:
        return "unknown"
    for lo, hi in ((0, 20), (20, 40), (40, 60), (60, 80)):
        if lo <= age < hi:
            return f"[{lo},{hi})"
    return "[80,inf)"


def _count(values):
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


# ------------------------------------------------------------------------------------------------------- NIH
NIH_ROWS = [  # image, findings, follow-up, patient, age, sex, view
    ("00000001_000.png", "Cardiomegaly|Emphysema", 0, 1, "58", "M", "PA"),
    ("00000001_001.png", "Mass|Nodule", 1, 1, "58", "M", "PA"),
    ("00000002_000.png", "No Finding", 0, 2, "81", "F", "PA"),
    ("00000003_000.png", "Effusion|Infiltration", 0, 3, "45", "F", "AP"),
    ("00000003_001.png", "Edema", 1, 3, "45", "F", "AP"),
    ("00000004_000.png", "Nodule", 0, 4, "148", "M", "PA"),  # impossible age (the 2017 file has some)
    ("00000005_000.png", "Effusion|Edema|Mass", 0, 5, "030Y", "M", "PA"),  # DICOM-style age of early mirrors
    ("00000006_000.png", "No Finding", 0, 6, "abc", "F", "PA"),  # unparsable age
    ("00000007_000.png", "Atelectasis", 0, 7, "15", "M", "AP"),
    ("00000008_000.png", "Pneumonia", 0, 8, "66", "F", "PA"),
]
NIH_DUPLICATE = 2  # index of the row written twice (exact copy)
NIH_TEST = {"00000005_000.png", "00000008_000.png"}
NIH_BOXES = [  # image, finding, x, y, w, h  (file line = index + 2)
    ("00000001_001.png", "Mass", "225.084745762712", "547.019216763771", "86.7796610169491", "79.1864406779661"),
    ("00000001_001.png", "Nodule", "500.5", "300.25", "40.0", "38.5"),
    ("00000003_000.png", "Effusion", "100", "600", "200", "300"),
    ("00000004_000.png", "Nodule", "abc", "1", "2", "3"),  # unparsable: dropped, counted
    ("00000005_000.png", "Mass", "700", "200", "120", "110"),
    ("00000005_000.png", "Effusion", "650", "700", "300", "250"),
    ("00000007_000.png", "Atelectasis", "300", "400", "100", "80"),  # not a condition here
    ("00000007_000.png", "Infiltrate", "310", "410", "100", "80"),  # "Infiltrate" spelling
]


def write_nih(
    root,
    sex_column: str = "Patient Gender",
    version: str = "2017",
    images: bool = True,
    missing_image: str | None = "00000008_000.png",
    drop_column: str | None = None,
) -> dict:
    """Data_Entry_2017.csv with the bracketed header and trailing comma (``version="2017"``) or the v2020 file,
    BBox_List_2017.csv with its ``Bbox [x,y,w,h],,,`` header, the official lists, PNGs in images_001/images."""
    root = Path(root)
    cols = [
        "Image Index",
        "Finding Labels",
        "Follow-up #",
        "Patient ID",
        "Patient Age",
        sex_column,
        "View Position",
        "OriginalImage[Width,Height]",
        "OriginalImagePixelSpacing[x,y]",
    ]
    if drop_column:
        cols = [c for c in cols if c != drop_column]
    trail = "," if version == "2017" else ""
    lines = [",".join(cols) + trail]
    rows = list(NIH_ROWS)
    rows.insert(NIH_DUPLICATE + 1, NIH_ROWS[NIH_DUPLICATE])
    for img, fnd, fu, pid, age, sex, view in rows:
        vals = {
            "Image Index": img,
            "Finding Labels": fnd,
            "Follow-up #": str(fu),
            "Patient ID": str(pid),
            "Patient Age": age,
            sex_column: sex,
            "View Position": view,
        }
        fields = [vals[c] for c in cols if c in vals] + ["2500", "2048", "0.143", "0.143"]
        lines.append(",".join(fields) + trail)
    name = "Data_Entry_2017.csv" if version == "2017" else "Data_Entry_2017_v2020.csv"
    _write(root / name, "\n".join(lines) + "\n")
    box_lines = ["Image Index,Finding Label,Bbox [x,y,w,h],,,"]
    for i, b in enumerate(NIH_BOXES):
        box_lines.append(",".join(b) + (",,," if i % 2 == 0 else ""))
    _write(root / "BBox_List_2017.csv", "\n".join(box_lines) + "\n")
    _write(root / "test_list.txt", "\n".join(sorted(NIH_TEST)) + "\n")
    _write(root / "train_val_list.txt", "\n".join(r[0] for r in NIH_ROWS if r[0] not in NIH_TEST) + "\n")
    if images:
        for r in NIH_ROWS:
            if r[0] != missing_image:
                _png(root / "images_001" / "images" / r[0])

    def age_of(a):
        a = a.rstrip("Y")
        return int(a) if a.isdigit() and int(a) <= 110 else None

    pos = {
        "nodule_mass": sum(("Nodule" in r[1]) or ("Mass" in r[1]) for r in NIH_ROWS),
        "pleural_effusion": sum("Effusion" in r[1] for r in NIH_ROWS),
        "edema": sum("Edema" in r[1] for r in NIH_ROWS),
    }
    return {
        "images": len(NIH_ROWS),
        "patients": len({r[3] for r in NIH_ROWS}),
        "positives": pos,
        "sex": _count(r[5] for r in NIH_ROWS),
        "age_group": _count(_agegroup(age_of(r[4])) for r in NIH_ROWS),
        # parsable boxes of the three conditions: Mass/Nodule -> nodule_mass, Effusion -> pleural_effusion
        "boxes": {"nodule_mass": 3, "pleural_effusion": 2, "edema": 0},
        "positives_with_attention": {"nodule_mass": 2, "pleural_effusion": 2, "edema": 0},
        "test_images": len(NIH_TEST),
        "bad": {"unparsable Patient Age": 1, "impossible Patient Age": 1, "duplicated rows": 1, "unparsable box": 1},
        "bad_box_line": 5,
        "bad_age_line": 2 + [r[0] for r in rows].index("00000006_000.png"),
        "box": ("00000001_001.png", [225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661]),
        "missing_image": missing_image,
    }


# ----------------------------------------------------------------------------------------------------- VinDr
VINDR_LABELS = [
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Clavicle fracture",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Enlarged PA",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Lung cavity",
    "Lung cyst",
    "Mediastinal shift",
    "Nodule/Mass",
    "Other lesion",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "Rib fracture",
    "COPD",
    "Lung tumor",
    "Pneumonia",
    "Tuberculosis",
    "Other diseases",
    "No finding",
]
# image -> split, {reader: set of positive labels}, boxes [(reader, class, x0, y0, x1, y1)],
#          DICOM header (sex, age, rows, cols, photometric)
VINDR_IMAGES = {
    "t1": (
        "train",
        {"R1": {"Nodule/Mass", "Pleural effusion"}, "R2": {"Nodule/Mass"}, "R3": {"No finding"}},
        [
            ("R1", "Nodule/Mass", 10, 12, 20, 25),
            ("R1", "Pleural effusion", 5, 40, 30, 60),
            ("R2", "Nodule/Mass", 11, 13, 21, 24),
        ],
        ("M", "045Y", 64, 48, "MONOCHROME2"),
    ),
    "t2": (
        "train",
        {"R1": {"No finding"}, "R2": {"No finding"}, "R3": {"No finding"}},
        [],
        ("F", None, 64, 48, "MONOCHROME1"),
    ),
    "t3": (
        "train",
        {"R4": {"Edema", "Aortic enlargement"}, "R5": {"Edema"}, "R6": {"Edema"}},
        [
            ("R4", "Edema", 1, 2, 30, 40),
            ("R5", "Edema", 2, 3, 31, 41),
            ("R6", "Edema", 3, 4, 29, 39),
            ("R4", "Aortic enlargement", 20, 5, 30, 15),
        ],
        ("O", "070Y", 50, 40, "MONOCHROME2"),
    ),
    "s1": (
        "test",
        {"R8": {"Pleural effusion"}},
        [("R8", "Pleural effusion", 4, 30, 25, 49)],
        ("F", "030Y", 64, 48, "MONOCHROME2"),
    ),
    "s2": ("test", {"R9": {"No finding"}}, [], ("M", "062Y", 64, 48, "MONOCHROME2")),
}


def _dicom(path: Path, sex, age, rows, cols, photometric):
    """A VinDr-style DICOM (Secondary Capture, no view, 12 of 16 bits) built by the project's DICOM factory."""
    from pydicom.uid import SecondaryCaptureImageStorage

    from bundle.utils.dicom import make_dataset, write

    pixels = (np.arange(rows * cols, dtype=np.uint16) % 4096).reshape(rows, cols)
    ds = make_dataset(
        pixels,
        photometric=photometric,
        bits_stored=12,
        sex=sex,
        age=age,
        view=None,
        patient_id=None,
        pixel_spacing=None,
        sop_class_uid=SecondaryCaptureImageStorage,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write(ds, path)


def write_vindr(root, layout: str = "physionet", missing_dicom: str | None = None) -> dict:
    """PhysioNet layout (annotations/*.csv with 3 readers per train image, "Other disease" in the test file,
    NaN "No finding" boxes) or the Kaggle VinBigData single train.csv with class_id; DICOM headers with
    PatientAge "045Y", a missing age, sex "O", MONOCHROME1."""
    root = Path(root)
    kaggle_id = {"Nodule/Mass": 8, "Pleural effusion": 10, "Aortic enlargement": 0, "No finding": 14}
    if layout == "physionet":
        for split in ("train", "test"):
            cols = [c if not (split == "test" and c == "Other diseases") else "Other disease" for c in VINDR_LABELS]
            lab = ["image_id,rad_id," + ",".join(cols)]
            box = ["image_id,rad_id,class_name,x_min,y_min,x_max,y_max"]
            for img, (sp, readers, boxes, _) in VINDR_IMAGES.items():
                if sp != split:
                    continue
                for r, pos in readers.items():
                    lab.append(f"{img},{r}," + ",".join("1" if c in pos else "0" for c in VINDR_LABELS))
                    if "No finding" in pos:
                        box.append(f"{img},{r},No finding,,,,")
                for r, c, *xy in boxes:
                    box.append(f"{img},{r},{c}," + ",".join(f"{v:.1f}" for v in xy))
            _write(root / "annotations" / f"image_labels_{split}.csv", "\n".join(lab) + "\n")
            _write(root / "annotations" / f"annotations_{split}.csv", "\n".join(box) + "\n")
    else:
        rows = ["image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max"]
        for img, (sp, readers, boxes, _) in VINDR_IMAGES.items():
            if sp != "train" or img == "t3":  # Kaggle has no Edema class: leave the edema image out
                continue
            for r, pos in readers.items():
                if "No finding" in pos:
                    rows.append(f"{img},No finding,14,{r},,,,")
            for r, c, *xy in boxes:
                rows.append(f"{img},{c},{kaggle_id[c]},{r}," + ",".join(f"{v:.1f}" for v in xy))
        _write(root / "train.csv", "\n".join(rows) + "\n")
    for img, (sp, _, _, hdr) in VINDR_IMAGES.items():
        if img != missing_dicom and (layout == "physionet" or sp == "train"):
            _dicom(root / sp / f"{img}.dicom", *hdr)
    return {
        "physionet_any": {
            "images": 5,
            "positives": {"nodule_mass": 1, "pleural_effusion": 2, "edema": 1},
            "boxes": {"nodule_mass": 2, "pleural_effusion": 2, "edema": 3},
            "sex": {"M": 2, "F": 2, "unknown": 1},
            "age_group": {"[40,60)": 1, "unknown": 1, "[60,80)": 2, "[20,40)": 1},
        },
        "physionet_majority": {
            "positives": {"nodule_mass": 1, "pleural_effusion": 1, "edema": 1},
            "boxes": {"nodule_mass": 2, "pleural_effusion": 1, "edema": 3},
        },
        "kaggle_any": {
            "images": 2,
            "positives": {"nodule_mass": 1, "pleural_effusion": 1, "edema": 0},
            "unknown_edema": 2,
            "boxes": {"nodule_mass": 2, "pleural_effusion": 1, "edema": 0},
        },
        "frame_t1": [48, 64],
    }


# -------------------------------------------------------------------------------------------------- CheXpert
CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
    "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,"
    "Pleural Other,Fracture,Support Devices"
)
# path tail, sex, age, frontal/lateral, ap/pa, lung lesion, edema, pleural effusion   ("" = blank)
CHEXPERT_TRAIN = [
    ("train/patient00001/study1/view1_frontal.jpg", "Female", "68", "Frontal", "AP", "1.0", "", "-1.0"),
    ("train/patient00001/study1/view2_lateral.jpg", "Female", "68", "Lateral", "", "1.0", "", "-1.0"),
    ("train/patient00002/study1/view1_frontal.jpg", "Male", "0", "Frontal", "PA", "", "1.0", "0.0"),
    ("train/patient00003/study2/view1_frontal.jpg", "Unknown", "45", "Frontal", "AP", "0.0", "-1.0", "1.0"),
    ("train/patient00004/study1/view1_frontal.jpg", "Male", "85", "Frontal", "AP", "", "", "maybe"),
]
CHEXPERT_VALID = [
    ("valid/patient64541/study1/view1_frontal.jpg", "Male", "73", "Frontal", "AP", "0.0", "1.0", "1.0"),
    ("valid/patient64542/study1/view1_frontal.jpg", "Female", "22", "Frontal", "PA", "1.0", "0.0", "0.0"),
]


def _chexpert_line(row, prefix):
    path, sex, age, fl, appa, lesion, edema, eff = row
    vals = {"Lung Lesion": lesion, "Edema": edema, "Pleural Effusion": eff}
    labels = [vals.get(c, "") for c in CHEXPERT_HEADER.split(",")[5:]]
    return ",".join([f"{prefix}/{path}", sex, age, fl, appa, *labels])


def write_chexpert(root) -> dict:
    """CheXpert-v1.0-small/{train,valid}.csv with 1.0/0.0/-1.0/blank labels, Male/Female/Unknown, Age 0, one
    Path with the other (``CheXpert-v1.0/``) prefix, and an unparsable label value."""
    d = Path(root) / "CheXpert-v1.0-small"
    lines = [CHEXPERT_HEADER] + [
        _chexpert_line(r, "CheXpert-v1.0-small" if i != 2 else "CheXpert-v1.0") for i, r in enumerate(CHEXPERT_TRAIN)
    ]
    _write(d / "train.csv", "\n".join(lines) + "\n")
    _write(
        d / "valid.csv",
        "\n".join([CHEXPERT_HEADER] + [_chexpert_line(r, "CheXpert-v1.0-small") for r in CHEXPERT_VALID]) + "\n",
    )
    return {
        "images": 7,
        "validation": 2,
        "training_pool": 5,
        "labels": {  # by path tail: [nodule_mass, pleural_effusion, edema]
            "train/patient00001/study1/view1_frontal.jpg": [1, -1, -1],
            "train/patient00002/study1/view1_frontal.jpg": [-1, 0, 1],
            "train/patient00003/study2/view1_frontal.jpg": [0, 1, -1],
            "train/patient00004/study1/view1_frontal.jpg": [-1, -1, -1],
            "valid/patient64541/study1/view1_frontal.jpg": [0, 1, 1],
        },
        "sex": {"F": 3, "M": 3, "unknown": 1},
        "age_zero_line": 4,
        "bad_label_line": 6,
    }


def _rle(h, w, box):
    from pycocotools import mask as mask_utils

    m = np.zeros((h, w), dtype=np.uint8)
    if box:
        x0, y0, x1, y1 = box
        m[y0:y1, x0:x1] = 1
    r = mask_utils.encode(np.asfortranarray(m))
    return {"size": [h, w], "counts": r["counts"].decode()}


def write_chexlocalize(root, images: bool = True) -> dict:
    """The CheXlocalize download: CheXpert/{val,test}_labels.csv (test without Sex/Age), images, and
    CheXlocalize/gt_annotations_* (polygons, img_size [h, w]) + gt_segmentations_* (pycocotools RLE, all ten
    pathologies, empty when negative)."""
    root = Path(root)
    ten = [
        "Enlarged Cardiomediastinum",
        "Cardiomegaly",
        "Lung Lesion",
        "Airspace Opacity",
        "Edema",
        "Consolidation",
        "Atelectasis",
        "Pneumothorax",
        "Pleural Effusion",
        "Support Devices",
    ]
    val = [
        ("patient64541/study1/view1_frontal", "Male", "73", 0, 1, 1),  # lesion, edema, effusion
        ("patient64542/study1/view1_frontal", "Female", "22", 1, 0, 0),
        ("patient64543/study1/view1_frontal", "Female", "51", 0, 0, 0),
    ]
    test = [("patient64741/study1/view1_frontal", 0, 0, 1), ("patient64742/study1/view1_frontal", 1, 1, 0)]
    hdr = "Path,Sex,Age,Frontal/Lateral,AP/PA,Lung Lesion,Edema,Pleural Effusion"
    _write(
        root / "CheXpert" / "val_labels.csv",
        "\n".join([hdr] + [f"CheXpert-v1.0/valid/{p}.jpg,{s},{a},Frontal,AP,{l},{e},{f}" for p, s, a, l, e, f in val])
        + "\n",
    )
    _write(
        root / "CheXpert" / "test_labels.csv",
        "\n".join(["Path,Lung Lesion,Edema,Pleural Effusion"] + [f"test/{p}.jpg,{l},{e},{f}" for p, l, e, f in test])
        + "\n",
    )
    h, w = 40, 32  # full-resolution size of the replica images: img_size = [h, w]
    ann_val = {
        "patient64541_study1_view1_frontal": {
            "img_size": [h, w],
            "Edema": [[[2, 3], [20, 3], [20, 30]], [[22, 5], [30, 5], [30, 20], [22, 20]]],
            "Pleural Effusion": [[[1, 30], [15, 30], [15, 39]]],
        },
        "patient64542_study1_view1_frontal": {"img_size": [h, w], "Lung Lesion": [[[10, 10], [14, 10], [14, 14]]]},
    }
    seg_val = {
        "patient64541_study1_view1_frontal": {
            p: _rle(h, w, (2, 3, 20, 30) if p in ("Edema", "Pleural Effusion") else None) for p in ten
        },
        "patient64542_study1_view1_frontal": {
            p: _rle(h, w, (10, 10, 14, 14) if p == "Lung Lesion" else None) for p in ten
        },
    }
    seg_test = {  # test: RLE only (no polygon file for test in this replica)
        "patient64741_study1_view1_frontal": {
            p: _rle(h, w, (3, 20, 25, 38) if p == "Pleural Effusion" else None) for p in ten
        },
        "patient64742_study1_view1_frontal": {
            p: _rle(h, w, (5, 5, 9, 9) if p in ("Lung Lesion", "Edema") else None) for p in ten
        },
    }
    _write(root / "CheXlocalize" / "gt_annotations_val.json", json.dumps(ann_val))
    _write(root / "CheXlocalize" / "gt_segmentations_val.json", json.dumps(seg_val))
    _write(root / "CheXlocalize" / "gt_segmentations_test.json", json.dumps(seg_test))
    if images:
        from PIL import Image

        for sub, rows in (("val", val), ("test", test)):
            for r in rows:
                p = root / "CheXpert" / sub / f"{r[0]}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((h, w), 128, np.uint8), mode="L").save(p)
    return {
        "images": 5,
        "validation": 3,
        "test": 2,
        "positives": {"nodule_mass": 2, "pleural_effusion": 2, "edema": 2},
        # auto: polygons where present (val), RLE otherwise (test); one entry per contour
        "shapes_auto": {"nodule_mass": 2, "pleural_effusion": 2, "edema": 3},
        "types_auto": {"polygon": 4, "rle": 3},
        "shapes_rle": {"nodule_mass": 2, "pleural_effusion": 2, "edema": 2},
        "frame": [w, h],
    }


# ------------------------------------------------------------------------------------------------------ MIMIC
MIMIC_IMAGES = [  # dicom_id, subject, study, view, date, split
    ("d1", "10000032", "50414267", "PA", "21800506", "train"),
    ("d2", "10000032", "50414267", "LATERAL", "21800506", "train"),
    ("d3", "10000764", "57375967", "AP", "21320112", "validate"),
    ("d4", "10000898", "50771383", "PA", "21850101", "test"),
    ("d5", "19999999", "59999999", "AP", "21900101", "train"),  # subject not in patients.csv
]
MIMIC_LABELS = {  # study -> (Lung Lesion, Pleural Effusion, Edema) as written
    "50414267": ("1.0", "", "-1.0"),
    "57375967": ("", "1.0", "1.0"),
    "50771383": ("0.0", "0.0", "0.0"),
    "59999999": ("", "1.0", ""),
}
MIMIC_PATIENTS = [("10000032", "F", "52", "2180"), ("10000764", "M", "76", "2132"), ("10000898", "F", "91", "2180")]


def write_mimic(root) -> dict:
    """MIMIC-CXR-JPG metadata/split (plain CSV) + chexpert labels (.csv.gz), MIMIC-IV hosp/patients.csv.gz,
    REFLACX metadata_phase_3.csv + ellipses, MS-CXR boxes."""
    root = Path(root)
    base = root / "mimic-cxr-jpg" / "2.0.0"
    meta = [
        "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
        "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
        "PatientOrientationCodeSequence_CodeMeaning"
    ]
    meta += [
        f"{d},{s},{st},CHEST (PA AND LAT),{v},3056,2544,{dt},120000,CHEST,postero-anterior,Erect"
        for d, s, st, v, dt, _ in MIMIC_IMAGES
    ]
    _write(base / "mimic-cxr-2.0.0-metadata.csv", "\n".join(meta) + "\n")
    cols = [
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Edema",
        "Enlarged Cardiomediastinum",
        "Fracture",
        "Lung Lesion",
        "Lung Opacity",
        "No Finding",
        "Pleural Effusion",
        "Pleural Other",
        "Pneumonia",
        "Pneumothorax",
        "Support Devices",
    ]
    lab = ["subject_id,study_id," + ",".join(cols)]
    subj = {st: s for _, s, st, *_ in MIMIC_IMAGES}
    for st, (les, eff, ede) in MIMIC_LABELS.items():
        v = {"Lung Lesion": les, "Pleural Effusion": eff, "Edema": ede}
        lab.append(f"{subj[st]},{st}," + ",".join(v.get(c, "") for c in cols))
    _write(base / "mimic-cxr-2.0.0-chexpert.csv.gz", "\n".join(lab) + "\n", gz=True)
    _write(
        base / "mimic-cxr-2.0.0-split.csv",
        "\n".join(
            ["dicom_id,study_id,subject_id,split"] + [f"{d},{st},{s},{sp}" for d, s, st, _, _, sp in MIMIC_IMAGES]
        )
        + "\n",
    )
    _write(
        root / "mimic-iv" / "hosp" / "patients.csv.gz",
        "\n".join(
            ["subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod"]
            + [f"{s},{g},{a},{y},2014 - 2016," for s, g, a, y in MIMIC_PATIENTS]
        )
        + "\n",
        gz=True,
    )
    rf = root / "reflacx" / "main_data"
    labcols = [
        "Abnormal mediastinal contour",
        "Acute fracture",
        "Atelectasis",
        "Consolidation",
        "Enlarged cardiac silhouette",
        "Enlarged hilum",
        "Groundglass opacity",
        "Hiatal hernia",
        "High lung volume / emphysema",
        "Interstitial lung disease",
        "Lung nodule or mass",
        "Other",
        "Pleural abnormality",
        "Pneumothorax",
        "Pulmonary edema",
        "Support devices",
        "Quality issue",
    ]
    _write(
        rf / "metadata_phase_3.csv",
        "\n".join(
            ["id,split,eye_tracking_data_discarded,image,subject_id,image_size_x,image_size_y," + ",".join(labcols)]
            + [
                "P300R000001,train,False,physionet.org/files/mimic-cxr/2.0.0/files/p10/p10000032/s50414267/d1.dcm,"
                "10000032,2544,3056," + ",".join(["0"] * len(labcols)),
                "P300R000002,test,False,physionet.org/files/mimic-cxr/2.0.0/files/p10/p10000764/s57375967/d3.dcm,"
                "10000764,2544,3056," + ",".join(["0"] * len(labcols)),
            ]
        )
        + "\n",
    )

    def ell(rows):
        return (
            "\n".join(
                ["xmin,ymin,xmax,ymax,certainty," + ",".join(labcols)]
                + [
                    f"{x0},{y0},{x1},{y1},{c}," + ",".join("True" if lc in on else "False" for lc in labcols)
                    for x0, y0, x1, y1, c, on in rows
                ]
            )
            + "\n"
        )

    _write(
        rf / "P300R000001" / "anomaly_location_ellipses.csv",
        ell([(100, 200, 400, 500, 4, {"Lung nodule or mass"}), (10, 20, 30, 40, 1, {"Lung nodule or mass"})]),
    )
    _write(
        rf / "P300R000002" / "anomaly_location_ellipses.csv",
        ell([(50, 1500, 900, 2800, 5, {"Pleural abnormality", "Pulmonary edema"})]),
    )
    _write(
        root / "ms-cxr" / "MS_CXR_Local_Alignment_v1.1.0.csv",
        "\n".join(
            [
                "dicom_id,category_name,label_text,path,x,y,w,h,image_width,image_height,split",
                "d3,Edema,mild edema,files/p10/p10000764/s57375967/d3.jpg,300,400,1200,900,2544,3056,test",
                "d4,Pneumonia,left pneumonia,files/p10/p10000898/s50771383/d4.jpg,1,2,3,4,2544,3056,test",
            ]
        )
        + "\n",
    )
    return {
        "images": 5,
        "positives": {"nodule_mass": 2, "pleural_effusion": 2, "edema": 1},
        "unknown": {"nodule_mass": 2, "pleural_effusion": 2, "edema": 3},
        "sex": {"F": 3, "M": 1, "unknown": 1},
        "ages": {"d1": 52, "d3": 76, "d4": 96, "d5": None},  # anchor_age + (study year - anchor_year)
        "splits": {"training": 3, "validation": 1, "test": 1},
        "shapes": {"nodule_mass": 1, "pleural_effusion": 1, "edema": 2},  # 1 low-certainty ellipse dropped
        "image_d1": "mimic-cxr-jpg/2.0.0/files/p10/p10000032/s50414267/d1.jpg",
    }


# --------------------------------------------------------------------------------------------------- PadChest
PADCHEST_ROWS = [  # ImageID, dir, study date, patient, birth, sex, projection, Labels
    ("img1.png", "0", "20150213", "pA", "1950.0", "M", "PA", "['pleural effusion', 'nodule']"),
    ("img2.png", "0", "20160101", "pA", "1950.0", "M", "L", "['pleural effusion', ' nodule']"),
    ("img3.png", "1", "20120505", "pB", "1990.0", "F", "AP", "['normal']"),
    ("img4.png", "1", "20140101", "pC", "1930.0", "F", "PA", "['pseudonodule', 'breast mass']"),
    (
        "img5.png",
        "2",
        "20170707",
        "pD",
        "nan",
        "",
        "AP_horizontal",
        "['pulmonary edema', 'loculated pleural effusion']",
    ),
    ("img6.png", "2", "20130303", "pE", "1960.0", "M", "PA", ""),  # missing Labels
    ("img7.png", "2", "20130303", "pF", "1970.0", "F", "PA", "['pulmonary mass'"),  # malformed list
]


def write_padchest(root, with_gr: bool = True) -> dict:
    """The PadChest 160K CSV (some column names in other case, list-in-a-string Labels, NaN birth), one 16-bit
    PNG, and PadChest-GR grounded_reports_20240819.json + master_table.csv."""
    root = Path(root)
    cols = [
        "ImageID",
        "ImageDir",
        "StudyDate_DICOM",
        "StudyID",
        "PatientID",
        "PatientBirth",
        "patientsex_dicom",
        "ViewPosition_DICOM",
        "Projection",
        "Rows_DICOM",
        "Columns_DICOM",
        "Labels",
        "LabelCUIS",
    ]
    lines = [",".join(cols)]
    for img, d, dt, p, b, s, proj, lab in PADCHEST_ROWS:
        labq = '"' + lab + '"' if lab else ""
        lines.append(",".join([img, d, dt, f"st_{img}", p, b, s, "POSTEROANTERIOR", proj, "2000", "1600", labq, ""]))
    _write(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", "\n".join(lines) + "\n")
    _png(root / "0" / "img1.png", size=(20, 25), bits=16)
    if with_gr:
        gr = [
            {
                "StudyID": "st_img1.png",
                "ImageID": "img1.png",
                "findings": [
                    {
                        "sentence_en": "left effusion",
                        "abnormal": True,
                        "boxes": [[0.1, 0.5, 0.4, 0.9]],
                        "extra_boxes": [],
                        "labels": ["pleural effusion"],
                        "locations": ["left"],
                        "progression": None,
                    },
                    {
                        "sentence_en": "nodule",
                        "abnormal": True,
                        "boxes": [[0.6, 0.2, 0.7, 0.3], [0.2, 0.2, 0.3, 0.3]],
                        "extra_boxes": [],
                        "labels": ["nodule"],
                        "locations": [],
                        "progression": None,
                    },
                ],
            },
            {
                "StudyID": "st_img5.png",
                "ImageID": "img5.png",
                "findings": [
                    {
                        "sentence_en": "edema",
                        "abnormal": True,
                        "boxes": [[100, 200, 900, 1500]],
                        "extra_boxes": [],
                        "labels": ["pulmonary edema"],
                        "locations": [],
                        "progression": None,
                    }
                ],
            },
        ]
        _write(root / "PadChest_GR" / "grounded_reports_20240819.json", json.dumps(gr))
        _write(
            root / "PadChest_GR" / "master_table.csv",
            "\n".join(
                [
                    "ImageID,StudyID,PatientID,PatientSex_DICOM,PatientAge,split",
                    "img1.png,st_img1.png,pA,M,65,test",
                    "img5.png,st_img5.png,pD,,,train",
                ]
            )
            + "\n",
        )
    return {
        "images": 7,
        "positives": {"nodule_mass": 2, "pleural_effusion": 3, "edema": 1},
        "unknown_rows": 2,
        "sex": {"M": 3, "F": 3, "unknown": 1},
        "age_group": {"[60,80)": 2, "[20,40)": 1, "[80,inf)": 1, "unknown": 1, "[40,60)": 2},
        "shapes": {"nodule_mass": 2, "pleural_effusion": 1, "edema": 1},
        "normalized_boxes": 3,
        "pixel_boxes": 1,
        "bad_lines": {"missing Labels": 7, "unparsable Labels (not a ['...'] list)": 8},
    }


# ------------------------------------------------------------------------------------------------------- JSRT
JSRT_CLN = [  # name, subtlety, size_mm, age, sex, x, y, malignancy, location, diagnosis
    ("JPCLN001.IMG", "5", "15", "53", "male", "1634", "692", "malignant", "l.upper lobe", "lung cancer"),
    ("JPCLN002.IMG", "4", "20", "?", "female", "500", "1200", "benign", "r.lower lobe", "hamartoma"),
    ("JPCLN003.IMG", "3", "x", "71", "female", "900", "800", "malignant", "r.upper lobe", "lung cancer"),
]
JSRT_CNN = [("JPCNN001.IMG", "38", "female", "non-nodule"), ("JPCNN002.IMG", "62", "male", "non-nodule")]


def write_jsrt(root, images: bool = True, truncated: str | None = "JPCNN002.IMG") -> dict:
    """CLNDAT_EN.txt (tabs; one line separated by runs of spaces; an unparsable size; age "?"), CNNDAT_EN.TXT
    (upper-case extension) and raw 2048x2048 big-endian uint16 .IMG files (one truncated)."""
    root = Path(root)
    lines = ["\t".join(r) for r in JSRT_CLN[:2]] + ["   ".join(JSRT_CLN[2])]
    _write(root / "CLNDAT_EN.txt", "\n".join(lines) + "\n")
    _write(root / "CNNDAT_EN.TXT", "\n".join("\t".join(r) for r in JSRT_CNN) + "\n")
    if images:
        d = root / "All247images"
        d.mkdir(parents=True, exist_ok=True)
        for name in [r[0] for r in JSRT_CLN] + [r[0] for r in JSRT_CNN]:
            arr = (np.arange(2048 * 2048, dtype=np.uint32) % 4096).astype(">u2")
            data = arr.tobytes()
            (d / name).write_bytes(data[: len(data) // 2] if name == truncated else data)
    return {
        "images": 5,
        "positives": 3,
        "negatives": 2,
        "sex": {"M": 2, "F": 3},
        "age_group": {"[40,60)": 1, "unknown": 1, "[60,80)": 2, "[20,40)": 1},
        "shapes": 2,
        "radius_001": round(15 / 2 / 0.175, 3),
        "centre_001": [1634.0, 692.0],
        "truncated": truncated,
    }
