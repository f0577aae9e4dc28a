"""bundle.metrics: group labels, thresholds, group metrics, fairness report (vs scikit-learn and fairlearn),
hit rate and mIoU on hand-made maps."""

import json
import math

import numpy as np
import pytest
from fairlearn.metrics import MetricFrame
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from bundle.demographics import age_years, sex_label
from bundle.metrics import (
    age_groups,
    fairness_report,
    flatten_for_mlflow,
    group_metrics,
    hit_rate,
    hit_rate_report,
    intersect_groups,
    iou,
    miou,
    miou_report,
    pair_metric_report,
    report_to_rows,
    select_threshold,
    sex_labels,
    upsample_bilinear,
)


def _data(n=600, c=2, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.35).astype(float)
    s = 1 / (1 + np.exp(-(rng.normal(-0.5, 1, (n, c)) + 1.2 * y)))
    if ties:
        s = np.round(s, 1)
    return y, s, rng


# ---------------------------------------------------------------- groups


def test_sex_labels():
    got = sex_labels(
        ["M", "Male", "male", 1, "1", "F", "Female", "female", 2, "f", "O", None, float("nan"), "", 0, 9, True]
    )
    assert got.tolist() == ["M"] * 5 + ["F"] * 5 + ["unknown"] * 7
    assert sex_labels(["man", " Woman ", np.int64(1)]).tolist() == ["M", "F", "M"]


@pytest.mark.parametrize(
    "raw,sex",
    [
        ("M", "M"),
        (" male ", "M"),
        ("Man", "M"),
        (1, "M"),
        (1.0, "M"),
        ("1", "M"),
        ("f", "F"),
        ("FEMALE", "F"),
        ("woman", "F"),
        (2, "F"),
        (np.int64(2), "F"),
        ("O", "unknown"),
        (0, "unknown"),
        (9, "unknown"),
        (1.5, "unknown"),
        (True, "unknown"),
        (None, "unknown"),
        (float("nan"), "unknown"),
        ("", "unknown"),
        ([1], "unknown"),
    ],
)
def test_sex_label(raw, sex):
    assert sex_label(raw) == sex


@pytest.mark.parametrize(
    "raw,years",
    [
        (57, 57.0),
        (57.5, 57.5),
        (np.float32(3.5), 3.5),
        ("57", 57.0),
        (" 045Y ", 45.0),
        ("045y", 45.0),
        ("006M", 0.5),
        ("010W", 70 / 365.25),
        ("003D", 3 / 365.25),
        (0, 0.0),
        (110, 110.0),
    ],
)
def test_age_years(raw, years):
    assert age_years(raw) == pytest.approx(years)


@pytest.mark.parametrize(
    "raw", [None, True, "", "abc", "Y", "-5Y", "45X", -1, 110.5, "111Y", float("nan"), float("inf"), [45]]
)
def test_age_years_missing_or_impossible_is_none(raw):
    assert age_years(raw) is None


def test_age_schemes():
    ages = [0, 19.9, 20, 39, 40, 59.5, 60, 79, 80, 110, 110.5, -1, None, "abc", "45", float("nan")]
    assert age_groups(ages).tolist() == [
        "[0,20)",
        "[0,20)",
        "[20,40)",
        "[20,40)",
        "[40,60)",
        "[40,60)",
        "[60,80)",
        "[60,80)",
        "[80,inf)",
        "[80,inf)",
        "unknown",
        "unknown",
        "unknown",
        "unknown",
        "[40,60)",
        "unknown",
    ]
    # DICOM AS strings and numeric arrays (vectorised path) read like age_years
    assert age_groups(["045Y", "006M", "130Y"]).tolist() == ["[40,60)", "[0,20)", "unknown"]
    assert age_groups(np.array([5.0, np.nan, np.inf, 111, 65])).tolist() == [
        "[0,20)",
        "unknown",
        "unknown",
        "unknown",
        "[60,80)",
    ]
    assert age_groups([0, 17.9, 18, 40, 80], "yang2024").tolist() == [
        "[0,18)",
        "[0,18)",
        "[18,40)",
        "[40,60)",
        "[80,inf)",
    ]
    assert age_groups([30, 60, 60.1, 90, -5], "binary60").tolist() == ["<=60", "<=60", ">60", ">60", "unknown"]
    assert age_groups([3, 5, 50, 65], [5, 50]).tolist() == ["unknown", "[5,50)", "[50,inf)", "[50,inf)"]
    with pytest.raises(ValueError, match="strictly increasing"):
        age_groups([1], [10, 5])
    with pytest.raises(ValueError, match="unknown scheme"):
        age_groups([1], "decades")


