"""The vectorised patient-clustered, stratified bootstrap: kernel == scikit-learn on resampled data, clustering,
stratification, CIs, invariance to chunking/threads, permutation test."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bundle.metrics import fairness_report, group_metrics
from bundle.metrics.bootstrap import (
    ClassPlan,
    GroupedBootstrap,
    patient_index,
    patient_strata,
    patient_weights,
    percentile_ci,
)

METRICS = ("auc", "accuracy", "sensitivity", "specificity", "fpr", "precision", "f1", "ece", "bce")


def _cohort(n=2500, n_pat=900, c=2, seed=0, decimals=2):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.3).astype(float)
    y[rng.random((n, c)) < 0.05] = -1
    s = np.round(np.clip(rng.normal(0.35 + 0.25 * (y == 1), 0.2), 0, 1), decimals)  # many ties
    pid = rng.integers(0, n_pat, n)
    g = rng.integers(0, 3, n)
    return y, s, pid, g, rng


@pytest.mark.parametrize("kind", ["bootstrap", "arbitrary"])
def test_kernel_equals_sklearn_on_resampled_data(kind):
    y, s, pid, g, rng = _cohort()
    n = y.shape[0]
    pidx, n_pat = patient_index(pid, n)
    thr = [0.5, 0.42]
    eng = GroupedBootstrap(y, s, y >= 0, g, 3, pidx, n_pat, thr)
    if kind == "bootstrap":
        weights = next(patient_weights(patient_strata(pidx, g, n_pat), 4, 0, 0, 4))
    else:  # zeros and counts > 255 (int32 path)
        weights = rng.integers(0, 4, (3, n_pat))
        weights[0, :5] = 300
    res = eng.metrics(weights)
    for b in range(weights.shape[0]):
        idx = np.repeat(np.arange(n), weights[b][pidx])  # the resampled data set
        for c in range(2):
            for k in range(3):
                sel = idx[g[idx] == k]
                ref = group_metrics(y[sel, c], s[sel, c], thr[c])  # sklearn roc_auc_score / log_loss inside
                known = sel[y[sel, c] >= 0]
                assert ref["auc"] == pytest.approx(roc_auc_score(y[known, c], s[known, c]), abs=1e-13)
                for m in METRICS:
                    assert res[m][c, k, b] == pytest.approx(ref[m], abs=1e-11), (m, b, c, k)


def test_auc_kernel_with_membership_weights():
    y, s, _, g, _ = _cohort(n=800, c=1, seed=3, decimals=1)
    keep = y[:, 0] >= 0
    yy, ss, gg = y[keep, 0], s[keep, 0], g[keep]
    plan = ClassPlan(yy, ss, np.zeros(yy.size, np.int64), 1, np.arange(yy.size))
    weights = np.stack([(gg == k).astype(np.int32) for k in range(3)])
    auc = plan.auc(weights)[0]
    for k in range(3):
        assert auc[k] == pytest.approx(roc_auc_score(yy[gg == k], ss[gg == k]), abs=1e-13)


def test_patient_clustering_all_images_move_together():
    # patient 0: 1 image, patient 1: 2 images, patient 2: 4 images; one stratum
    pid = np.array([0, 1, 1, 2, 2, 2, 2])
    pidx, n_pat = patient_index(pid, 7)
    weights = np.concatenate(list(patient_weights(np.zeros(n_pat, np.int64), 300, 0, 0, 64)))
    assert weights.shape == (300, 3) and np.all(weights.sum(axis=1) == 3)  # 3 patients drawn per replicate
    y = np.array([[1], [0], [1], [0], [1], [0], [0]], float)
    s = np.linspace(0.1, 0.9, 7)[:, None]
    eng = GroupedBootstrap(y, s, y >= 0, np.zeros(7, np.int64), 1, pidx, n_pat, [0.5])
    counts = eng.plans[0].counts(weights)
    n_img = counts["npos"][0] + counts["nneg"][0]
    # the resampled number of images is the sum of the drawn patients' image counts, never an image-level draw
    np.testing.assert_array_equal(n_img, weights @ np.array([1, 2, 4]))
    assert len(np.unique(n_img)) > 3  # it varies (an image-level bootstrap would always give 7)
    # positives of patient 2 (1 of 4 images) and patient 1 (1 of 2) move with their patients
    np.testing.assert_array_equal(counts["npos"][0], weights @ np.array([1, 1, 1]))


def test_clustered_ci_wider_than_image_level_when_images_repeat():
    rng = np.random.default_rng(1)
    n_pat, k = 150, 12
    y = np.repeat((rng.random(n_pat) < 0.4).astype(float), k)[:, None]
    s = np.repeat(np.clip(rng.normal(0.4 + 0.2 * (y[::k, 0]), 0.2), 0, 1), k)[:, None]
    pid = np.repeat(np.arange(n_pat), k)
    kw = dict(threshold="fixed", n_boot=300, seed=0)
    clustered = fairness_report(y, s, patient_id=pid, **kw)["overall"]["class_0"]["ci"]["auc"]
    naive = fairness_report(y, s, patient_id=None, **kw)["overall"]["class_0"]["ci"]["auc"]
    assert (clustered[1] - clustered[0]) > 2.0 * (naive[1] - naive[0])  # ~sqrt(12) in theory


def test_stratified_draws_keep_patient_counts_per_subgroup():
    strata = np.random.default_rng(2).integers(0, 4, 500)
    for weights in patient_weights(strata, 40, 7, 1, 16):
        for k in range(4):
            assert np.all(weights[:, strata == k].sum(axis=1) == (strata == k).sum())
    a = np.concatenate(list(patient_weights(strata, 40, 7, 1, 16)))
    b = np.concatenate(list(patient_weights(strata, 40, 7, 1, 5)))
    np.testing.assert_array_equal(a, b)  # chunk size does not change the draws
    c = np.concatenate(list(patient_weights(strata, 40, 8, 1, 16)))
    assert not np.array_equal(a, c)  # the seed does


def test_patient_stratum_is_first_image_group():
    pidx = np.array([0, 0, 1, 1, 2])
    codes = np.array([3, 4, 1, 0, 2])
    np.testing.assert_array_equal(patient_strata(pidx, codes, 3), [3, 1, 2])


def test_cis_contain_point_and_shrink_with_n():
    widths = {}
    for n in (600, 6000):
        rng = np.random.default_rng(4)
        y = (rng.random((n, 1)) < 0.3).astype(float)
        s = np.clip(rng.normal(0.35 + 0.25 * y, 0.2), 0, 1)
        sex = np.where(rng.random(n) < 0.55, "M", "F").astype(object)
        rep = fairness_report(y, s, {"sex": sex}, patient_id=np.arange(n) // 2, threshold="fixed", n_boot=300)
        for g, m in rep["classes"]["class_0"]["sex"]["groups"].items():
            for k in METRICS:
                lo, hi = m["ci"][k]
                assert lo <= m[k] <= hi, (n, g, k)
        o = rep["overall"]["class_0"]
        for k in METRICS:
            assert o["ci"][k][0] <= o[k] <= o["ci"][k][1]
        widths[n] = {k: np.diff(rep["classes"]["class_0"]["sex"]["groups"]["F"]["ci"][k])[0] for k in METRICS}
        gap = rep["classes"]["class_0"]["sex"]["gaps"]["auc"]
        assert gap["ci"][0] <= gap["ci"][1] and gap["ci"][0] >= 0
    for k in METRICS:
        assert widths[6000][k] < 0.6 * widths[600][k], k  # ~ 1/sqrt(10)


def test_report_identical_for_any_chunk_and_thread_count():
    y, s, pid, g, rng = _cohort(n=1200, n_pat=500)
    groups = {"site": np.array(["a", "b", "c"], dtype=object)[g]}
    kw = dict(groups=groups, patient_id=pid, threshold="fixed", n_boot=60, seed=3)
    r1 = fairness_report(y, s, chunk=7, n_jobs=1, **kw)
    r2 = fairness_report(y, s, chunk=32, n_jobs=2, **kw)
    assert r1 == r2
    r3 = fairness_report(y, s, chunk=7, n_jobs=1, **{**kw, "seed": 4})
    assert (
        r3["classes"]["class_0"]["site"]["gaps"]["auc"]["ci"] != r1["classes"]["class_0"]["site"]["gaps"]["auc"]["ci"]
    )


def test_every_group_metric_and_gap_has_a_ci():
    y, s, pid, g, rng = _cohort(n=1500, n_pat=700)
    sex = np.where(rng.random(1500) < 0.5, "M", "F").astype(object)
    rep = fairness_report(y, s, {"sex": sex}, patient_id=pid, threshold="fixed", n_boot=50)
    e = rep["classes"]["class_1"]["sex"]
    for m in e["groups"].values():
        assert set(m["ci"]) == set(METRICS)
    for k, gap in e["gaps"].items():
        assert gap["ci"] is not None and gap["ci"][0] <= gap["ci"][1], k
    assert e["equalized_odds"]["ci"][0] <= e["equalized_odds"]["ci"][1]
    assert rep["macro"]["gaps"]["sex"]["auc"]["ci"] is not None
    assert rep["macro"]["overall"]["auc"]["ci"][0] <= rep["macro"]["overall"]["auc"]["value"]


def test_permutation_p_value():
    rng = np.random.default_rng(5)
    n = 3000
    grp = np.where(rng.random(n) < 0.5, "A", "B").astype(object)
    y = (rng.random((n, 1)) < 0.3).astype(float)
    signal = np.where(grp == "A", 2.0, 0.3)[:, None]  # group B: much weaker signal
    s = 1 / (1 + np.exp(-(rng.normal(-1, 1, (n, 1)) + signal * y)))
    rep = fairness_report(y, s, {"grp": grp}, threshold="fixed", n_boot=0, permutation_test=99)
    p = rep["classes"]["class_0"]["grp"]["permutation"]
    assert p["auc_gap_p_value"] == pytest.approx(1 / 100)
    fair = np.where(rng.random(n) < 0.5, "A", "B").astype(object)  # unrelated to the scores
    rep2 = fairness_report(y, s, {"grp": fair}, threshold="fixed", n_boot=0, permutation_test=99)
    assert rep2["classes"]["class_0"]["grp"]["permutation"]["auc_gap_p_value"] > 0.05


def test_percentile_ci_ignores_nan_replicates():
    lo, hi = percentile_ci(np.array([np.nan, 1.0, 2.0, 3.0, np.nan]), 0.5)
    assert lo == pytest.approx(1.5) and hi == pytest.approx(2.5)
    lo, hi = percentile_ci(np.full(4, np.nan), 0.95)
    assert np.isnan(lo) and np.isnan(hi)


def test_patient_index_missing_ids_are_own_patients():
    codes, n = patient_index(["a", "b", "a", None, "", np.nan, "b"], 7)
    assert n == 5
    assert codes[0] == codes[2] and codes[1] == codes[6]
    assert len({codes[3], codes[4], codes[5]}) == 3
