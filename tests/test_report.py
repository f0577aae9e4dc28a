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


def make_study(root, with_overlays=True, parent_uri=None):
    """A study folder as the study runner (bundle.study.runner) leaves it:
    runs/<id>/{DONE, eval/report/summary.json, <split>/...}."""
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
                        for c in CLASSES:
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
                    "overall": {
                        c: {"auc": MEAN_AUC[sid], "accuracy": 0.7, "sensitivity": 0.6, "f1": 0.5} for c in CLASSES
                    },
                    "alignment": {
                        "hit_rate": {
                            "per_class": {c: {"value": 0.1 + 0.5 * p + (0.1 if c == "b" else 0)} for c in CLASSES},
                            "macro": {"value": 0.15 + 0.5 * p},
                        }
                    },
                }
                os.makedirs(os.path.join(rep, split), exist_ok=True)
                with open(os.path.join(rep, split, "fairness_report.json"), "w") as f:
                    json.dump(fr, f)
                if with_overlays and split == "test_ood" and sid in ("p0.00", "p0.50", "p1.00"):
                    _png(os.path.join(rep, split, "plots", "attention_overlays.png"))
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
                        "fingerprint": "x",
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
        "report": {"control_split": "test_ood", "best_p_by": "test/mean_auc", "attributes": ["sex", "age"]},
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


def test_best_p_and_gap_count(crafted):
    root, out, _ = crafted
    assert out["best_p"] == 0.5 and "test mean_auc" in out["best_p_how"]
    n_cells = len(SPLITS) * len(CLASSES) * len(ATTRS) * len(R.GAP_METRICS)
    # best p = 0.5: lower everywhere except the undefined cell, which is not counted
    assert out["lowered_best_p"] == (n_cells - 1, n_cells - 1)
    expected_p1 = sum(p1_lowered(s, c, a, m) for s in SPLITS for c in CLASSES for a in ATTRS for m in R.GAP_METRICS)
    assert expected_p1 == 20 and out["lowered_p1"] == (20, n_cells)
    md = open(os.path.join(root, "report", "results.md")).read()
    assert f"lowered the gap in **{n_cells - 1} of {n_cells - 1}** comparisons" in md
    assert f"p = 1 vs w/o (p = 0): alignment lowered the gap in **20 of {n_cells}** comparisons" in md
    with open(os.path.join(root, "report", "gap_comparisons.csv")) as f:
        cells = list(csv.DictReader(f))
    tie = next(
        r for r in cells if r["comparison"] == "p1" and (r["split"], r["finding"], r["attribute"], r["metric"]) == TIE
    )
    assert tie["lowered"] == "False"
    und = next(
        r
        for r in cells
        if r["comparison"] == "best_p" and (r["split"], r["finding"], r["attribute"], r["metric"]) == UNDEFINED
    )
    assert und["lowered"] == ""


def test_table2_bold_and_percent(crafted):
    root, _, _ = crafted
    md = open(os.path.join(root, "report", "results.md")).read()
    every = md.split("## Table 2, every alignment level")[1]
    rows = [ln for ln in every.splitlines() if ln.startswith("| a | sex |")][:3]  # test split block
    base, half, one = rows
    assert "w/o (p = 0)" in base and "p = 0.5 (best)" in half and "p = 1" in one
    # AUC gap column (%): p0 21.00, p0.5 16.00, p1 11.00 -> p1 bold; hit rate (a): 10, 35, 60 % -> p1 bold
    cells = [c.strip() for c in one.split("|")]
    assert cells[5] == "**11.00 ± 1.00**" and cells[8] == "**60.00 ± 0.00**"
    assert "**" not in base.split("|")[5] and "21.00 ± 1.00" in base
    paper = md.split("## Table 2: fairness gaps")[1].split("## Table 2, every")[0]
    assert "Aligner (best p = 0.5)" in paper and "Aligner p = 1" not in paper


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
        "best_p_by": "test/mean_auc",
        "attributes": ["sex", "age"],
        "fig_gap_metric": "auc",
    }
    assert load_study_config(study_yaml, study_dir=str(tmp_path / "s")).report == defaults
    cfg = load_study_config(study_yaml, study_dir=str(tmp_path / "s"), overrides={"report.best_p_by": "test/hit_rate"})
    assert cfg.report == {**defaults, "best_p_by": "test/hit_rate"}
    opts = ReportOptions.resolve({"best_p_by": "a/b", "not_an_option": 1}, None, {"attributes": ["age"]})
    assert opts == ReportOptions(best_p_by="a/b", attributes=("age",))


def test_report_script(crafted, tmp_path, capsys):
    import importlib.util

    root, _, _ = crafted
    spec = importlib.util.spec_from_file_location(
        "report_script",
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "report.py"),
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "rep"
    assert script.main([root, "--out", str(out), "--no-mlflow", "--best-p-by", "test/hit_rate"]) == 0
    assert "best p = 1.0" in capsys.readouterr().out and (out / "results.md").exists()
    assert script.main([str(tmp_path / "nothing")]) == 2  # a clear error, no traceback
