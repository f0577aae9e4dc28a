"""The study report on crafted run folders with known answers: mean/sd over seeds, best p, the "X of Y" count,
Table 2's bold cells, the positive-control table, the figures, and MLflow being down."""

import csv
import json
import math
import os

import numpy as np
import pytest

from bundle.study import report as R

SPLITS = ("test", "test_ood")
CLASSES = ("a", "b")
ATTRS = ("sex", "age")
SEEDS = (0, 1, 2)
# setting id -> (p, random, data ratio)
SETTINGS = {
    "p0.00": (0.0, False, 1.0),
    "p0.50": (0.5, False, 1.0),
    "p1.00": (1.0, False, 1.0),
    "random_p1.00": (1.0, True, 1.0),
    "ratio0.50_p0.00": (0.0, False, 0.5),
    "ratio0.50_p1.00": (1.0, False, 0.5),
}
MEAN_AUC = {
    "p0.00": 0.70,
    "p0.50": 0.80,
    "p1.00": 0.75,
    "random_p1.00": 0.65,
    "ratio0.50_p0.00": 0.6,
    "ratio0.50_p1.00": 0.68,
}


# validation mean AUC (model_selection.json): picks p = 1, where the in-domain test AUC would pick p = 0.5
VAL_AUC = {
    "p0.00": 0.70,
    "p0.50": 0.72,
    "p1.00": 0.85,
    "random_p1.00": 0.6,
    "ratio0.50_p0.00": 0.6,
    "ratio0.50_p1.00": 0.65,
}


def p1_lowered(split, c, a, m) -> bool:
    """The cells where the p = 1 crafted gap is below the baseline's: 16 (AUC, F1) + 4 (finding a, sex, acc/sens)."""
    return m in ("auc", "f1") or (c == "a" and a == "sex")


TIE = ("test", "b", "age", "accuracy")  # p = 1 equals the baseline here: counted, not lowered
UNDEFINED = ("test_ood", "b", "age", "sensitivity")  # p = 0.5 gap undefined here: not counted


def gap(setting, split, c, a, m, seed):
    base = 0.20
    if setting in ("p0.00", "ratio0.50_p0.00"):
        g = base
    elif setting == "p0.50":
        if (split, c, a, m) == UNDEFINED:
            return None
        g = 0.15
    elif setting in ("p1.00", "ratio0.50_p1.00"):
        g = base if (split, c, a, m) == TIE else (0.10 if p1_lowered(split, c, a, m) else 0.30)
    else:  # random
        g = 0.12
    return g + 0.01 * seed


