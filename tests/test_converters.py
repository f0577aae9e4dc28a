"""Dataset converters on small replicas of the distributed files (tests/replicas.py), with their quirks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bundle.data import datalist as dl
from bundle.data.converters import CLASSES, ConversionError, prepare, summary_path
from bundle.data.converters.compose import compose
from scripts.prepare_data import main as cli
from tests import replicas


def _records(d):
    return [r for k, v in d.items() if isinstance(v, list) and k != "classes" for r in v]


def _total(summary, key):
    """Sum a per-split count over splits: key = ("classes", c, "positive") or ("sex",) etc.; groups without
    images are left out (the summary lists every sex and age group, also empty ones)."""
    out = {}
    for s in summary["splits"].values():
        node = s
        for k in key:
            node = node[k]
        if isinstance(node, dict):
            for k, v in node.items():
                out[k] = out.get(k, 0) + v
        else:
            out = (out or 0) + node
    return {k: v for k, v in out.items() if v} if isinstance(out, dict) else out


def _pos(summary):
    return {c: _total(summary, ("classes", c, "positive")) for c in summary["classes"]}


def _shapes(summary):
    return {c: _total(summary, ("classes", c, "attention_shapes")) for c in summary["classes"]}


def _no_patient_in_two_splits(d):
    where = {}
    for split, recs in d.items():
        if isinstance(recs, list) and split != "classes":
            for r in recs:
                assert where.setdefault(r["patient_id"], split) == split, r["patient_id"]


# ------------------------------------------------------------------------------------------------------ NIH
@pytest.mark.parametrize("sex_column,version", [("Patient Gender", "2017"), ("Patient Sex", "v2020")])
def test_nih_counts_boxes_and_official_split(tmp_path, sex_column, version):
    exp = replicas.write_nih(tmp_path / "nih", sex_column=sex_column, version=version)
    d, s = prepare("nih", tmp_path / "nih", tmp_path / "out" / "nih.json", verbose=False)
    assert s["total_images"] == exp["images"]
    assert _pos(s) == exp["positives"]
    assert _total(s, ("sex",)) == exp["sex"]
    assert _total(s, ("age_groups",)) == exp["age_group"]
    assert _shapes(s) == exp["boxes"]
    assert {c: _total(s, ("classes", c, "positive_with_attention")) for c in CLASSES} == exp["positives_with_attention"]
    # the official test list is the test split; patients never cross splits
    assert sorted(Path(r["image"]).name for r in d["test"]) == sorted(replicas.NIH_TEST)
    _no_patient_in_two_splits(d)
    # a box exactly as in the file, in the 1024 frame; labels; relative path resolves to the PNG
    rec = {Path(r["image"]).name: r for r in _records(d)}
    img, coords = exp["box"]
    mass = [a for a in rec[img]["attention"] if a["coords"] == coords]
    assert mass and mass[0]["type"] == "bbox_xywh" and mass[0]["frame"] == [1024, 1024]
    assert rec["00000005_000.png"]["label"] == [1, 1, 1] and rec["00000002_000.png"]["label"] == [0, 0, 0]
    assert (tmp_path / "out" / rec[img]["image"]).resolve() == (tmp_path / "nih/images_001/images" / img).resolve()
    assert rec["00000001_000.png"]["patient_id"] == "1" and rec["00000003_000.png"]["view"] == "AP"
    # bad rows are counted with their line numbers, the run does not stop
    issues = s["report"]["issues"]
    for kind, n in exp["bad"].items():
        assert issues[kind]["count"] == n, kind
    assert issues["unparsable box"]["examples"][0]["line"] == exp["bad_box_line"]
    assert issues["unparsable Patient Age"]["examples"][0] == {"line": exp["bad_age_line"], "value": "abc"}
    # the summary is also written beside the datalist
    assert json.loads(summary_path(tmp_path / "out" / "nih.json").read_text())["total_images"] == exp["images"]


def test_nih_check_images_leaves_out_missing(tmp_path):
    exp = replicas.write_nih(tmp_path / "nih")
    d, s = prepare("nih", tmp_path / "nih", tmp_path / "nih.json", check=True, verbose=False)
    assert s["total_images"] == exp["images"] - 1
    miss = s["report"]["issues"]["missing image files"]
    assert miss["count"] == 1 and miss["examples"][0]["image"].endswith(exp["missing_image"])


def test_missing_column_names_column_file_and_found(tmp_path):
    replicas.write_nih(tmp_path / "nih", drop_column="Patient Age")
    with pytest.raises(ConversionError) as e:
        prepare("nih", tmp_path / "nih", tmp_path / "o.json", verbose=False)
    msg = str(e.value)
    assert "'age'" in msg and "'Patient Age'" in msg and "Data_Entry_2017.csv" in msg and "Finding Labels" in msg


def test_wrong_root_names_expected_file_and_lists_contents(tmp_path, capsys):
    (tmp_path / "somewhere").mkdir()
    (tmp_path / "somewhere" / "readme.txt").write_text("x")
    with pytest.raises(ConversionError) as e:
        prepare("nih", tmp_path / "somewhere", tmp_path / "o.json", verbose=False)
    assert "Data_Entry_2017.csv" in str(e.value) and "readme.txt" in str(e.value)
    # the CLI turns it into exit code 2 with the message on stderr
    assert cli(["jsrt", "--root", str(tmp_path / "somewhere"), "--out", str(tmp_path / "o.json")]) == 2
    assert "CLNDAT_EN.txt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- VinDr
def test_vindr_physionet_readers_dicom_headers(tmp_path):
    exp = replicas.write_vindr(tmp_path / "v")
    d, s = prepare("vindr", tmp_path / "v", tmp_path / "v.json", verbose=False)
    e = exp["physionet_any"]
    assert s["total_images"] == e["images"] and _pos(s) == e["positives"] and _shapes(s) == e["boxes"]
    assert _total(s, ("sex",)) == e["sex"] and _total(s, ("age_groups",)) == e["age_group"]
    assert sorted(r["patient_id"] for r in d["test"]) == ["s1", "s2"]  # official test split
    t1 = next(r for r in _records(d) if r["patient_id"] == "t1")
    assert {a["type"] for a in t1["attention"]} == {"bbox_xyxy"} and t1["attention"][0]["frame"] == exp["frame_t1"]
    assert [10.0, 12.0, 20.0, 25.0] in [a["coords"] for a in t1["attention"]]
    assert t1["sex"] == "M" and t1["age"] == 45
    d2, s2 = prepare("vindr", tmp_path / "v", tmp_path / "v2.json", aggregate="majority", verbose=False)
    assert _pos(s2) == exp["physionet_majority"]["positives"] and _shapes(s2) == exp["physionet_majority"]["boxes"]


def test_vindr_kaggle_train_csv_and_missing_dicom(tmp_path):
    exp = replicas.write_vindr(tmp_path / "k", layout="kaggle", missing_dicom="t1")
    d, s = prepare("vindr", tmp_path / "k", tmp_path / "k.json", verbose=False)
    e = exp["kaggle_any"]
    assert s["total_images"] == e["images"] and _pos(s) == e["positives"]
    assert _total(s, ("classes", "edema", "unknown")) == e["unknown_edema"]
    # t1's DICOM is missing: labels kept, sex/age unknown, its boxes dropped and counted
    t1 = next(r for r in _records(d) if r["patient_id"] == "t1")
    assert t1["label"][:2] == [1, 1] and t1["sex"] == "unknown" and t1["age"] is None and t1["attention"] == []
    issues = s["report"]["issues"]
    assert issues["DICOM missing (sex/age unknown, boxes dropped)"]["count"] == 1
    assert (
        issues["box of an image whose DICOM header is unavailable (frame unknown)"]["count"]
        == e["boxes"]["nodule_mass"] + e["boxes"]["pleural_effusion"]
    )


# -------------------------------------------------------------------------------------------------- CheXpert
def test_chexpert_tristate_prefixes_and_valid_split(tmp_path):
    exp = replicas.write_chexpert(tmp_path / "cx")
    d, s = prepare("chexpert", tmp_path / "cx", tmp_path / "cx.json", absolute_paths=True, verbose=False)
    assert s["total_images"] == exp["images"] and len(d["validation"]) == exp["validation"]
    by_tail = {"/".join(Path(r["image"]).parts[-4:]): r for r in _records(d)}
    for tail, lab in exp["labels"].items():
        assert by_tail[tail]["label"] == lab, tail
    # both path prefixes resolve inside the folder that holds train.csv
    assert by_tail["train/patient00002/study1/view1_frontal.jpg"]["image"] == str(
        (tmp_path / "cx/CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg").resolve()
    )
    assert by_tail["train/patient00002/study1/view1_frontal.jpg"]["age"] is None  # Age 0 = unknown
    assert by_tail["train/patient00001/study1/view2_lateral.jpg"]["view"] == "LATERAL"
    assert _total(s, ("sex",)) == exp["sex"]
    issues = s["report"]["issues"]
    assert issues["Age 0 (placeholder)"]["examples"][0]["line"] == exp["age_zero_line"]
    assert issues["unparsable label 'Pleural Effusion'"]["examples"][0] == {
        "line": exp["bad_label_line"],
        "value": "maybe",
    }


def test_chexlocalize_polygons_and_rle(tmp_path):
    from pycocotools import mask as mask_utils

    exp = replicas.write_chexlocalize(tmp_path / "cl")
    d, s = prepare("chexlocalize", tmp_path / "cl", tmp_path / "cl.json", verbose=False)
    assert s["total_images"] == exp["images"] and len(d["validation"]) == exp["validation"]
    assert len(d["test"]) == exp["test"] and _pos(s) == exp["positives"] and _shapes(s) == exp["shapes_auto"]
    atts = [a for r in _records(d) for a in r["attention"]]
    types = {t: sum(a["type"] == t for a in atts) for t in ("polygon", "rle")}
    assert types == exp["types_auto"] and all(a["frame"] == exp["frame"] for a in atts)
    rle = next(a for a in atts if a["type"] == "rle" and a["class"] == "pleural_effusion")
    m = mask_utils.decode({"size": rle["coords"]["size"], "counts": rle["coords"]["counts"].encode()})
    assert m.shape == (exp["frame"][1], exp["frame"][0]) and m[20:38, 3:25].all() and m.sum() == 18 * 22
    _, s2 = prepare("chexlocalize", tmp_path / "cl", tmp_path / "cl2.json", attention="rle", verbose=False)
    assert _shapes(s2) == exp["shapes_rle"]


# ----------------------------------------------------------------------------------------------------- MIMIC
def test_mimic_labels_demographics_split_and_attention(tmp_path):
    exp = replicas.write_mimic(tmp_path / "m")
    d, s = prepare("mimic", tmp_path / "m", tmp_path / "m.json", verbose=False)
    assert s["total_images"] == exp["images"] and _pos(s) == exp["positives"]
    assert {c: _total(s, ("classes", c, "unknown")) for c in CLASSES} == exp["unknown"]
    assert _total(s, ("sex",)) == exp["sex"] and _shapes(s) == exp["shapes"]
    assert {k: len(v) for k, v in d.items() if isinstance(v, list) and k != "classes"} == exp["splits"]
    rec = {Path(r["image"]).stem: r for r in _records(d)}
    assert {k: rec[k]["age"] for k in exp["ages"]} == exp["ages"]
    assert (tmp_path / rec["d1"]["image"]).resolve() == (tmp_path / "m" / exp["image_d1"]).resolve()
    ell = [a for a in rec["d3"]["attention"] if a["type"] == "ellipse_bbox"]
    assert ell and ell[0]["frame"] == [2544, 3056] and ell[0]["coords"] == [50.0, 1500.0, 900.0, 2800.0]
    assert s["report"]["issues"]["REFLACX ellipse with certainty < 3"]["count"] == 1


# -------------------------------------------------------------------------------------------------- PadChest
def test_padchest_label_lists_case_insensitive_columns_and_gr_boxes(tmp_path):
    exp = replicas.write_padchest(tmp_path / "p")
    d, s = prepare("padchest", tmp_path / "p", tmp_path / "p.json", verbose=False)
    assert s["total_images"] == exp["images"] and _pos(s) == exp["positives"]
    assert _total(s, ("sex",)) == exp["sex"] and _total(s, ("age_groups",)) == exp["age_group"]
    assert _shapes(s) == exp["shapes"]
    atts = [a for r in _records(d) for a in r["attention"]]
    assert sum(bool(a.get("normalized")) for a in atts) == exp["normalized_boxes"]
    assert sum(not a.get("normalized") for a in atts) == exp["pixel_boxes"]
    for kind, line in exp["bad_lines"].items():
        assert s["report"]["issues"][kind]["examples"][0]["line"] == line
    rec = {Path(r["image"]).name: r for r in _records(d)}
    assert rec["img1.png"]["split_source"] == "test" and rec["img4.png"]["label"] == [0, 0, 0]
    assert rec["img2.png"] in d["test"]  # same patient as the official GR test image
    assert (tmp_path / rec["img1.png"]["image"]).resolve() == (tmp_path / "p/0/img1.png").resolve()


# ------------------------------------------------------------------------------------------------------ JSRT
def test_jsrt_lists_point_radius_and_check_images(tmp_path):
    exp = replicas.write_jsrt(tmp_path / "j")
    d, s = prepare("jsrt", tmp_path / "j", tmp_path / "j.json", verbose=False)
    assert s["total_images"] == exp["images"]
    assert _total(s, ("classes", "nodule_mass", "positive")) == exp["positives"]
    assert _total(s, ("classes", "nodule_mass", "negative")) == exp["negatives"]
    assert _total(s, ("sex",)) == exp["sex"] and _total(s, ("age_groups",)) == exp["age_group"]
    assert _shapes(s)["nodule_mass"] == exp["shapes"]
    rec = {r["patient_id"]: r for r in _records(d)}
    a = rec["JPCLN001"]["attention"][0]
    assert a["type"] == "point_radius" and a["frame"] == [2048, 2048]
    assert a["coords"] == exp["centre_001"] + [exp["radius_001"]]
    assert rec["JPCLN003"]["label"] == [1, -1, -1] and rec["JPCLN003"]["attention"] == []
    _, s2 = prepare("jsrt", tmp_path / "j", tmp_path / "j2.json", check=True, verbose=False)
    bad = s2["report"]["issues"]["unreadable image files"]
    assert s2["total_images"] == exp["images"] - 1 and bad["examples"][0]["image"].endswith(exp["truncated"])


# --------------------------------------------------------------------------------------------- composition
def test_compose_edema_keeps_dataset_prefixes_patients_and_ood(tmp_path):
    replicas.write_nih(tmp_path / "raw/nih")
    replicas.write_vindr(tmp_path / "raw/vindr")
    replicas.write_mimic(tmp_path / "raw/mimic")
    replicas.write_chexlocalize(tmp_path / "raw/cl")
    for name, root in (("nih", "nih"), ("vindr", "vindr"), ("mimic", "mimic"), ("chexlocalize", "cl")):
        out = tmp_path / f"data/{name}/datalist.json"
        assert cli([name, "--root", str(tmp_path / "raw" / root), "--out", str(out)]) == 0
    cfg = Path("configs/datasets/edema.yaml")
    d, s = compose(cfg, tmp_path / "edema.json", data_root=tmp_path, verbose=False)
    assert d["classes"] == ["edema"]
    _no_patient_in_two_splits(d)
    recs = _records(d)
    assert all(len(r["label"]) == 1 and r["patient_id"].split(":")[0] == r["dataset"] for r in recs)
    assert all(r["dataset"] == "chexpert" for r in d["test_ood"]) and len(d["test_ood"]) == 5
    train_sets = {r["dataset"] for k in ("training", "validation", "test") for r in d.get(k, [])}
    assert train_sets == {"nih", "vindr", "mimic"}
    # the summary (bundle.data.datalist.summarize) counts images per source dataset and is written beside it
    assert s["splits"]["test_ood"]["datasets"] == {"chexpert": 5}
    assert set(_total(s, ("datasets",))) == {"nih", "vindr", "mimic", "chexpert"}
    assert json.loads(summary_path(tmp_path / "edema.json").read_text()) == s
    # MIMIC's lateral image is left out by the config's views; all-unknown edema records are left out
    assert all(r["view"] != "LATERAL" for r in recs) and all(r["label"] != [-1] for r in recs)
    assert all(a["class"] == "edema" for r in recs for a in r["attention"])
    loaded = dl.load(tmp_path / "edema.json")  # the shared validator accepts the composed file
    assert os.path.isabs(loaded["training"][0]["image"])


# ------------------------------------------------------------------------------------- end to end (validation)
@pytest.mark.parametrize(
    "name,writer",
    [
        ("nih", replicas.write_nih),
        ("vindr", replicas.write_vindr),
        ("chexpert", replicas.write_chexpert),
        ("chexlocalize", replicas.write_chexlocalize),
        ("mimic", replicas.write_mimic),
        ("padchest", replicas.write_padchest),
        ("jsrt", replicas.write_jsrt),
    ],
)
def test_replica_to_datalist_passes_shared_validation(tmp_path, name, writer):
    writer(tmp_path / "raw")
    out = tmp_path / "dl" / "datalist.json"
    assert cli([name, "--root", str(tmp_path / "raw"), "--out", str(out), "--seed", "3"]) == 0
    loaded = dl.load(out)  # raises DatalistError on any error (frames, coords inside frames, labels, leakage)
    problems = dl.validate(json.loads(out.read_text()), base_dir=str(out.parent))
    assert not [p for p in problems if p.severity == "error"]
    assert sum(len(v) for k, v in loaded.items() if isinstance(v, list) and k != "classes") > 0


def test_cli_classes_subset_and_seeded_split(tmp_path):
    replicas.write_nih(tmp_path / "nih")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for out in (a, b):
        assert (
            cli(
                [
                    "nih",
                    "--root",
                    str(tmp_path / "nih"),
                    "--out",
                    str(out),
                    "--classes",
                    "nodule_mass",
                    "--seed",
                    "7",
                    "--val-fraction",
                    "0.3",
                ]
            )
            == 0
        )
    da, db = json.loads(a.read_text()), json.loads(b.read_text())
    assert da == db and da["classes"] == ["nodule_mass"]
    assert all(len(r["label"]) == 1 for r in _records(da))
    assert all(a_["class"] == "nodule_mass" for r in _records(da) for a_ in r["attention"])
    assert np.sum([r["label"][0] == 1 for r in _records(da)]) == 3
