"""Sex and age from DICOM headers reach the fairness report when the datalist lacks them (datalist values win, the
source is recorded), and images of unknown sex / age are counted and warned about, never dropped silently.

The DICOMs come from the project's factory (bundle.utils.dicom); the expected groups are read back here with plain
pydicom and the gaps recomputed with scikit-learn from the written predictions.csv."""

import csv
import json
import logging
import math
import os

import numpy as np
import pydicom
import pytest
import torch
from sklearn.metrics import roc_auc_score

from bundle.data.datalist import load
from bundle.demographics import age_from_dates, demographics_counts, dicom_date, fill_demographics
from bundle.evaluation import evaluate
from bundle.networks import AlignerVLM
from bundle.transforms.io import LoadCXRd, read_dicom_demographics
from bundle.utils.dicom import make_dataset, phantom, write
from tests.test_evaluation import _ListHandler, _preprocessing
from tests.test_networks import TINY

CLASSES = ["nodule_mass", "pleural_effusion", "edema"]
NODEMO = "test_nodemo"  # a split whose DICOMs carry neither sex nor age


# ------------------------------------------------------------------------------------------------- unit
@pytest.mark.parametrize(
    "birth, on, age",
    [
        ("19600615", "20240614", 63.0),  # the day before the 64th birthday
        ("19600615", "20240615", 64.0),
        ("1960.06.15", "2024-06-15", 64.0),  # ACR-NEMA and ISO spellings
        ("20240101", "20240701", 182 / 365.25),  # an infant: the fraction of a year, as "006M" gives 0.5
        ("19000101", "20240101", None),  # an anonymiser's placeholder: 124 years is not an age
        ("20250101", "20240101", None),  # born after the study
        ("", "20240101", None),
        ("19600615", "20240231", None),  # not a date
    ],
)
def test_age_from_dates(birth, on, age):
    got = age_from_dates(birth, on)
    assert got == (pytest.approx(age) if age is not None else None)


def test_dicom_date_forms():
    assert dicom_date("20240131") == dicom_date("20240131120000.5") == dicom_date(b"20240131")
    assert dicom_date(None) is None and dicom_date("2024") is None and dicom_date(20240131) is None


def _dcm(path, seed=0, **kw) -> str:
    p16 = (phantom(40, 36, seed=seed) * 4095).astype(np.uint16)
    return write(make_dataset(p16, bits_stored=12, **kw), path)