def _png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow(np.random.default_rng(0).random((16, 16)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def default_overall(sid, split, c, seed):
    """The finding's overall metrics of a run (no flag: not degenerate, not at ceiling, learned)."""
    return {"auc": MEAN_AUC[sid], "accuracy": 0.7, "sensitivity": 0.6, "specificity": 0.7, "f1": 0.5}


def make_study(
    root,
    with_overlays=True,
    parent_uri=None,
    classes=CLASSES,
    val_auc=VAL_AUC,
    overall=default_overall,
    config_fp=lambda sid, seed: f"cfg-{sid}",
    scores=None,
):
    """A study folder as the study runner (bundle.study.runner) leaves it:
    runs/<id>/{DONE, eval/report/summary.json, model_selection.json, <split>/...}. ``val_auc``: {setting: validation
    mean AUC} (None: no model_selection.json); ``overall(setting, split, finding, seed)``: the finding's overall
    metrics; ``config_fp(setting, seed)``: the seed-free fingerprint; ``scores(setting, split, seed)``: {finding:
    scores} written to predictions.csv (None: no file)."""
    for sid, (p, rnd, ratio) in SETTINGS.items():
        for seed in SEEDS:
            rid = f"{sid}_seed{seed}"
            rdir = os.path.join(root, "runs", rid)
            rep = os.path.join(rdir, "eval", "report")
            summary = {}
            for split in SPLITS:
                d = {
                    "report_dir": os.path.join(rep, split),
                    "n": 100,
                    f"{split}_mean_auc": MEAN_AUC[sid] + 0.01 * seed,
                    f"{split}_hit_rate": 0.1 + 0.5 * p,
                }
                for a in ATTRS:
                    for m in R.GAP_METRICS:
                        for c in classes:
                            d[f"{split}_{c}/{a}/gap_{m}"] = gap(sid, split, c, a, m, seed)
                        d[f"{split}_macro/{a}/gap_{m}"] = gap(sid, split, "a", a, m, seed)
                summary[split] = d
                fr = {
                    "macro": {
                        "overall": {
                            m: {"value": MEAN_AUC[sid] - 0.1 + 0.01 * k}
                            for k, m in enumerate(("auc", "accuracy", "sensitivity", "f1"))
                        }
                    },
                    "overall": {c: overall(sid, split, c, seed) for c in classes},
                    "alignment": {
                        "hit_rate": {
                            "per_class": {c: {"value": 0.1 + 0.5 * p + (0.1 if c == "b" else 0)} for c in classes},
                            "macro": {"value": 0.15 + 0.5 * p},
                        }
                    },
                }
                os.makedirs(os.path.join(rep, split), exist_ok=True)
                with open(os.path.join(rep, split, "fairness_report.json"), "w") as f:
                    json.dump(fr, f)
                if with_overlays and split == "test_ood" and sid in ("p0.00", "p0.50", "p1.00"):
                    _png(os.path.join(rep, split, "plots", "attention_overlays.png"))
                sc = scores(sid, split, seed) if scores else None
                if sc:
                    n = len(next(iter(sc.values())))
                    with open(os.path.join(rep, split, "predictions.csv"), "w") as f:
                        f.write("index," + ",".join(f"score_{c}" for c in sc) + "\n")
                        for i in range(n):
                            f.write(f"{i}," + ",".join(str(sc[c][i]) for c in sc) + "\n")
            if val_auc is not None:
                with open(os.path.join(rep, "model_selection.json"), "w") as f:
                    json.dump({"split": "val", "n": 50, "mean_auc": val_auc[sid] + 0.01 * seed}, f)
            with open(os.path.join(rep, "summary.json"), "w") as f:
                json.dump(summary, f)  # None -> null, as NaN becomes in the real writer's strict fields
            with open(os.path.join(rdir, "DONE"), "w") as f:
                json.dump(
                    {
                        "run_id": rid,
                        "setting": sid,
                        "alignment_fraction": p,
                        "random_alignment": rnd,
                        "data_ratio": ratio,
                        "seed": seed,
                        "groups": ["alignment"],
                        "fingerprint": f"run-{sid}-{seed}",  # includes the seed, as the runner's
                        "config_fingerprint": config_fp(sid, seed),
                    },
                    f,
                )
    # an unfinished run (no DONE) must be ignored
    os.makedirs(os.path.join(root, "runs", "p0.25_seed0", "eval"), exist_ok=True)
    cfg = {
        "name": "crafted",
        "profile": "test",
        "seeds": list(SEEDS),
        "settings": [{"setting": s} for s in [*SETTINGS, "p0.25"]],
        "report": {"control_split": "test_ood", "attributes": ["sex", "age"]},
    }
    with open(os.path.join(root, "study_config.json"), "w") as f:
        json.dump(cfg, f)
    if parent_uri:
        with open(os.path.join(root, "mlflow_parent.json"), "w") as f:
            json.dump({"run_id": "0" * 32, "tracking_uri": parent_uri}, f)
    return root


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    root = make_study(str(tmp_path_factory.mktemp("study")), parent_uri="http://127.0.0.1:9")
    lines = []
    out = R.make_report(root, log=lines.append)
    return root, out, lines


def test_aggregation_mean_sd_over_seeds(crafted):
    root, _, _ = crafted
    runs = R.collect_runs(root)
    assert len(runs) == len(SETTINGS) * len(SEEDS)  # the unfinished run is not collected
    idx = R.Index(R.aggregate(runs))
    mean, sd, n = idx.get("p0.00", "test", "mean_auc")
    assert n == 3 and mean == pytest.approx(0.71) and sd == pytest.approx(0.01)  # 0.70, 0.71, 0.72 (ddof 1)
    assert idx.get("p1.00", "test_ood", "a/sex/gap_auc")[0] == pytest.approx(0.11)
    mean, sd, n = idx.get("p0.50", "test_ood", "b/age/gap_sensitivity")  # undefined in every seed
    assert n == 0 and math.isnan(mean) and math.isnan(sd)
    assert idx.get("p1.00", "test", "b/hit_rate")[0] == pytest.approx(0.7)  # from the fairness report
    assert idx.get("p0.50", "test", "macro/accuracy")[0] == pytest.approx(0.71)
    with open(os.path.join(root, "report", "aggregated.csv")) as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if r["setting"] == "p0.00" and r["split"] == "test" and r["metric"] == "mean_auc")
    assert float(row["mean"]) == pytest.approx(0.71) and float(row["sd"]) == pytest.approx(0.01) and row["n"] == "3"
    with open(os.path.join(root, "report", "results.csv")) as f:
        long = list(csv.DictReader(f))
    assert {r["run_id"] for r in long} == {f"{s}_seed{k}" for s in SETTINGS for k in SEEDS}
    assert {"run_id", "setting", "seed", "split", "metric", "value"} <= set(long[0])


def test_nan_seed_is_left_out_of_mean_and_sd():
    runs = [
        {
            "setting": "p0.00",
            "alignment_fraction": 0.0,
            "random_alignment": False,
            "data_ratio": 1.0,
            "groups": "alignment",
            "seed": s,
            "metrics": {("test", "m"): v},
        }
        for s, v in enumerate([0.2, math.nan, 0.4])
    ]
    (row,) = R.aggregate(runs)
    assert row["n"] == 2 and row["n_runs"] == 3 and row["mean"] == pytest.approx(0.3)
    assert row["sd"] == pytest.approx(np.std([0.2, 0.4], ddof=1))


def expected_p1_count(split, classes=CLASSES):
    """p = 1 vs p = 0 on one split by hand: the gap cells p1_lowered says, plus every hit rate (p = 1 is higher)."""
    gaps = sum(p1_lowered(split, c, a, m) for c in classes for a in ATTRS for m in R.GAP_METRICS)
    return gaps + len(classes) * len(ATTRS), len(classes) * len(ATTRS) * 5


def test_best_p_by_validation_and_the_paper_count(crafted):
    root, out, _ = crafted
    # validation AUC (model_selection.json) picks p = 1 (0.85 > 0.72); the in-domain test AUC would pick p = 0.5
    assert out["best_p"] == 1.0 and "validation" in out["best_p_how"] and out["best_p_warning"] == ""
    # OOD only, five metrics: 2 findings x 2 attributes x 5 = 20; lowered AUC/F1 gaps 8 + finding a/sex acc/sens 2
    # + hit rates 4 = 14
    assert expected_p1_count("test_ood") == (14, 20)
    assert out["lowered_best_p"] == (14, 20) and out["lowered_p1"] == (14, 20)
    assert out["unflagged_best_p"] == (14, 20)  # nothing flagged in this study
    md = open(os.path.join(root, "report", "results.md")).read()
    assert "alignment improved **14 of 20** comparisons" in md and "without the flagged comparisons: **14 of 20**" in md
    assert "in-domain split(s) test, best p improved 14 of 20" in md  # another count, labelled as such
    with open(os.path.join(root, "report", "gap_comparisons.csv")) as f:
        cells = list(csv.DictReader(f))
    assert {r["metric"] for r in cells} == {"accuracy", "auc", "sensitivity", "f1", "hit_rate"}
    assert {r["split"] for r in cells if r["ood"] == "True"} == {"test_ood"}
    tie = next(
        r for r in cells if r["comparison"] == "p1" and (r["split"], r["finding"], r["attribute"], r["metric"]) == TIE
    )
    assert tie["improved"] == "False" and tie["ood"] == "False"
    hit = next(r for r in cells if r["comparison"] == "p1" and r["metric"] == "hit_rate" and r["split"] == "test_ood")
    assert hit["improved"] == "True" and float(hit["aligned_value"]) > float(hit["baseline_value"])


def test_best_p_criteria_and_fallback(crafted, tmp_path):
    root, _, _ = crafted
    # on the in-domain test AUC instead: p = 0.5 (0.80 > 0.75), lower in every OOD gap but the undefined one, which is
    # not counted: 15 gaps + 4 hit rates
    out = R.make_report(root, out_dir=str(tmp_path / "t"), options={"best_p_by": "test/mean_auc"}, mlflow=False)
    assert out["best_p"] == 0.5 and "not the paper's validation-based selection" in out["best_p_how"]
    assert out["lowered_best_p"] == (19, 19)
    # no model_selection.json: a reported fallback, never a silent one
    bare = make_study(str(tmp_path / "bare"), with_overlays=False, val_auc=None)
    lines = []
    out = R.make_report(bare, options={"best_p_by": "validation/mean_auc"}, mlflow=False, log=lines.append)
    assert out["best_p"] == 0.5 and "FALLBACK: chosen by test mean_auc" in out["best_p_warning"]
    assert any("FALLBACK" in x for x in lines)
    assert (
        "**Warning**: best p could not be chosen by validation/mean_auc"
        in open(os.path.join(bare, "report", "results.md")).read()
    )
    with pytest.raises(ValueError, match="model_selection.json missing"):
        R.make_report(bare, options={"best_p_fallback": ""}, mlflow=False, log=lambda s: None)


def test_count_is_the_papers_30(tmp_path):
    """Three findings on one OOD split x 2 attributes x 5 metrics = 30, as the paper's 3 datasets x 2 groups x 5."""
    root = make_study(str(tmp_path / "s"), with_overlays=False, classes=("a", "b", "c"))
    out = R.make_report(root, mlflow=False, log=lambda s: None)
    # lowered: AUC and F1 gaps 3 x 2 x 2 = 12, accuracy and sensitivity of a/sex 2, hit rates 3 x 2 = 6
    assert expected_p1_count("test_ood", ("a", "b", "c")) == (20, 30)
    assert out["lowered_best_p"] == (20, 30)


def test_table2_bold_percent_and_one_hit_rate(crafted):
    root, _, _ = crafted
    md = open(os.path.join(root, "report", "results.md")).read()
    every = md.split("## Table 2, every alignment level")[1]
    rows = [ln for ln in every.splitlines() if ln.startswith("| a | sex |")][:3]  # test split block
    base, half, one = rows
    assert "w/o (p = 0)" in base and "Aligner p = 0.5 |" in half and "Aligner p = 1 (best)" in one
    # AUC gap column (%): p0 21.00, p0.5 16.00, p1 11.00 -> p1 bold; hit rate (a): 10, 35, 60 % -> p1 bold
    cells = [c.strip() for c in one.split("|")]
    assert cells[5] == "**11.00 ± 1.00**" and cells[8] == "**60.00 ± 0.00**"
    assert "**" not in base.split("|")[5] and "21.00 ± 1.00" in base
    paper = md.split("## Table 2: fairness gaps")[1].split("## Table 2, every")[0]
    assert "Aligner (best p = 1)" in paper and "Aligner p = 0.5" not in paper
    assert "**test_ood**" in paper and "**test**" not in paper  # the paper's Table 2: out-of-domain splits only
    # "all findings" hit rate = pooled over every finding's pairs (hit_rate: 10 + 50 p %), as the positive control
    # and Fig. 4, not the mean over findings (macro/hit_rate: 15 + 50 p %)
    (row,) = [ln for ln in paper.splitlines() if ln.startswith("| all findings | sex | Aligner")]
    assert row.split("|")[8].strip() == "**60.00 ± 0.00**"
    assert "pooled over the pairs in scope" in md


def test_positive_control_table(crafted):
    root, _, _ = crafted
    with open(os.path.join(root, "report", "positive_control.csv")) as f:
        rows = {r["setting"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["p0.00", "p0.50", "p1.00", "random_p1.00"]  # alignment levels, then random
    assert float(rows["p1.00"]["macro/sex/gap_auc_mean"]) == pytest.approx(0.11)
    assert float(rows["random_p1.00"]["mean_auc_mean"]) == pytest.approx(0.66)
    assert float(rows["p0.50"]["hit_rate_mean"]) == pytest.approx(0.35) and rows["p0.50"]["seeds"] == "3"
    md = open(os.path.join(root, "report", "results.md")).read()
    assert "| p = 1 | 11.00 ± 1.00 | 11.00 ± 1.00 | 0.760 ± 0.010 | 60.0 ± 0.0 | 3 |" in md


def test_figures_are_nonempty_pngs(crafted):
    root, out, _ = crafted
    import matplotlib.image as mpimg

    for name in (
        "fig3_gap_vs_performance.png",
        "fig4_random_vs_aligned.png",
        "fig5_data_ratio.png",
        "fig6_radar.png",
        "attention_gallery_test_ood.png",
    ):
        path = os.path.join(root, "report", name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        img = mpimg.imread(path)
        assert img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 0.01, name  # not blank
        assert f"]({name})" in open(os.path.join(root, "report", "results.md")).read()
    # the test split has no overlays in this study: its gallery is not drawn and the report says so
    assert "attention_gallery_test.png" not in out["files"]


def test_mlflow_down_does_not_fail_the_report(crafted):
    _, out, lines = crafted
    assert out["mlflow_logged"] is False and any("unreachable" in x for x in lines)


def test_missing_runs_are_listed_and_bad_marker_rejected(crafted, tmp_path):
    root, out, _ = crafted
    assert out["missing"] == ["p0.25_seed0", "p0.25_seed1", "p0.25_seed2"]
    bad = tmp_path / "s"
    os.makedirs(bad / "runs" / "x_seed0")
    (bad / "runs" / "x_seed0" / "DONE").write_text(json.dumps({"seed": 0}))
    with pytest.raises(ValueError, match="DONE: missing field"):
        R.make_report(str(bad), mlflow=False, log=lambda s: None)
    with pytest.raises(ValueError, match="no finished run"):
        R.make_report(str(tmp_path), mlflow=False, log=lambda s: None)


def test_report_defaults_defined_once(tmp_path):
    """ReportOptions is the one source of the defaults: the study config records them, the report falls back to
    them, and the report script's help names them."""
    from bundle.study import ReportOptions, load_study_config

    study_yaml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "study.yaml")
    defaults = ReportOptions().to_dict()
    assert defaults == {
        "control_split": "test_ood",
        "best_p_by": "validation/mean_auc",
        "best_p_fallback": "test/mean_auc",
        "ood_splits": ["test_ood"],
        "attributes": ["sex", "age"],
        "fig_gap_metric": "auc",
        "ceiling": 0.999,
        "weak_auc": 0.6,
        "degenerate_sd": 1e-3,
    }
    assert load_study_config(study_yaml, study_dir=str(tmp_path / "s")).report == defaults
    cfg = load_study_config(study_yaml, study_dir=str(tmp_path / "s"), overrides={"report.best_p_by": "test/hit_rate"})
    assert cfg.report == {**defaults, "best_p_by": "test/hit_rate"}
    opts = ReportOptions.resolve({"best_p_by": "a/b", "not_an_option": 1}, None, {"attributes": ["age"]})
    assert opts == ReportOptions(best_p_by="a/b", attributes=("age",))


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "report_script",
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "report.py"),
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_report_script(crafted, tmp_path, capsys):
    root, _, _ = crafted
    script = _script()
    out = tmp_path / "rep"
    assert script.main([root, "--out", str(out), "--no-mlflow", "--best-p-by", "test/mean_auc"]) == 0
    assert "best p = 0.5" in capsys.readouterr().out and (out / "results.md").exists()
    assert script.main([root, "--out", str(out), "--no-mlflow", "--best-p-by", "validation/mean_auc"]) == 0
    assert "best p = 1.0" in capsys.readouterr().out
    assert script.main([str(tmp_path / "nothing")]) == 2  # a clear error, no traceback
    bare = make_study(str(tmp_path / "bare"), with_overlays=False, val_auc=None)
    assert script.main([bare, "--no-mlflow", "--best-p-fallback", "none"]) == 2
    assert "model_selection.json missing" in capsys.readouterr().err


def test_report_from_results_csv(crafted, tmp_path):
    """A folder with a report's results.csv and study_config.json (e.g. docs/quick_study) gives the same numbers."""
    root, out, _ = crafted
    folder = tmp_path / "committed"
    folder.mkdir()
    for name in ("results.csv",):
        (folder / name).write_text(open(os.path.join(root, "report", name)).read())
    (folder / "study_config.json").write_text(open(os.path.join(root, "study_config.json")).read())
    again = R.make_report(str(folder), out_dir=str(tmp_path / "again"), mlflow=False, log=lambda s: None)
    assert again["best_p"] == out["best_p"] and again["lowered_best_p"] == out["lowered_best_p"] == (14, 20)
    assert open(tmp_path / "again" / "results.csv").read() == open(os.path.join(root, "report", "results.csv")).read()


def test_seed_free_fingerprint_warns_only_on_real_differences(crafted, tmp_path):
    root, out, _ = crafted
    # the crafted runs' `fingerprint` differs per seed (as the runner's), their config fingerprint does not
    assert out["mixed"] == []
    assert "mix runs" not in open(os.path.join(root, "report", "results.md")).read()
    odd = make_study(
        str(tmp_path / "odd"), with_overlays=False, config_fp=lambda sid, seed: f"cfg-{sid}" + ("-x" * (seed == 2))
    )
    lines = []
    out = R.make_report(odd, mlflow=False, log=lines.append)
    assert out["mixed"] == sorted(SETTINGS)
    assert "**Warning**: settings" in open(os.path.join(odd, "report", "results.md")).read()
    assert any("different configurations" in x for x in lines)


def test_layout_config_fingerprint_ignores_the_seed(tmp_path):
    from bundle.study import load_study_config
    from bundle.study.layout import config_fingerprint, fingerprint

    study_yaml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "study.yaml")
    cfg = load_study_config(study_yaml, profile="quick", study_dir=str(tmp_path / "s"))
    r0, r1 = [r for r in cfg.runs if r.setting.id == "p0.50"][:2]
    assert r0.seed != r1.seed
    assert fingerprint(cfg, r0, "d.json") != fingerprint(cfg, r1, "d.json")
    assert config_fingerprint(cfg, r0, "d.json") == config_fingerprint(cfg, r1, "d.json")
    assert config_fingerprint(cfg, r0, "d.json") != config_fingerprint(cfg, r0, "other.json")
    other = load_study_config(study_yaml, profile="quick", study_dir=str(tmp_path / "s"), train_overrides={"lr": 1e-3})
    r0b = next(r for r in other.runs if r.run_id == r0.run_id)
    assert config_fingerprint(other, r0b, "d.json") != config_fingerprint(cfg, r0, "d.json")


def flagged_overall(sid, split, c, seed):
    """Finding a: the baseline predicts no positive in seed 0; finding b: p = 1 has AUC 1 in every seed; finding c:
    the baseline barely learned it (AUC 0.55)."""
    o = default_overall(sid, split, c, seed)
    if sid == "p0.00" and c == "a" and seed == 0:
        o.update(sensitivity=0.0, specificity=1.0)
    if sid == "p1.00" and c == "b":
        o.update(auc=1.0)
    if sid == "p0.00" and c == "c":
        o.update(auc=0.55)
    return o


def constant_scores(sid, split, seed):
    """Seed 1 of the baseline scores finding a constantly (sd 1e-5 < 1e-3) on the OOD split."""
    if sid == "p0.00" and split == "test_ood":
        rng = np.random.default_rng(seed)
        return {"a": 0.3 + (1e-5 if seed == 1 else 0.2) * rng.standard_normal(40), "b": rng.random(40)}
    return None


def test_degenerate_ceiling_and_weak_flags(tmp_path):
    root = make_study(
        str(tmp_path / "s"),
        with_overlays=False,
        classes=("a", "b", "c"),
        overall=flagged_overall,
        scores=constant_scores,
    )
    out = R.make_report(root, mlflow=False, log=lambda s: None)
    assert out["lowered_best_p"] == (20, 30)
    # flagged: a (degenerate baseline): 4 gaps x 2 attributes = 8; b: the AUC gap x 2 = 2 (ceiling); c (weak
    # baseline): 8. Left: b's accuracy, sensitivity, F1 gaps x 2 (F1 lowered: 2) + 6 hit rates (all raised) = 8 of 12
    assert out["unflagged_best_p"] == (8, 12)
    with open(os.path.join(root, "report", "flags.csv")) as f:
        flags = {(r["setting"], r["split"], r["finding"]): r["flags"] for r in csv.DictReader(f)}
    assert flags[("p0.00", "test_ood", "a")] == "degenerate in p0.00_seed0, p0.00_seed1"  # no positives; constant
    assert flags[("p1.00", "test_ood", "b")] == "at ceiling (auc)"
    assert flags[("p0.00", "test_ood", "c")] == "barely learned (baseline)"
    assert ("p0.00", "test_ood", "b") not in flags
    md = open(os.path.join(root, "report", "results.md")).read()
    assert "without the flagged comparisons: **8 of 12** (18 flagged: 8 degenerate, 2 ceiling, 8 barely learned)" in md
    with open(os.path.join(root, "report", "gap_comparisons.csv")) as f:
        cells = [r for r in csv.DictReader(f) if r["comparison"] == "best_p" and r["split"] == "test_ood"]
    b_auc = next(r for r in cells if (r["finding"], r["attribute"], r["metric"]) == ("b", "sex", "auc"))
    b_f1 = next(r for r in cells if (r["finding"], r["attribute"], r["metric"]) == ("b", "sex", "f1"))
    assert b_auc["flags"] == "aligned at ceiling (auc)" and b_f1["flags"] == ""


def test_merge_condition_folders(tmp_path):
    eff = make_study(str(tmp_path / "eff"), with_overlays=False)
    ede = make_study(str(tmp_path / "ede"), with_overlays=False)
    out_dir = tmp_path / "merged"
    # eff: findings a and b: 14 of 20 (as the crafted study); ede, finding b only: AUC and F1 gaps 4 + hit rates 2
    # of 2 x 5 = 10. Together 20 of 30.
    out = R.make_merged_report({"effusion": eff, "edema": ede}, str(out_dir), findings={"edema": ["b"]}, log=print)
    assert out["counts"]["best_p"] == (20, 30) and out["best_p"] == {"effusion": 1.0, "edema": 1.0}
    with open(out_dir / "table2.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["condition"], r["finding"]) for r in rows} == {
        ("effusion", "a"),
        ("effusion", "b"),
        ("effusion", "macro"),
        ("edema", "b"),
    }
    assert {r["split"] for r in rows} == {"test_ood"}
    md = (out_dir / "results.md").read_text()
    assert "improved 20 of 30 comparisons" in md and "| effusion | test_ood | a | sex |" in md
    assert (out_dir / "fig6_radar.png").read_bytes()[:4] == b"\x89PNG"
    script = _script()
    assert script.main([f"effusion={eff}", f"edema={ede}", "--out", str(tmp_path / "m2"), "--findings", "edema=b"]) == 0
    assert (tmp_path / "m2" / "results.md").read_text().count("improved 20 of 30") == 1
    assert script.main([eff, ede]) == 2  # a merged report needs --out


def test_datalist_file_drops_the_synthetic_profile_keys(tmp_path):
    from bundle.study import load_study_config
    from bundle.study.grid import train_command

    study_yaml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "study.yaml")
    quick = load_study_config(study_yaml, profile="quick", study_dir=str(tmp_path / "q"))
    assert quick.train_overrides["dataset_dir"] == "data/synthetic_quick" and quick.dropped_train_overrides == {}
    mine = load_study_config(
        study_yaml, profile="quick", study_dir=str(tmp_path / "q"), train_overrides={"datalist_file": "/d/list.json"}
    )
    assert "dataset_dir" not in mine.train_overrides and "synthetic_params" not in mine.train_overrides
    assert set(mine.dropped_train_overrides) == {"dataset_dir", "synthetic_params"}
    assert mine.train_overrides["max_epochs"] == 15  # the rest of the profile stays
    cmd = train_command(mine, mine.runs[0], "/d/list.json")
    assert "--dataset_dir" not in cmd and "--synthetic_params" not in cmd and "--datalist_file" in cmd
    # a key the user sets explicitly is kept
    kept = load_study_config(
        study_yaml,
        profile="quick",
        study_dir=str(tmp_path / "q"),
        train_overrides={"datalist_file": "/d/list.json", "dataset_dir": "mine"},
    )
    assert kept.train_overrides["dataset_dir"] == "mine" and "synthetic_params" not in kept.train_overrides


