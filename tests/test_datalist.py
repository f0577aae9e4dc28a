"""The datalist format: loading, normalisation, every validation error kind, summary, MONAI compatibility."""

import copy
import json
import os

import numpy as np
import pytest
from PIL import Image

from bundle.data import datalist as dl

CLASSES = ["nodule_mass", "pleural_effusion", "edema"]


def _record(**kw):
    rec = {
        "image": "images/a.png",
        "label": [1, 0, None],
        "attention": [{"class": "nodule_mass", "type": "bbox_xywh", "coords": [10, 20, 30, 40], "frame": [100, 80]}],
        "sex": "F",
        "age": 57,
        "patient_id": "p1",
        "dataset": "toy",
        "view": "PA",
    }
    rec.update(kw)
    return rec


def _datalist(**splits):
    d = {"name": "toy", "classes": list(CLASSES)}
    d.update(splits or {"training": [_record()]})
    return d


def _write(tmp_path, d, name="datalist.json"):
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return str(path)


def _errors(d, **kw):
    return [p for p in dl.validate(d, **kw) if p.severity == "error"]


def test_valid_datalist_loads_and_normalises(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((80, 100), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((80, 100), np.uint8)).save(tmp_path / "m.png")
    rec = _record(sex="female", age="045Y", extra_key={"kept": True})
    rec["attention"].append({"class": "nodule_mass", "type": "mask", "path": "m.png", "frame": [100, 80]})
    path = _write(tmp_path, _datalist(training=[rec]))
    d = dl.load(path, check_images=True)
    r = d["training"][0]
    assert r["image"] == str(tmp_path / "images" / "a.png")
    assert r["attention"][1]["path"] == str(tmp_path / "m.png")
    assert r["label"] == [1, 0, -1]
    assert r["sex"] == "F" and r["age"] == 45
    assert r["extra_key"] == {"kept": True}
    assert "_problems" not in d


@pytest.mark.parametrize(
    "mutate, split, index, key, words",
    [
        (
            lambda d: d["training"][0]["attention"][0].update({"class": "cardiomegaly"}),
            "training",
            0,
            "attention[0].class",
            "unknown class name 'cardiomegaly'",
        ),
        (lambda d: d["training"][0].update({"label": [1, 0]}), "training", 0, "label", "has 2 values but there are 3"),
        (lambda d: d["training"][0].update({"label": [1, 2, 0]}), "training", 0, "label[1]", "value 2 is not one of"),
        (lambda d: d["training"][0].update({"label": [1, "yes", 0]}), "training", 0, "label[1]", "is not one of"),
        (
            lambda d: d["training"][0]["attention"][0].update({"type": "circle"}),
            "training",
            0,
            "attention[0].type",
            "unknown attention type 'circle'",
        ),
        (
            lambda d: d["training"][0]["attention"][0].update({"coords": [1, 2, 3]}),
            "training",
            0,
            "attention[0].coords",
            "malformed coords",
        ),
        (
            lambda d: d["training"][0]["attention"][0].update({"coords": [90, 20, 30, 40]}),
            "training",
            0,
            "attention[0].coords",
            "outside the frame",
        ),
        (
            lambda d: d["training"][0]["attention"][0].update({"coords": [0.1, 0.2, 0.95, 0.3], "normalized": True}),
            "training",
            0,
            "attention[0].coords",
            "outside [0, 1]",
        ),
        (
            lambda d: d["training"][0]["attention"][0].pop("frame"),
            "training",
            0,
            "attention[0].frame",
            "missing for type",
        ),
        (
            lambda d: d["training"][0]["attention"][0].update({"type": "polygon", "coords": [[1, 2], [3, 4]]}),
            "training",
            0,
            "attention[0].coords",
            "at least 3",
        ),
        (
            lambda d: d["training"][0]["attention"][0].update({"type": "bbox_xyxy", "coords": [10, 10, 5, 20]}),
            "training",
            0,
            "attention[0].coords",
            "x2 > x1",
        ),
        (
            lambda d: d["training"][0]["attention"][0].update({"type": "point_radius", "coords": [150, 10, 5]}),
            "training",
            0,
            "attention[0].coords",
            "outside the frame",
        ),
        (
            lambda d: d["training"][0]["attention"][0].update({"type": "rle", "coords": {"size": [80], "counts": "x"}}),
            "training",
            0,
            "attention[0].coords.size",
            "[height, width]",
        ),
        (
            lambda d: d["training"][0]["attention"][0].update({"type": "mask", "coords": None}),
            "training",
            0,
            "attention[0].path",
            "missing mask file path",
        ),
        (lambda d: d["training"][0].pop("image"), "training", 0, "image", "missing"),
        (lambda d: d.update({"test": [_record(image="images/b.png")]}), "test", 0, "patient_id", "leakage"),
    ],
)
def test_each_error_kind_names_split_index_key(tmp_path, mutate, split, index, key, words):
    d = _datalist()
    mutate(d)
    path = _write(tmp_path, d)
    with pytest.raises(dl.DatalistError) as ei:
        dl.load(path)
    msg = str(ei.value)
    assert f"split {split!r}, index {index}, key {key!r}" in msg
    assert words in msg
    assert "-> fix:" in msg
    assert path in msg
    assert any(p.split == split and p.index == index and p.key == key for p in ei.value.problems)


def test_missing_image_only_when_checked(tmp_path):
    path = _write(tmp_path, _datalist())
    dl.load(path)  # not checked: fine
    with pytest.raises(dl.DatalistError, match=r"split 'training', index 0, key 'image': image file not found"):
        dl.load(path, check_images=True)


def test_every_problem_listed_at_once(tmp_path):
    d = _datalist(
        training=[_record(label=[1, 0]), _record(image="images/b.png", label=[1, 5, 0], patient_id="p2")],
        validation=[_record(image="images/c.png", patient_id="p3")],
    )
    d["validation"][0]["attention"][0]["class"] = "unknown_thing"
    with pytest.raises(dl.DatalistError) as ei:
        dl.load(_write(tmp_path, d))
    msg = str(ei.value)
    assert "3 error(s)" in msg
    assert "split 'training', index 0, key 'label'" in msg
    assert "split 'training', index 1, key 'label[1]'" in msg
    assert "split 'validation', index 0, key 'attention[0].class'" in msg


def test_classes_must_be_present_and_unique():
    d = _datalist()
    d["classes"] = ["a", "a", "b"]
    assert any(p.key == "classes" and "duplicated" in p.message for p in _errors(d))
    d.pop("classes")
    assert any(p.key == "classes" for p in _errors(d))


def test_duplicate_image_is_a_warning(tmp_path):
    d = _datalist(training=[_record(), _record()])
    problems = dl.validate(d, base_dir=str(tmp_path))
    dup = [p for p in problems if p.code == "duplicate_image"]
    assert len(dup) == 1 and dup[0].severity == "warning" and dup[0].index == 1
    dl.load(_write(tmp_path, d))  # warnings never raise


def test_strict_false_returns_problems(tmp_path):
    d = _datalist(training=[_record(label=[1, 0])])
    out = dl.load(_write(tmp_path, d), strict=False)
    assert [p.key for p in out["_problems"] if p.severity == "error"] == ["label"]
    assert out["training"][0]["label"] == [1, 0]  # invalid labels are left as they are


# the datalist reads sex and age exactly like the fairness metrics (bundle.demographics): one definition
@pytest.mark.parametrize(
    "raw, sex",
    [
        ("M", "M"),
        ("Male", "M"),
        ("m", "M"),
        ("man", "M"),
        (" female ", "F"),
        ("F", "F"),
        ("Woman", "F"),
        (1, "M"),
        ("2", "F"),
        ("O", "unknown"),
        ("", "unknown"),
        (None, "unknown"),
        (0, "unknown"),
        (True, "unknown"),
    ],
)
def test_sex_normalisation(raw, sex):
    from bundle.demographics import sex_label, sex_labels

    assert sex_label(raw) == sex == sex_labels([raw])[0]


@pytest.mark.parametrize(
    "raw, age",
    [
        (57, 57),
        (57.5, 57.5),
        ("57", 57),
        ("045Y", 45),
        ("006M", 0.5),
        ("010W", 0.19),
        (np.int64(57), 57),
        ("abc", None),
        (-3, None),
        (130, None),
        ("111Y", None),
        (None, None),
        (True, None),
        (float("nan"), None),
        ([45], None),
    ],
)
def test_age_normalisation(raw, age):
    assert dl.normalize_age(raw) == age
    assert type(dl.normalize_age(raw)) is type(age)  # whole years are stored as ints


def test_unknown_sex_and_age_are_counted_warnings_not_errors(tmp_path):
    d = _datalist(training=[_record(sex="X", age="old"), _record(image="images/b.png", sex=None, age=200)])
    out = dl.load(_write(tmp_path, d))
    assert [r["sex"] for r in out["training"]] == ["unknown", "unknown"]
    assert [r["age"] for r in out["training"]] == [None, None]
    warnings = [p for p in dl.validate(d) if p.severity == "warning"]
    assert {p.code for p in warnings} == {"sex_unknown", "age_unknown"}
    s = dl.summarize(out)["splits"]["training"]
    assert s["sex"]["unknown"] == 2 and s["age_groups"]["unknown"] == 2


def test_every_attention_type_accepts_a_valid_example():
    atts = [
        {"class": "edema", "type": "bbox_xywh", "coords": [1, 2, 30, 40], "frame": [100, 80]},
        {"class": "edema", "type": "bbox_xyxy", "coords": [1, 2, 30, 40], "frame": [100, 80]},
        {"class": "edema", "type": "ellipse_bbox", "coords": [1, 2, 30, 40], "frame": [100, 80]},
        {"class": "edema", "type": "polygon", "coords": [[1, 2], [30, 2], [15, 40]], "frame": [100, 80]},
        {"class": "edema", "type": "point_radius", "coords": [50, 40, 12], "frame": [100, 80]},
        {"class": "edema", "type": "point_radius", "coords": [0.5, 0.5, 0.1], "normalized": True},
        {"class": "edema", "type": "rle", "coords": {"size": [80, 100], "counts": "PPYo0"}},
        {"class": "edema", "type": "rle", "coords": {"size": [2, 2], "counts": [1, 2, 1]}, "frame": [2, 2]},
        {"class": "edema", "type": "mask", "path": "masks/x.png", "frame": [100, 80]},
        {"class": "edema", "type": "bbox_xywh", "coords": [-0.5, 0, 100.5, 80], "frame": [100, 80]},  # 1 px tolerance
    ]
    d = _datalist(training=[_record(label=[1, 0, 1], attention=atts)])
    assert _errors(d) == []


def test_rle_frame_must_match_size():
    att = {"class": "edema", "type": "rle", "coords": {"size": [80, 100], "counts": "abc"}, "frame": [80, 100]}
    errs = _errors(_datalist(training=[_record(label=[1, 0, 1], attention=[att])]))
    assert [p.key for p in errs] == ["attention[0].frame"]


def test_mask_file_checked_with_images(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((80, 100), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(tmp_path / "m.png")
    rec = _record(
        attention=[
            {"class": "nodule_mass", "type": "mask", "path": "m.png", "frame": [100, 80]},
            {"class": "nodule_mass", "type": "mask", "path": "nothere.png"},
        ]
    )
    errs = _errors(_datalist(training=[rec]), base_dir=str(tmp_path), check_images=True)
    assert {(p.key, p.code) for p in errs} == {
        ("attention[0].frame", "coords_outside"),
        ("attention[1].path", "missing_image"),
    }


def test_bad_json_and_missing_file(tmp_path):
    with pytest.raises(dl.DatalistError, match="not found"):
        dl.load(tmp_path / "nothere.json")
    p = tmp_path / "bad.json"
    p.write_text('{"classes": ["a"],}')
    with pytest.raises(dl.DatalistError, match="not valid JSON"):
        dl.load(p)


def test_summarize_counts():
    d = _datalist(
        training=[
            _record(),
            _record(image="images/b.png", label=[0, 1, 1], attention=[], sex="M", age=85, patient_id="p1"),
            _record(image="images/c.png", age=None, patient_id="p2"),
        ]
    )
    s = dl.summarize(d)["splits"]["training"]
    assert s["n_images"] == 3 and s["n_patients"] == 2
    assert s["classes"]["nodule_mass"] == {
        "positive": 2,
        "negative": 1,
        "unknown": 0,
        "positive_with_attention": 2,
        "attention_shapes": 2,
    }
    assert s["classes"]["edema"] == {
        "positive": 1,
        "negative": 0,
        "unknown": 2,
        "positive_with_attention": 0,
        "attention_shapes": 0,
    }
    assert s["sex"] == {"M": 1, "F": 2, "unknown": 0}
    assert s["age_groups"] == {"[0,20)": 0, "[20,40)": 0, "[40,60)": 1, "[60,80)": 0, "[80,inf)": 1, "unknown": 1}
    assert s["datasets"] == {"toy": 3}


def test_summarize_raw_values_ragged_labels_report_and_schemes():
    recs = [
        _record(
            sex="male",
            age="045Y",
            patient_id=None,
            attention=[
                _record()["attention"][0],
                {"class": "nodule_mass", "type": "point_radius", "coords": [1, 2, 3], "frame": [100, 80]},
                {"class": "cardiomegaly"},
                "junk",
            ],
        ),
        _record(image="b.png", label=[1, "x"], attention=[], sex=2, age=None, patient_id="", dataset=None),
        "not a record",
    ]
    d = _datalist(training=recs, _problems=[1, 2])
    s = dl.summarize(d, age_bins="binary60", report={"dataset": "toy", "issues": {}})
    assert list(s["splits"]) == ["training"] and s["total_images"] == 2 and s["report"]["dataset"] == "toy"
    t = s["splits"]["training"]
    assert t["n_patients"] == 2  # records without patient_id are distinct patients
    assert t["classes"]["nodule_mass"] == {
        "positive": 2,
        "negative": 0,
        "unknown": 0,
        "positive_with_attention": 1,
        "attention_shapes": 2,
    }
    assert t["classes"]["pleural_effusion"] == {
        "positive": 0,
        "negative": 1,
        "unknown": 1,
        "positive_with_attention": 0,
        "attention_shapes": 0,
    }
    assert t["classes"]["edema"]["unknown"] == 2  # a short label counts its missing values as unknown
    assert t["sex"] == {"M": 1, "F": 1, "unknown": 0} and t["datasets"] == {"toy": 1, "unknown": 1}
    assert t["age_groups"] == {"<=60": 1, ">60": 0, "unknown": 1}
    assert "2 images" in dl.format_summary(s) and "(2 shapes)" in dl.format_summary(s)


def test_age_group_bins():
    assert [dl.age_group(a) for a in (0, 19.9, 20, 59, 60, 80, 110, None, "045Y", 111, -1)] == [
        "[0,20)",
        "[0,20)",
        "[20,40)",
        "[40,60)",
        "[60,80)",
        "[80,inf)",
        "[80,inf)",
        "unknown",
        "[40,60)",
        "unknown",
        "unknown",
    ]
    assert dl.age_group(17, (0, 18, 65)) == "[0,18)" and dl.age_group(70, "binary60") == ">60"


def test_save_is_atomic_and_round_trips(tmp_path):
    d = _datalist()
    d["_problems"] = [dl.Problem("training", 0, "label", "m", "f")]
    path = dl.save(d, tmp_path / "sub" / "dl.json")
    assert json.load(open(path)) == {k: v for k, v in d.items() if k != "_problems"}
    assert os.listdir(tmp_path / "sub") == ["dl.json"]  # no temp file left behind
    before = open(path).read()

    class Boom:
        pass

    bad = copy.deepcopy(d)
    bad["training"][0]["x"] = Boom()
    with pytest.raises(TypeError):
        dl.save(bad, path)
    assert open(path).read() == before and os.listdir(tmp_path / "sub") == ["dl.json"]


def test_monai_load_decathlon_datalist_reads_it(tmp_path):
    from monai.data import load_decathlon_datalist

    d = _datalist(training=[_record(), _record(image="images/b.png", label=[0, 0, 0], attention=[])])
    path = _write(tmp_path, d)
    for is_seg in (False, True):
        items = load_decathlon_datalist(path, is_segmentation=is_seg, data_list_key="training")
        ours = dl.load(path)["training"]
        assert [i["image"] for i in items] == [r["image"] for r in ours]
        assert [i["label"] for i in items] == [[1, 0, None], [0, 0, 0]]
        assert items[0]["attention"] == d["training"][0]["attention"]