def test_intersections():
    got = intersect_groups(["M", "F", "unknown", "F"], ["[0,20)", "unknown", "[20,40)", "[80,inf)"])
    assert got.tolist() == ["M & [0,20)", "unknown", "unknown", "F & [80,inf)"]


# ---------------------------------------------------------------- group metrics and thresholds


@pytest.mark.parametrize("ties", [False, True])
def test_group_metrics_match_sklearn(ties):
    y, s, _ = _data(ties=ties)
    y, s = y[:, 0], s[:, 0]
    t = 0.45
    m = group_metrics(y, s, t)
    yhat = (s >= t).astype(int)
    assert m["n"] == y.size and m["n_pos"] == int(y.sum()) and m["n_neg"] == int((1 - y).sum())
    assert m["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, yhat), abs=1e-12)
    assert m["sensitivity"] == pytest.approx(recall_score(y, yhat), abs=1e-12)
    assert m["specificity"] == pytest.approx(recall_score(y, yhat, pos_label=0), abs=1e-12)
    assert m["fpr"] == pytest.approx(1 - recall_score(y, yhat, pos_label=0), abs=1e-12)
    assert m["precision"] == pytest.approx(precision_score(y, yhat), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(y, yhat), abs=1e-12)
    assert m["bce"] == pytest.approx(log_loss(y, s), abs=1e-12)
    # ECE: 10 equal-width bins on [0, 1], weighted |mean(y) - mean(s)|
    b = np.minimum((s * 10).astype(int), 9)
    ece = sum((b == k).mean() * abs(y[b == k].mean() - s[b == k].mean()) for k in range(10) if (b == k).any())
    assert m["ece"] == pytest.approx(ece, abs=1e-12)


def test_group_metrics_undefined_and_unknown_labels():
    m = group_metrics([1, 1, 1, -1, np.nan], [0.2, 0.7, 0.9, 0.1, 0.5], 0.5)
    assert m["n"] == 3 and m["n_neg"] == 0
    assert math.isnan(m["auc"]) and math.isnan(m["specificity"]) and math.isnan(m["fpr"])
    assert m["sensitivity"] == pytest.approx(2 / 3)
    m = group_metrics([0, 1, 0], [0.1, 0.2, 0.3], 0.9)  # nothing predicted positive
    assert math.isnan(m["precision"]) and m["f1"] == 0.0
    with pytest.raises(ValueError, match="probabilities"):
        group_metrics([0, 1], [-0.5, 2.0], 0.5)
    with pytest.raises(ValueError, match="labels must be"):
        group_metrics([0, 2], [0.1, 0.2], 0.5)


def test_select_threshold_methods():
    y, s, _ = _data(ties=True)
    y, s = y[:, 0], s[:, 0]
    t = select_threshold(y, s, "val_f1")
    grid = np.unique(s)
    f1s = [f1_score(y, s >= g) for g in grid]
    assert f1_score(y, s >= t) == pytest.approx(max(f1s))
    fpr, tpr, thr = roc_curve(y, s)
    best = thr[1:][np.argmax((tpr - fpr)[1:])]
    assert select_threshold(y, s, "val_youden") == pytest.approx(best)
    assert select_threshold(y, s, "fixed") == 0.5
    assert select_threshold(y, s, "test_f1") == t
    both = select_threshold(np.stack([y, y], 1), np.stack([s, s], 1), "val_f1")
    assert both.shape == (2,) and both[0] == t


def test_threshold_uses_validation_only():
    y, s, rng = _data(n=400, seed=1)
    yv, sv, _ = _data(n=300, seed=2)
    r1 = fairness_report(y, s, threshold="val_f1", val=(yv, sv), n_boot=0)
    y2 = 1 - y  # entirely different test labels
    r2 = fairness_report(y2, s, threshold="val_f1", val=(yv, sv), n_boot=0)
    for c in ("class_0", "class_1"):
        assert r1["thresholds"][c]["value"] == r2["thresholds"][c]["value"]
        assert r1["thresholds"][c]["source"] == "validation" and not r1["thresholds"][c]["optimistic"]
    assert r1["thresholds"]["class_0"]["value"] == select_threshold(yv[:, 0], sv[:, 0], "val_f1")
    # test_f1 does depend on the evaluated labels, and is labelled optimistic
    r3 = fairness_report(y, s, threshold="test_f1", n_boot=0)
    assert r3["thresholds"]["class_0"]["optimistic"] and "optimistic" in r3["thresholds"]["class_0"]["source"]
    assert r3["thresholds"]["class_0"]["value"] == select_threshold(y[:, 0], s[:, 0], "val_f1")
    with pytest.raises(ValueError, match="val="):
        fairness_report(y, s, threshold="val_f1", n_boot=0)


# ---------------------------------------------------------------- the report vs fairlearn


def _groups(n, rng):
    sex = sex_labels(rng.choice(["Male", "Female"], n, p=[0.59, 0.41]))
    age = age_groups(rng.gamma(9, 7, n).clip(21, 99))  # no [0,20) group: 4 age groups
    return {"sex": sex, "age": age}


def test_gaps_equal_fairlearn_metricframe():
    y, s, rng = _data(n=3000, c=2, seed=3, ties=True)
    groups = _groups(y.shape[0], rng)
    rep = fairness_report(y, s, groups, classes=["a", "b"], threshold=0.4, n_boot=0, min_count=1)
    for i, c in enumerate(["a", "b"]):
        for attr, lab in groups.items():
            entry = rep["classes"][c][attr]
            assert all(g["in_gap"] for g in entry["groups"].values())
            mf = MetricFrame(metrics={"auc": roc_auc_score}, y_true=y[:, i], y_pred=s[:, i], sensitive_features=lab)
            assert entry["gaps"]["auc"]["gap"] == pytest.approx(
                mf.difference(method="between_groups")["auc"], abs=1e-12
            )
            yhat = (s[:, i] >= 0.4).astype(int)
            mf2 = MetricFrame(
                metrics={
                    "accuracy": accuracy_score,
                    "sensitivity": recall_score,
                    "f1": f1_score,
                    "precision": precision_score,
                },
                y_true=y[:, i],
                y_pred=yhat,
                sensitive_features=lab,
            )
            diff = mf2.difference(method="between_groups")
            for m in ("accuracy", "sensitivity", "f1", "precision"):
                assert entry["gaps"][m]["gap"] == pytest.approx(diff[m], abs=1e-12)
            # per-group values, worst group and ratio
            bg = mf.by_group["auc"]
            for g, v in bg.items():
                assert entry["groups"][g]["auc"] == pytest.approx(v, abs=1e-12)
            assert entry["gaps"]["auc"]["worst_group"] == bg.idxmin()
            assert entry["gaps"]["auc"]["worst"] == pytest.approx(bg.min())
            assert entry["gaps"]["auc"]["ratio"] == pytest.approx(mf.ratio(method="between_groups")["auc"])
            # equalized-odds summary from the per-group TPR / TNR
            tpr = [entry["groups"][g]["sensitivity"] for g in entry["equalized_odds"]["groups"]]
            tnr = [entry["groups"][g]["specificity"] for g in entry["equalized_odds"]["groups"]]
            assert entry["equalized_odds"]["value"] == pytest.approx(
                1 - ((max(tpr) - min(tpr)) + (max(tnr) - min(tnr))) / 2
            )
        assert rep["overall"][c]["auc"] == pytest.approx(roc_auc_score(y[:, i], s[:, i]))
    # macro = mean over classes
    assert rep["macro"]["overall"]["auc"]["value"] == pytest.approx(
        np.mean([roc_auc_score(y[:, i], s[:, i]) for i in range(2)])
    )
    assert rep["macro"]["gaps"]["sex"]["auc"]["value"] == pytest.approx(
        np.mean([rep["classes"][c]["sex"]["gaps"]["auc"]["gap"] for c in ("a", "b")])
    )
    # fpr / ece / bce: lower is better -> the worst group is the maximum
    g = rep["classes"]["a"]["age"]
    vals = {k: v["fpr"] for k, v in g["groups"].items()}
    assert g["gaps"]["fpr"]["worst_group"] == max(vals, key=vals.get)


def test_one_class_group_reported_and_excluded_with_reason():
    y, s, rng = _data(n=900, c=1, seed=4)
    sex = np.where(rng.random(900) < 0.5, "M", "F").astype(object)
    site = np.where(np.arange(900) < 850, "A", "B").astype(object)
    y[850:, 0] = 0  # site B: negatives only
    rep = fairness_report(y, s, {"site": site, "sex": sex}, threshold="fixed", n_boot=0, min_count=0)
    e = rep["classes"]["class_0"]["site"]
    assert e["groups"]["B"]["auc"] is None  # NaN, reported as null
    assert e["groups"]["B"]["n"] == 50 and e["groups"]["B"]["n_pos"] == 0
    assert e["groups"]["B"]["accuracy"] is not None  # threshold metrics are still defined
    assert "one class" in e["gaps"]["auc"]["excluded"]["B"]
    assert e["gaps"]["auc"]["gap"] is None and "fewer than 2" in e["gaps"]["auc"]["note"]
    # fairlearn silently skips the NaN group and reports 0: we do not
    mf = MetricFrame(
        metrics={"auc": lambda a, b: roc_auc_score(a, b) if len(set(a)) > 1 else np.nan},
        y_true=y[:, 0],
        y_pred=s[:, 0],
        sensitive_features=site,
    )
    assert mf.difference(method="between_groups")["auc"] == 0.0
    json.dumps(rep, allow_nan=False)  # strict JSON


def test_min_count_and_unknown_exclusion():
    y, s, rng = _data(n=1000, c=1, seed=5)
    age = np.full(1000, "[60,80)", dtype=object)
    age[:500] = "[40,60)"
    age[500:510] = "[0,20)"
    age[510:520] = "unknown"
    y[500:510, 0] = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]  # 3 positives < 5
    rep = fairness_report(y, s, {"age": age}, threshold="fixed", n_boot=0, min_count=5)
    e = rep["classes"]["class_0"]["age"]
    assert set(e["groups"]) == {"[0,20)", "[40,60)", "[60,80)", "unknown"}
    assert not e["groups"]["[0,20)"]["in_gap"]
    assert e["groups"]["[0,20)"]["excluded_reason"] == "3 positives < min_count=5"
    assert e["groups"]["unknown"]["excluded_reason"] == "unknown attribute value"
    assert e["gaps"]["auc"]["groups"] == ["[40,60)", "[60,80)"]
    a, b = e["groups"]["[40,60)"]["auc"], e["groups"]["[60,80)"]["auc"]
    assert e["gaps"]["auc"]["gap"] == pytest.approx(abs(a - b))
    assert set(e["gaps"]["auc"]["excluded"]) == {"[0,20)", "unknown"}
    assert list(rep["meta"]["groups"]["age"]) == ["[0,20)", "[40,60)", "[60,80)", "unknown"]


