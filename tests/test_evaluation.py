"""bundle.evaluation.evaluate in process on the tiny synthetic benchmark with a tiny network: the report files, and
summary numbers that scikit-learn recomputes from the written predictions.csv; a test split with a truncated DICOM
and a patient id with a lone surrogate, and a split none of whose files loads."""

import copy
import csv
import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureTyped, SelectItemsd
from sklearn.metrics import roc_auc_score

from bundle.alignment import AlignFlagsd
from bundle.data.datalist import load
from bundle.evaluation import clean_str, evaluate, load_checkpoint, strict_json
from bundle.networks import AlignerVLM
from bundle.transforms import CXRIntensityd, Letterboxd, LoadCXRd, RasterizeAttentiond
from bundle.utils.dicom import make_dataset, phantom, write
from tests.test_networks import TINY  # the tiny network: 32 px images, 4 x 4 attention maps

SIZE = TINY["image_size"]
SPLITS = ("test", "test_ood")


def _preprocessing(classes):
    """configs/train.yaml's validation preprocessing at SIZE px."""
    keys = ["image", "label", "attn_mask", "attn_available", "align"]
    return Compose(
        [
            LoadCXRd(keys="image", target_size=SIZE),
            Letterboxd(keys="image", size=SIZE),
            CXRIntensityd(keys="image"),
            RasterizeAttentiond(classes=classes, size=SIZE),
            AlignFlagsd(),
            SelectItemsd(keys=keys + ["index"]),
            EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
        ]
    )


def _spread_scores(net, datalist, preprocessing):
    """Rescale the classifier so that logits vary by ~1 between images (a random network's hardly vary): scores
    written with 6 decimals then have no ties, and AUCs recomputed from predictions.csv are exact."""
    records = [{**r, "index": i} for i, r in enumerate(datalist["validation"])]
    images = torch.stack([preprocessing(r)["image"] for r in records])
    net.eval()
    with torch.no_grad():
        logits = net(images)["logits"]
        k = 1.0 / logits.std(0).mean()
        net.classifier.weight.mul_(k)
        net.classifier.bias.mul_(k).sub_(k * logits.mean())
    return net


@pytest.fixture(scope="module")
def evaluated(tiny_datalist, tmp_path_factory):
    datalist = load(tiny_datalist)
    torch.manual_seed(0)
    net = _spread_scores(AlignerVLM(classes=datalist["classes"], **TINY), datalist, _preprocessing(datalist["classes"]))
    out = tmp_path_factory.mktemp("evaluation")
    ckpt = str(out / "model.pt")
    torch.save(net.state_dict(), ckpt)
    summary = evaluate(
        network=AlignerVLM(classes=datalist["classes"], **TINY),  # other weights: the checkpoint must be loaded
        datalist=datalist,
        preprocessing=_preprocessing(datalist["classes"]),
        output_dir=str(out / "report"),
        splits=SPLITS,
        threshold="val_f1",
        threshold_split="validation",
        attributes=("sex", "age"),
        age_scheme="chexclusion",
        n_boot=20,
        seed=0,
        device=torch.device("cpu"),
        ckpt_path=ckpt,
        mlflow_logger=None,
        amp=False,
        batch_size=16,
        min_count=2,
    )
    return datalist, str(out / "report"), summary