def test_header_reader_and_precedence(tmp_path):
    age_str = _dcm(tmp_path / "a.dcm", sex="M", age="063Y")
    months = _dcm(tmp_path / "b.dcm", sex="F", age="006M")
    born = _dcm(tmp_path / "c.dcm", sex="O", age=None, extra={"PatientBirthDate": "19540301", "StudyDate": "20240615"})
    acq = _dcm(
        tmp_path / "d.dcm", sex=None, age="XYZ", extra={"PatientBirthDate": "19800101", "AcquisitionDate": "20200101"}
    )
    raw = _dcm(tmp_path / "e", sex="F", age="045Y")
    raw = write(pydicom.dcmread(raw), tmp_path / "raw", preamble=False)  # a dataset without preamble
    assert read_dicom_demographics(age_str) == {"sex": "M", "age": 63.0, "age_from": "PatientAge"}
    assert read_dicom_demographics(months)["age"] == pytest.approx(0.5)
    assert read_dicom_demographics(born) == {"sex": None, "age": 70.0, "age_from": "PatientBirthDate"}
    assert read_dicom_demographics(acq) == {"sex": None, "age": 40.0, "age_from": "PatientBirthDate"}
    assert read_dicom_demographics(raw)["sex"] == "F"
    # header only: a file whose pixel data is cut short still gives its demographics
    with open(age_str, "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 2000])
    assert read_dicom_demographics(str(cut))["sex"] == "M"
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    assert read_dicom_demographics(str(png)) == {} and read_dicom_demographics(str(tmp_path / "missing.dcm")) == {}
    # the loader fills from the same rules (birth date included)
    assert LoadCXRd(keys="image")({"image": born})["age"] == 70.0

    recs = [
        {"image": age_str, "sex": "F", "age": 30},  # the datalist wins on both
        {"image": age_str, "sex": "unknown", "age": None},  # both from the header
        {"image": born, "sex": "M", "age": None},  # sex from the datalist, age from the birth date
        {"image": str(png), "sex": None, "age": None},  # no header: unknown
    ]
    calls = []

    def reader(path):
        calls.append(path)
        return read_dicom_demographics(path)

    got = fill_demographics(recs, reader)
    assert [(r["sex"], r["sex_source"], r["age"], r["age_source"]) for r in got] == [
        ("F", "datalist", 30, "datalist"),
        ("M", "dicom", 63.0, "dicom"),
        ("M", "datalist", 70.0, "dicom_birth_date"),
        ("unknown", "unknown", None, "unknown"),
    ]
    assert calls == [age_str, born, str(png)]  # a header is read only for records that lack something
    assert recs[1]["sex"] == "unknown"  # the input records are not changed
    counts = demographics_counts(got)
    assert counts["sex"] == {"datalist": 2, "dicom": 1, "unknown": 1}
    assert counts["age"] == {"datalist": 1, "dicom": 1, "dicom_birth_date": 1, "unknown": 1}


# ------------------------------------------------------------------------------------------------- evaluation
def _write_dataset(root) -> str:
    """Validation and test splits of factory DICOMs whose datalist records carry no sex or age (one test record
    gives a sex that contradicts its header: the datalist wins), and a split whose DICOMs carry none either."""
    rng = np.random.default_rng(3)
    os.makedirs(root / "img", exist_ok=True)
    splits = {"validation": [], "test": [], NODEMO: []}
    k = 0
    for split, n in (("validation", 12), ("test", 32), (NODEMO, 6)):
        for i in range(n):
            if split == NODEMO:
                kw = {"sex": None, "age": None}
            elif i % 4 in (0, 1):
                kw = {"sex": "M" if i % 2 else "F", "age": "035Y"}
            elif i % 4 == 2:  # no PatientAge: the birth date and the study date give 70
                kw = {"sex": "F", "age": None, "extra": {"PatientBirthDate": "19540301", "StudyDate": "20240615"}}
            else:  # only an acquisition date: 71
                kw = {"sex": "M", "age": None, "extra": {"PatientBirthDate": "19530101", "AcquisitionDate": "20240615"}}
            path = _dcm(root / "img" / f"{split}_{i}.dcm", seed=k, patient_id=f"P{k}", **kw)
            rec = {"image": os.path.relpath(path, root), "label": rng.integers(0, 2, 3).tolist(), "patient_id": f"P{k}"}
            if split == "test" and i == 5:
                rec["sex"] = "F"  # the header says M
            splits[split].append(rec)
            k += 1
    path = root / "datalist.json"
    path.write_text(json.dumps({"name": "dicom-demographics", "classes": CLASSES, **splits}))
    return str(path)


def _expected_groups(rec):
    """Sex and age group of a record as this test reads them: the datalist's sex, else PatientSex; PatientAge, else
    completed years from PatientBirthDate to StudyDate or AcquisitionDate (plain pydicom and arithmetic)."""
    ds = pydicom.dcmread(rec["image"], stop_before_pixels=True)
    sex = rec["sex"] if rec["sex"] in ("M", "F") else str(ds.get("PatientSex") or "unknown")
    if ds.get("PatientAge"):
        age = int(str(ds.PatientAge)[:3])
    elif ds.get("PatientBirthDate"):
        b, d = str(ds.PatientBirthDate), str(ds.get("StudyDate") or ds.get("AcquisitionDate"))
        age = int(d[:4]) - int(b[:4]) - ((int(d[4:6]), int(d[6:])) < (int(b[4:6]), int(b[6:])))
    else:
        return sex, "unknown"
    return sex, f"[{age // 20 * 20},{age // 20 * 20 + 20})"


def _spread(net, records, pre):
    """Scale and centre each class's logits on ``records`` (std 1, mean 0; the per-class classifier's row c scores
    class c): nearly identical phantoms give a random network's scores that differ in the 7th decimal; spread, they
    have no ties at the 6 decimals of predictions.csv, so the AUCs recomputed from it are exact."""
    images = torch.stack([pre({**r, "index": i})["image"] for i, r in enumerate(records)])
    net.eval()
    with torch.no_grad():
        logits = net(images)["logits"]
        k = 1.0 / logits.std(0)
        net.classifier.weight.mul_(k[:, None])
        net.classifier.bias.mul_(k).sub_(k * logits.mean(0))
    return net


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom_demo")
    datalist = load(_write_dataset(root))
    assert {r["sex"] for r in datalist["test"]} == {"unknown", "F"} and {r["age"] for r in datalist["test"]} == {None}
    torch.manual_seed(0)
    pre = _preprocessing(CLASSES)
    net = _spread(AlignerVLM(classes=CLASSES, **TINY, classifier="per_class"), datalist["test"], pre)
    handler = _ListHandler()
    logging.getLogger("bundle").addHandler(handler)
    try:
        summary = evaluate(
            network=net,
            datalist=datalist,
            preprocessing=pre,
            output_dir=str(root / "report"),
            splits=("test", NODEMO),
            n_boot=0,
            device=torch.device("cpu"),
            batch_size=16,
            min_count=2,
        )
    finally:
        logging.getLogger("bundle").removeHandler(handler)
    return datalist, str(root / "report"), summary, handler.lines


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_dicom_demographics_reach_the_report(evaluated):
    datalist, out, summary, _ = evaluated
    rows = _rows(os.path.join(out, "test", "predictions.csv"))
    expected = [_expected_groups(datalist["test"][int(r["index"])]) for r in rows]
    assert [(r["sex"], r["age_group"]) for r in rows] == expected
    assert rows[5]["sex"] == "F" and rows[5]["sex_source"] == "datalist"  # the datalist wins over PatientSex "M"
    assert {r["sex_source"] for i, r in enumerate(rows) if i != 5} == {"dicom"}
    assert {r["age_source"] for r in rows} == {"dicom", "dicom_birth_date"}
    s = summary["test"]
    assert (s["test_n_unknown_sex"], s["test_n_unknown_age"]) == (0, 0)
    assert (s["test_n_sex_from_dicom"], s["test_n_age_from_dicom"]) == (31, 32)
    report = json.loads(open(os.path.join(out, "test", "fairness_report.json")).read())
    assert report["demographics"]["sex"] == {"datalist": 1, "dicom": 31, "unknown": 0}
    assert report["demographics"]["age"]["dicom_birth_date"] == 16
    # every gap equals scikit-learn's on the DICOM-derived groups
    for a, pos in (("sex", 0), ("age", 1)):
        labels = np.array([e[pos] for e in expected])
        assert len(set(labels)) == 2 and "unknown" not in labels
        for c in CLASSES:
            y = np.array([int(r[f"label_{c}"]) for r in rows])
            score = np.array([float(r[f"score_{c}"]) for r in rows])
            aucs = [roc_auc_score(y[labels == g], score[labels == g]) for g in sorted(set(labels))]
            assert s[f"test_{c}/{a}/gap_auc"] == pytest.approx(max(aucs) - min(aucs), abs=1e-9), (a, c)
            assert report["classes"][c][a]["gaps"]["auc"]["gap"] == pytest.approx(max(aucs) - min(aucs), abs=1e-9)


def test_unknown_demographics_are_counted_and_warned(evaluated):
    _, out, summary, warnings = evaluated
    s = summary[NODEMO]
    assert (s[f"{NODEMO}_n_unknown_sex"], s[f"{NODEMO}_n_unknown_age"]) == (6, 6)
    assert math.isnan(s[f"{NODEMO}_nodule_mass/sex/gap_auc"])  # no gap without known groups ...
    said = [w for w in warnings if f"{NODEMO}: 6 of 6 images have unknown" in w]
    assert len(said) == 2 and all("no sex gap" in w or "no age gap" in w for w in said)  # ... and it is said
    assert not any("evaluation: test:" in w and "unknown" in w for w in warnings)  # nothing to say for the test split
    written = json.loads(open(os.path.join(out, "summary.json")).read())
    assert written[NODEMO][f"{NODEMO}_n_unknown_sex"] == 6 and written["test"]["test_n_unknown_sex"] == 0
    rows = _rows(os.path.join(out, NODEMO, "predictions.csv"))
    assert {(r["sex"], r["sex_source"], r["age"], r["age_source"]) for r in rows} == {
        ("unknown", "unknown", "", "unknown")
    }