def test_unknown_labels_excluded_per_class():
    y, s, rng = _data(n=500, c=2, seed=6)
    y[:100, 0] = -1
    y[50:60, 1] = np.nan
    rep = fairness_report(y, s, threshold="fixed", n_boot=0)
    assert rep["overall"]["class_0"]["n"] == 400 and rep["overall"]["class_1"]["n"] == 490
    assert rep["overall"]["class_0"]["auc"] == pytest.approx(roc_auc_score(y[100:, 0], s[100:, 0]))


def test_intersection_attribute():
    y, s, rng = _data(n=2000, c=1, seed=7)
    g = _groups(2000, rng)
    rep = fairness_report(y, s, g, threshold="fixed", n_boot=0, intersections=[("sex", "age")])
    assert "sex x age" in rep["classes"]["class_0"]
    lab = intersect_groups(g["sex"], g["age"])
    for name, m in rep["classes"]["class_0"]["sex x age"]["groups"].items():
        sel = lab == name
        assert m["n"] == int(sel.sum())


def test_rows_and_mlflow_keys():
    y, s, rng = _data(n=800, c=2, seed=8)
    rep = fairness_report(
        y,
        s,
        _groups(800, rng),
        classes=["Pleural Effusion", "Edema"],
        threshold="fixed",
        n_boot=20,
        intersections=["sex x age"],
    )
    rows = report_to_rows(rep)
    assert {r["section"] for r in rows} >= {
        "threshold",
        "overall",
        "group",
        "gap",
        "worst",
        "ratio",
        "equalized_odds",
        "macro_overall",
        "macro_gap",
    }
    auc_row = next(
        r
        for r in rows
        if r["section"] == "gap" and r["class"] == "Edema" and r["attribute"] == "sex" and r["metric"] == "auc"
    )
    assert auc_row["value"] == rep["classes"]["Edema"]["sex"]["gaps"]["auc"]["gap"]
    assert auc_row["ci_low"] <= auc_row["ci_high"]
    flat = flatten_for_mlflow(rep, prefix="fairness/")
    import re

    assert all(re.fullmatch(r"[A-Za-z0-9_\-./ ]+", k) for k in flat)
    assert (
        flat["fairness/Pleural_Effusion/sex/gap_auc"] == rep["classes"]["Pleural Effusion"]["sex"]["gaps"]["auc"]["gap"]
    )
    assert "fairness/macro/sex_x_age/gap_f1" in flat and "fairness/macro/auc" in flat
    assert len(flat) == 2 * 3 * 5 + 3 * 5 + 2 + 1
    assert all(isinstance(v, float) for v in flat.values())


