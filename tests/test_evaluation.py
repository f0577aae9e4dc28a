"""bundle.evaluation.evaluate in process on the tiny synthetic benchmark with a tiny network: the report files, and
summary numbers that scikit-learn recomputes from the written predictions.csv."""

import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureTyped, SelectItemsd
from sklearn.metrics import roc_auc_score

from bundle.alignment import AlignFlagsd
from bundle.data.datalist import load
from bundle.evaluation import evaluate, load_checkpoint
from bundle.networks import AlignerVLM
from bundle.transforms import CXRIntensityd, Letterboxd, LoadCXRd, RasterizeAttentiond
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
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_files_written(evaluated):
    datalist, out, summary = evaluated
    assert sorted(summary) == sorted(SPLITS)
    assert json.loads(open(os.path.join(out, "summary.json")).read()) == json.loads(json.dumps(summary))
    selection = json.loads(open(os.path.join(out, "model_selection.json")).read())
    assert selection["split"] == "validation" and selection["n"] == len(datalist["validation"])
    for split in SPLITS:
        d = os.path.join(out, split)
        for name in ("fairness_report.json", "fairness_report.csv", "predictions.csv"):
            assert os.path.getsize(os.path.join(d, name)) > 0, name
        pngs = set(os.listdir(os.path.join(d, "plots")))
        assert {"auc_by_sex.png", "auc_by_age.png", "sensitivity_by_sex.png"} <= pngs
        assert summary[split]["report_dir"] == d and summary[split]["n"] == len(datalist[split])
        report = json.loads(open(os.path.join(d, "fairness_report.json")).read())
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