def _read_predictions(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _no_constant(name):
    raise ValueError(f"not strict JSON: bare {name} token")


def _strict_load(path):
    """json.loads that refuses NaN / Infinity tokens (strict JSON, what other languages' parsers accept)."""
    with open(path, encoding="utf-8") as f:
        return json.loads(f.read(), parse_constant=_no_constant)


def test_report_files_written(evaluated):
    datalist, out, summary = evaluated
    assert sorted(summary) == sorted(SPLITS)
    assert _strict_load(os.path.join(out, "summary.json")) == strict_json(summary)
    selection = _strict_load(os.path.join(out, "model_selection.json"))
    assert selection["split"] == "validation" and selection["n"] == len(datalist["validation"])
    for split in SPLITS:
        d = os.path.join(out, split)
        for name in ("fairness_report.json", "fairness_report.csv", "predictions.csv"):
            assert os.path.getsize(os.path.join(d, name)) > 0, name
        pngs = set(os.listdir(os.path.join(d, "plots")))
        assert {"auc_by_sex.png", "auc_by_age.png", "sensitivity_by_sex.png"} <= pngs
        assert summary[split]["report_dir"] == d and summary[split]["n"] == len(datalist[split])
        assert summary[split][f"{split}_n_skipped"] == 0
        with open(os.path.join(d, "skipped.csv"), newline="") as f:
            assert list(csv.reader(f)) == [["file", "reason"]]  # header only: nothing skipped
        report = _strict_load(os.path.join(d, "fairness_report.json"))
        assert set(report["alignment"]) == {"hit_rate", "miou", "attention_mass_in_mask"}
        assert [r["index"] for r in _read_predictions(os.path.join(d, "predictions.csv"))] == [
            str(i) for i in range(len(datalist[split]))
        ]  # every image exactly once, in order
    leftovers = [f for _, _, files in os.walk(out) for f in files if f.endswith(".tmp") or f.startswith(".")]
    assert leftovers == []  # atomic writes leave no temporary file


def test_summary_equals_sklearn_on_written_predictions(evaluated):
    datalist, out, summary = evaluated
    classes = datalist["classes"]
    for split in SPLITS:
        rows = _read_predictions(os.path.join(out, split, "predictions.csv"))
        aucs = []
        for c in classes:
            y = np.array([int(r[f"label_{c}"]) for r in rows])
            s = np.array([float(r[f"score_{c}"]) for r in rows])
            known = y >= 0
            auc = roc_auc_score(y[known], s[known]) if len(np.unique(y[known])) == 2 else math.nan
            got = summary[split][f"{split}_{c}/auc"]
            assert (math.isnan(auc) and math.isnan(got)) or got == pytest.approx(auc, abs=1e-9), (split, c)
            aucs.append(auc)
        assert summary[split][f"{split}_mean_auc"] == pytest.approx(np.nanmean(aucs), abs=1e-9)
        hits = np.array([float(r[f"hit_{c}"]) for r in rows for c in classes if r[f"hit_{c}"] != ""])
        assert hits.size > 0
        assert summary[split][f"{split}_hit_rate"] == pytest.approx(hits.mean(), abs=1e-12)


def test_load_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        load_checkpoint(torch.nn.Linear(1, 1), str(tmp_path / "missing.pt"))


# ---------------------------------------------------------------- a truncated DICOM, a strange patient id, a dead split
BAD_PID = "P\udcff7"  # a lone surrogate (a byte 0xff decoded with surrogateescape): not encodable as UTF-8
BROKEN = "broken"  # a split none of whose files loads


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _truncated_dicom(path) -> str:
    """A DICOM whose pixel data is cut short: its header parses, its pixels do not decode."""
    p16 = (phantom(80, 72) * 4095).astype(np.uint16)
    data = write(make_dataset(p16, bits_stored=12, extra={"BodyPartExamined": "CHEST"}), path)
    with open(data, "rb") as f:
        raw = f.read()
    with open(data, "wb") as f:
        f.write(raw[:-3000])
    return str(data)


@pytest.fixture(scope="module")
def evaluated_bad(tiny_datalist, tmp_path_factory):
    datalist = copy.deepcopy(load(tiny_datalist))
    out = tmp_path_factory.mktemp("evaluation_bad")
    bad = _truncated_dicom(out / "truncated.dcm")
    datalist["test"][0]["image"] = bad  # the first record: the placeholders' template comes from the next one
    datalist["test"][3]["patient_id"] = BAD_PID
    datalist[BROKEN] = [{**r, "image": bad} for r in datalist["test"][1:4]]
    torch.manual_seed(0)
    pre = _preprocessing(datalist["classes"])
    net = _spread_scores(AlignerVLM(classes=datalist["classes"], **TINY), datalist, pre)
    ckpt = str(out / "model.pt")
    torch.save(net.state_dict(), ckpt)
    handler = _ListHandler()
    logging.getLogger("bundle").addHandler(handler)
    try:
        summary = evaluate(
            network=AlignerVLM(classes=datalist["classes"], **TINY),
            datalist=datalist,
            preprocessing=pre,
            output_dir=str(out / "report"),
            splits=("test", BROKEN, "test_ood"),
            threshold="val_f1",
            n_boot=10,
            seed=0,
            device=torch.device("cpu"),
            ckpt_path=ckpt,
            batch_size=8,  # the failed item and the others of its batch: the placeholder collates with them
            min_count=2,
        )
    finally:
        logging.getLogger("bundle").removeHandler(handler)
    return datalist, net, bad, str(out / "report"), summary, handler.lines


def test_truncated_dicom_is_skipped_and_reported(evaluated_bad):
    datalist, _, bad, out, summary, warnings = evaluated_bad
    on_disk = _strict_load(os.path.join(out, "summary.json"))  # strict JSON: no NaN token
    assert on_disk["test"]["test_n_skipped"] == 1 and on_disk["test"]["n"] == len(datalist["test"]) - 1
    assert on_disk["test_ood"]["test_ood_n_skipped"] == 0 and on_disk["test_ood"]["n"] == len(datalist["test_ood"])
    with open(os.path.join(out, "test", "skipped.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [bad]
    assert "truncated" in rows[0]["reason"].lower() or "pixel data" in rows[0]["reason"].lower(), rows[0]["reason"]
    assert sum(bad in w for w in warnings) == 1 + len(datalist[BROKEN])  # one warning line per skipped file
    preds = _read_predictions(os.path.join(out, "test", "predictions.csv"))
    assert [int(r["index"]) for r in preds] == list(range(1, len(datalist["test"])))  # the placeholder is in no row
    for split in ("test", "test_ood"):
        for name in ("fairness_report.json", "fairness_report.csv", "predictions.csv"):
            assert os.path.getsize(os.path.join(out, split, name)) > 0
        _strict_load(os.path.join(out, split, "fairness_report.json"))
    _strict_load(os.path.join(out, "model_selection.json"))


def test_metrics_equal_sklearn_on_the_loaded_samples(evaluated_bad):
    datalist, net, _, _, summary, _ = evaluated_bad
    pre = _preprocessing(datalist["classes"])
    items = [pre({**r, "index": i}) for i, r in enumerate(datalist["test"]) if i > 0]  # record 0 is the bad one
    net.eval()
    with torch.no_grad():
        scores = torch.sigmoid(net(torch.stack([it["image"] for it in items]))["logits"].float()).numpy()
    labels = torch.stack([it["label"] for it in items]).numpy()
    aucs = []
    for ci, c in enumerate(datalist["classes"]):
        known = labels[:, ci] >= 0
        y, s = labels[known, ci], scores[known, ci]
        auc = roc_auc_score(y, s) if len(np.unique(y)) == 2 else math.nan
        got = summary["test"][f"test_{c}/auc"]
        assert (math.isnan(auc) and math.isnan(got)) or got == pytest.approx(auc, abs=1e-6), c
        aucs.append(auc)
    assert summary["test"]["test_mean_auc"] == pytest.approx(np.nanmean(aucs), abs=1e-6)


def test_lone_surrogate_patient_id_is_written_escaped(evaluated_bad):
    _, _, _, out, _, _ = evaluated_bad
    preds = _read_predictions(os.path.join(out, "test", "predictions.csv"))  # valid UTF-8
    assert [r["patient_id"] for r in preds if r["index"] == "3"] == ["P\\udcff7"]


def test_split_whose_every_file_fails_says_so(evaluated_bad):
    datalist, _, bad, out, summary, _ = evaluated_bad
    report = _strict_load(os.path.join(out, BROKEN, "fairness_report.json"))
    assert report["n"] == 0 and report["n_skipped"] == len(datalist[BROKEN]) and "could be loaded" in report["error"]
    assert summary[BROKEN]["n"] == 0 and summary[BROKEN][f"{BROKEN}_n_skipped"] == len(datalist[BROKEN])
    with open(os.path.join(out, BROKEN, "skipped.csv"), newline="") as f:
        assert [r["file"] for r in csv.DictReader(f)] == [bad] * len(datalist[BROKEN])
    assert summary["test_ood"]["n"] == len(datalist["test_ood"])  # the split after it is still evaluated


def test_strict_json_and_clean_str():
    obj = {"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": np.float32(0.5), "d": np.array([np.nan, 2.0])}
    obj["e"] = BAD_PID
    got = strict_json(obj)
    assert got == {"a": None, "b": [1.0, None, None], "c": 0.5, "d": [None, 2.0], "e": "P\\udcff7"}
    json.dumps(got, allow_nan=False).encode("utf-8")
    assert clean_str("plain") == "plain" and clean_str(3) == 3