def test_bad_input_messages():
    y, s, _ = _data(n=50, c=2)
    with pytest.raises(ValueError, match=r"groups\['sex'\] has 3 values"):
        fairness_report(y, s, {"sex": ["M", "F", "M"]}, threshold="fixed", n_boot=0)
    with pytest.raises(ValueError, match="classes"):
        fairness_report(y, s, classes=["a"], threshold="fixed", n_boot=0)
    with pytest.raises(ValueError, match="shape"):
        fairness_report(y, s[:, :1], threshold="fixed", n_boot=0)
    with pytest.raises(ValueError, match="patient_id has 3 values"):
        fairness_report(y, s, patient_id=[1, 2, 3], threshold="fixed", n_boot=5)


# ---------------------------------------------------------------- hit rate and mIoU


def test_upsample_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    a = np.random.default_rng(0).random((3, 7, 5))
    for size in [(28, 20), (7, 5), (30, 11), (4, 3)]:
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(a)[None], size=size, mode="bilinear", align_corners=False
        )[0].numpy()
        np.testing.assert_allclose(upsample_bilinear(a, size), ref, atol=1e-12)


def test_hit_rate_hand_made():
    att = np.zeros((4, 4, 4))
    att[0, 1, 1] = 1.0  # peak at top-left quadrant
    att[1, 3, 3] = 1.0  # peak bottom-right
    att[2, 0, 3] = 1.0
    att[3, 2, 2] = 1.0
    masks = np.zeros((4, 8, 8), dtype=np.uint8)
    masks[0, :4, :4] = 1  # contains the upsampled peak of map 0 -> hit
    masks[1, :4, :4] = 1  # peak of map 1 lies bottom-right -> miss
    masks[2, :, :] = 0  # empty mask -> NaN
    masks[3, 4:6, 4:6] = 1  # map 3: cell (2,2) -> pixels ~ (4..5, 4..5) -> hit
    hits = hit_rate(att, masks)
    assert hits[0] == 1 and hits[1] == 0 and math.isnan(hits[2]) and hits[3] == 1
    assert np.nanmean(hits) == pytest.approx(2 / 3)
    # list input with different sizes per pair
    hits2 = hit_rate([att[0], att[1][:2, :2]], [masks[0], np.ones((3, 3))])
    assert hits2.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="not binary"):
        hit_rate(att[:1], masks[:1] * 3)