def test_figure_axes(crafted, monkeypatch):
    """Fig. 3 without point labels, Fig. 4's hit-rate axis fixed at 0-100 %, Fig. 5 the four gaps, Fig. 6 one radar
    per finding x OOD split with labels outside the circle."""
    from bundle.study.report import figures as F

    root, _, _ = crafted
    idx = R.Index(R.aggregate(R.collect_runs(root)))
    figs = {}
    monkeypatch.setattr(F, "_save", lambda fig, path: figs.setdefault(os.path.basename(path), fig) and path)
    F.fig3_gap_vs_performance(idx, "fig3.png", ["sex", "age"])
    assert all(not ax.texts for ax in figs["fig3.png"].axes)  # no labels beside the points (they overlapped)
    F.fig4_random_vs_aligned(idx, "fig4.png", ["sex", "age"])
    hit_ax = figs["fig4.png"].axes[-1]
    assert hit_ax.get_ylim() == (0.0, 100.0) and "(%)" in hit_ax.get_ylabel()
    # the AUC gap axis: from 0 to 1.15 x the highest bar + sd (the baseline: 21 + 1 = 22 %)
    assert figs["fig4.png"].axes[1].get_ylim() == pytest.approx((0.0, 1.15 * 22.0))
    F.fig5_data_ratio(idx, "fig5.png", ["sex", "age"])
    labels = [ax.get_ylabel() for ax in figs["fig5.png"].axes[::4]]  # first column: one row per gap metric
    assert labels == ["acc gap (pp)", "AUC gap (pp)", "sens gap (pp)", "F1 gap (pp)"]
    models = [("w/o (p = 0)", "p0.00"), ("Aligner (best p = 1)", "p1.00")]
    F.fig6_radar(F.radar_panels(idx, models, ["test_ood"]), "fig6.png")
    radars = [ax for ax in figs["fig6.png"].axes if ax.get_visible() and ax.name == "polar"]
    assert [ax.get_title() for ax in radars] == ["a, test_ood (best p = 1)", "b, test_ood (best p = 1)"]
    for ax in radars:
        assert len(ax.texts) == 4 and all(t.get_position()[1] > ax.get_ylim()[1] for t in ax.texts)