def test_argmax_pixel_after_upsampling():
    # 2x2 -> 6x6 with half-pixel centres: pixels 4..5 of each axis copy the last cell (0.9), so the maximum is a
    # 2x2 plateau and numpy's argmax (as in CheXlocalize) takes its first pixel in row-major order: (4, 4)
    att = np.array([[0.0, 0.2], [0.1, 0.9]])
    up = upsample_bilinear(att, (6, 6))
    assert np.unravel_index(np.argmax(up), up.shape) == (4, 4)
    m = np.zeros((6, 6))
    m[4, 4] = 1
    assert hit_rate(att[None], m[None])[0] == 1.0
    m2 = np.zeros((6, 6))
    m2[5, 5] = 1  # also on the plateau, but not the argmax pixel
    assert hit_rate(att[None], m2[None])[0] == 0.0


def test_iou_hand_made():
    att = np.zeros((8, 8))
    att[2:6, 2:6] = 1.0  # a bright square
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 2:8] = True  # 24 pixels, square is 16 of them
    assert iou(att[None], mask[None])[0] == pytest.approx(16 / 24)
    assert iou(att[None], mask[None], threshold=0.5)[0] == pytest.approx(16 / 24)
    assert math.isnan(iou(att[None], np.zeros((1, 8, 8)))[0])
    flat = np.ones((8, 8))
    assert iou(flat[None], mask[None])[0] == 0.0  # a flat map segments nothing
    # Otsu on a two-level map separates the levels
    two = np.where(np.arange(64).reshape(8, 8) < 16, 0.9, 0.1)
    m2 = np.zeros((8, 8))
    m2[:2] = 1
    assert iou(two[None], m2[None])[0] == 1.0
    assert miou([att, two], [mask, m2]) == pytest.approx((16 / 24 + 1) / 2)


def test_hit_rate_report_per_class_and_group():
    rng = np.random.default_rng(0)
    n, c = 40, 2
    att = rng.random((n, c, 4, 4))
    masks = np.zeros((n, c, 8, 8), dtype=np.uint8)
    masks[:, :, :4, :] = 1  # top half annotated
    labels = np.ones((n, c))
    labels[:5, 1] = 0  # negatives do not count
    sex = np.where(np.arange(n) % 2 == 0, "M", "F").astype(object)
    rep = hit_rate_report(
        att, masks, labels, classes=["x", "y"], groups={"sex": sex}, patient_id=np.arange(n) // 2, n_boot=200
    )
    hits = hit_rate(att.reshape(-1, 4, 4), masks.reshape(-1, 8, 8)).reshape(n, c)
    assert rep["per_class"]["x"]["value"] == pytest.approx(hits[:, 0].mean())
    assert rep["per_class"]["y"]["value"] == pytest.approx(hits[5:, 1].mean())
    assert rep["per_class"]["y"]["n_pairs"] == 35
    assert rep["all_classes"]["n_pairs"] == 75
    m = rep["groups"]["sex"]["groups"]["M"]["per_class"]["x"]
    assert m["value"] == pytest.approx(hits[sex == "M", 0].mean())
    lo, hi = rep["per_class"]["x"]["ci"]
    assert lo <= rep["per_class"]["x"]["value"] <= hi
    gap = rep["groups"]["sex"]["gaps"]["all_classes"]
    pooled = {g: rep["groups"]["sex"]["groups"][g]["all_classes"]["value"] for g in ("M", "F")}
    assert gap["gap"] == pytest.approx(abs(pooled["M"] - pooled["F"]))
    mr = miou_report(att, masks, labels, classes=["x", "y"], n_boot=0)
    assert mr["per_class"]["x"]["value"] == pytest.approx(np.nanmean(iou(att[:, 0], masks[:, 0])))
    json.dumps(rep, allow_nan=False)


def test_pair_metric_report_excludes_nan_and_small_groups():
    vals = np.array([[1.0], [0.0], [np.nan], [1.0], [1.0]])
    labels = np.ones((5, 1))
    grp = {"site": ["a", "a", "a", "b", "unknown"]}
    rep = pair_metric_report(vals, labels, groups=grp, n_boot=0, min_count=2)
    assert rep["per_class"]["class_0"]["value"] == pytest.approx(0.75) and rep["per_class"]["class_0"]["n_pairs"] == 4
    ex = rep["groups"]["site"]["gaps"]["class_0"]["excluded"]
    assert ex == {"b": "1 pairs < min_count=2", "unknown": "unknown attribute value"}
