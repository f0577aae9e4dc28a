"""The study runner: grid and ids from configs/study.yaml, resumable subprocess runs, locks, shards, MLflow nesting.

Most tests drive a stub trainer (a tiny script injected through ``train_command``) so that they do not train; one
end-to-end test runs a real mini study (2 settings x 1 seed, tiny data, 1 epoch) through the report.
"""

import json
import os
import sys
import textwrap

import pytest
import yaml

from bundle import study
from bundle.study import layout, load_study_config, run_study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_YAML = os.path.join(ROOT, "configs", "study.yaml")

# A stand-in for the training job: parses `--key value`, records the call, fails for run names listed in
# $STUB_FAIL, and otherwise writes the summary.json a real run writes at its end.
STUB = textwrap.dedent("""
    import json, os, sys
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    a = {k[2:]: v for k, v in args.items()}
    out = a["output_dir"]
    ckpt = os.path.join(out, "checkpoints")
    with open(os.environ["STUB_CALLS"], "a") as f:
        f.write(json.dumps({"run_name": a["run_name"], "resumed": os.path.isdir(ckpt), "argv": sys.argv[1:],
                            "omp": os.environ.get("OMP_NUM_THREADS"), "pid": os.getpid(),
                            "uri": os.environ.get("MLFLOW_TRACKING_URI")}) + "\\n")
    os.makedirs(ckpt, exist_ok=True)
    if a.get("stub_sleep"):
        import time
        time.sleep(float(a["stub_sleep"]))
    fail = os.environ.get("STUB_FAIL", "")
    if fail and os.path.exists(fail) and a["run_name"] in open(fail).read().split():
        print("stub: planned failure", file=sys.stderr)
        sys.exit(3)
    if a.get("skip_summary") == "1":
        sys.exit(0)
    p = float(a["alignment_fraction"])
    summ = {s: {"n": 10, f"{s}_mean_auc": 0.6 + 0.2 * p, f"{s}_hit_rate": p, f"{s}_macro/sex/gap_auc": 0.3 - 0.2 * p,
                f"{s}_a/sex/gap_auc": 0.3 - 0.2 * p} for s in ("test", "test_ood")}
    os.makedirs(os.path.join(out, "report"), exist_ok=True)
    json.dump(summ, open(os.path.join(out, "report", "summary.json"), "w"))
""")


def _stub_config(tmp_path, **extra) -> str:
    """A study YAML whose runs are the stub; a dummy datalist so that nothing generates data."""
    (tmp_path / "stub.py").write_text(STUB)
    (tmp_path / "datalist.json").write_text("{}")
    cfg = {
        "name": "stubstudy",
        "output_root": str(tmp_path / "results"),
        "seeds": [0, 1],
        "train_command": [sys.executable, str(tmp_path / "stub.py")],
        "grid": {"groups": ["alignment", "random"], "alignment_fractions": [0.0, 1.0]},
        "train_overrides": {"datalist_file": str(tmp_path / "datalist.json")},
        "tracking_uri": "http://127.0.0.1:9",  # nothing listens: the study must run without MLflow
    }
    cfg.update(extra)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _calls(tmp_path) -> list[dict]:
    f = tmp_path / "calls.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


@pytest.fixture
def stub_env(tmp_path, monkeypatch):
    monkeypatch.setenv("STUB_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("STUB_FAIL", str(tmp_path / "fail.txt"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


# ------------------------------------------------------------------------------------------------ grid, ids, profiles
def test_default_grid_ids_and_dedup():
    cfg = load_study_config(STUDY_YAML)
    ids = [s.id for s in cfg.settings]
    assert ids == [
        "p0.00",
        "p0.25",
        "p0.50",
        "p0.75",
        "p1.00",
        "random_p1.00",
        "ratio0.25_p0.00",
        "ratio0.25_p1.00",
        "ratio0.50_p0.00",
        "ratio0.50_p1.00",
        "ratio0.75_p0.00",
        "ratio0.75_p1.00",
    ]
    # data ratio 1 at p = 0 / p = 1 is the same training as the alignment setting: trained once, in both groups
    by = {s.id: s for s in cfg.settings}
    assert by["p0.00"].groups == ("alignment", "data_ratio") and by["p0.50"].groups == ("alignment",)
    assert by["random_p1.00"].random_alignment and by["random_p1.00"].alignment_fraction == 1.0
    assert by["ratio0.25_p1.00"].data_ratio == 0.25
    runs = cfg.runs
    assert cfg.seeds == [0, 1, 2, 3, 4] and len(runs) == 60
    assert len({r.run_id for r in runs}) == 60
    assert runs[0].run_id == "p0.00_seed0" and runs[12].run_id == "p0.00_seed1"  # seed-major order
    assert cfg.study_dir == os.path.join(ROOT, "results", "study")
    assert cfg.tracking_uri.startswith("sqlite:///") or cfg.tracking_uri == os.environ.get("MLFLOW_TRACKING_URI")


def test_profiles_and_overrides(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    quick = load_study_config(STUDY_YAML, profile="quick")
    assert quick.name == "quick" and quick.study_dir.endswith(os.path.join("results", "quick"))
    ratios = [f"ratio{r}_p{p}" for r in ("0.25", "0.50", "0.75") for p in ("0.00", "1.00")]
    assert [s.id for s in quick.settings] == ["p0.00", "p0.25", "p0.50", "p0.75", "p1.00", "random_p1.00"] + ratios
    assert len(quick.runs) == len(quick.seeds) * 12 and "max_epochs" in quick.train_overrides
    assert quick.tracking_uri == "sqlite:///" + os.path.join(quick.study_dir, "mlruns.db")
    paper = load_study_config(STUDY_YAML, profile="paper")
    assert [os.path.basename(p) for p in paper.train_config] == ["train.yaml", "paper.yaml"]
    assert paper.seeds == [0, 1, 2, 3, 4]  # "seeds: 5" is a count
    cfg = load_study_config(
        STUDY_YAML,
        profile="quick",
        overrides={"seeds": [3], "grid.groups": ["alignment"]},
        train_overrides={"max_epochs": 2, "network_def#vit_layers": 2},
        name="q2",
    )
    assert cfg.seeds == [3] and len(cfg.runs) == 5 and cfg.name == "q2"
    assert (
        cfg.train_overrides["max_epochs"] == 2
        and cfg.train_overrides["image_size"] == quick.train_overrides["image_size"]
    )  # merged, not replaced
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert load_study_config(STUDY_YAML).tracking_uri == "http://mlflow.example:5000"
    assert load_study_config(STUDY_YAML, tracking_uri="sqlite:////tmp/x.db").tracking_uri == "sqlite:////tmp/x.db"


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"profile": "nope"}, "profile 'nope'"),
        ({"train_overrides": {"seed": 3}}, "train_overrides sets ['seed']"),
        ({"overrides": {"grid.alignment_fractions": [0.5, 2]}}, "grid.alignment_fractions"),
        ({"overrides": {"grid.groups": ["alignment", "bogus"]}}, "grid.groups"),
        ({"overrides": {"seeds": [1, 1]}}, "seeds"),
        ({"overrides": {"grid.data_ratios": [0]}}, "grid.data_ratios"),
        ({"name": "a/b"}, "plain folder name"),
    ],
)
def test_bad_config_says_what_to_fix(kwargs, needle):
    with pytest.raises(ValueError, match="study.yaml") as e:
        load_study_config(STUDY_YAML, **kwargs)
    assert needle in str(e.value)


def test_shards_partition_and_only():
    runs = load_study_config(STUDY_YAML).runs
    parts = [study.select_runs(runs, (i, 3)) for i in (1, 2, 3)]
    ids = [r.run_id for part in parts for r in part]
    assert sorted(ids) == sorted(r.run_id for r in runs) and len(ids) == len(set(ids))
    assert [r.run_id for r in study.select_runs(runs, only=["random_*"])] == [f"random_p1.00_seed{s}" for s in range(5)]
    assert len(study.select_runs(runs, only=["p1.00"])) == 5  # a setting id selects all its seeds
    assert study.parse_shard("2/3") == (2, 3) and study.parse_shard(None) is None
    for bad in ("0/3", "4/3", "x", "1-3"):
        with pytest.raises(ValueError, match="--shard"):
            study.parse_shard(bad)


def test_command_values_parse_back_through_fire(tmp_path):
    from fire.parser import DefaultParseValue

    cfg = load_study_config(
        STUDY_YAML,
        profile="quick",
        study_dir=str(tmp_path / "s"),
        train_overrides={"network_def#vit_layers": 2, "synthetic_params": {"n_train": 64}},
    )
    spec = next(r for r in cfg.runs if r.run_id == "random_p1.00_seed1")
    cmd = study.train_command(cfg, spec, datalist_file="/data/dl.json", parent_run_id="0123456789")
    assert cmd[:5] == [sys.executable, "-m", "monai.bundle", "run", "training"]
    args = {k[2:]: DefaultParseValue(v) for k, v in zip(cmd[7::2], cmd[8::2], strict=True)}
    assert args["alignment_fraction"] == 1.0 and args["random_alignment"] is True and args["seed"] == 1
    assert args["data_ratio"] == 1.0 and args["run_name"] == "random_p1.00_seed1"
    assert args["mlflow_parent_run_id"] == "0123456789"  # stays a string although it looks like a number
    assert args["mlflow_tags"]["setting"] == "random_p1.00" and args["mlflow_tags"]["seed"] == "1"
    assert args["output_dir"] == os.path.join(cfg.study_dir, "runs", "random_p1.00_seed1", "eval")
    # mappings merge key by key: the override's n_train on top of the quick profile's other sizes
    assert args["synthetic_params"]["n_train"] == 64 and args["network_def#vit_layers"] == 2
    assert args["synthetic_params"]["n_val"] == cfg.train_overrides["synthetic_params"]["n_val"]
    assert args["datalist_file"] == "/data/dl.json" and args["max_epochs"] == cfg.train_overrides["max_epochs"]


# ------------------------------------------------------------------------------------------------ running (stub)
def test_failed_run_is_reported_and_retried_finished_runs_skipped(stub_env):
    tmp = stub_env
    (tmp / "fail.txt").write_text("p1.00_seed0\n")
    cfg = load_study_config(_stub_config(tmp))
    lines = []
    res = run_study(cfg, workers=2, report=False, log=lines.append)
    assert res.failed == ["p1.00_seed0"] and not res.ok
    assert len(res.finished_now) == 5
    assert any("FAILED p1.00_seed0" in x and "planned failure" in x for x in lines)  # the log tail is shown
    assert any("ETA" in x and "[" in x for x in lines)  # a progress line per finished run
    rdir = os.path.join(cfg.study_dir, "runs", "p1.00_seed0")
    assert os.path.exists(os.path.join(rdir, "FAILED")) and not os.path.exists(os.path.join(rdir, "DONE"))
    done = json.load(open(os.path.join(cfg.study_dir, "runs", "p0.00_seed1", "DONE")))
    assert done["seed"] == 1 and done["alignment_fraction"] == 0.0 and done["fingerprint"]
    calls = _calls(tmp)
    assert len(calls) == 6 and {c["omp"] for c in calls} == {str(max(1, len(os.sched_getaffinity(0)) // 2))}
    assert {c["uri"] for c in calls} == {"http://127.0.0.1:9"}

    # second invocation: only the failed run is redone, and it resumes its folder (checkpoints kept)
    (tmp / "fail.txt").write_text("")
    dry = run_study(cfg, dry_run=True, log=lines.append)
    assert dry.statuses["p1.00_seed0"] == "failed" and dry.statuses["p0.00_seed0"] == "done"
    res2 = run_study(cfg, workers=2, report=False, log=lines.append)
    assert res2.ok and res2.finished_now == ["p1.00_seed0"]
    new = _calls(tmp)[6:]
    assert [c["run_name"] for c in new] == ["p1.00_seed0"] and new[0]["resumed"]
    assert not os.path.exists(os.path.join(rdir, "FAILED")) and os.path.exists(os.path.join(rdir, "DONE"))

    # third invocation: nothing to do
    res3 = run_study(cfg, workers=2, report=False, log=lines.append)
    assert res3.ok and not res3.finished_now and len(_calls(tmp)) == 7 and len(res3.done) == 6


def test_exit_zero_without_summary_is_a_failure(stub_env):
    cfg = load_study_config(
        _stub_config(stub_env, seeds=[0]),
        train_overrides={"skip_summary": 1},
        overrides={"grid.groups": ["alignment"], "grid.alignment_fractions": [0.0]},
    )
    res = run_study(cfg, report=False, log=lambda s: None)
    assert res.failed == ["p0.00_seed0"]
    why = json.load(open(os.path.join(cfg.study_dir, "runs", "p0.00_seed0", "FAILED")))["why"]
    assert "summary.json" in why


def test_locked_run_is_left_to_its_owner_and_shards(stub_env):
    cfg = load_study_config(_stub_config(stub_env))
    spec = next(r for r in cfg.runs if r.run_id == "p0.00_seed0")
    with layout.try_run_lock(cfg.run_dir(spec)) as fd:  # "another machine" runs it
        assert fd is not None
        assert run_study(cfg, dry_run=True, log=lambda s: None).statuses["p0.00_seed0"] == "running"
        res = run_study(cfg, shard=(1, 2), report=False, log=lambda s: None)
    # shard 1/2 = runs 0, 2, 4 of the fixed order: p0.00_seed0 (locked), random_p1.00_seed0, p1.00_seed1
    assert res.selected == ["p0.00_seed0", "random_p1.00_seed0", "p1.00_seed1"]
    assert res.skipped_busy == ["p0.00_seed0"]
    assert sorted(c["run_name"] for c in _calls(stub_env)) == ["p1.00_seed1", "random_p1.00_seed0"]
    res2 = run_study(cfg, shard=(2, 2), report=False, log=lambda s: None)
    assert sorted(res2.finished_now) == ["p0.00_seed1", "p1.00_seed0", "random_p1.00_seed1"]


def test_changed_config_marks_runs_stale(stub_env):
    path = _stub_config(stub_env, seeds=[0])
    cfg = load_study_config(path, overrides={"grid.groups": ["alignment"]})
    assert run_study(cfg, report=False, log=lambda s: None).ok
    changed = load_study_config(path, overrides={"grid.groups": ["alignment"]}, train_overrides={"max_epochs": 9})
    lines = []
    res = run_study(changed, report=False, log=lines.append)
    assert sorted(res.stale) == ["p0.00_seed0", "p1.00_seed0"] and not res.finished_now
    assert any("--redo-stale" in x for x in lines) and len(_calls(stub_env)) == 2
    res = run_study(changed, report=False, redo_stale=True, log=lines.append)
    assert sorted(res.finished_now) == ["p0.00_seed0", "p1.00_seed0"]
    last = _calls(stub_env)[-1]
    assert not last["resumed"] and "9" in last["argv"]  # folder wiped, new configuration used


def test_stub_study_writes_report(stub_env):
    cfg = load_study_config(_stub_config(stub_env, seeds=[0, 1]))
    res = run_study(cfg, report=True, log=lambda s: None)
    assert res.ok and res.report_dir == os.path.join(cfg.study_dir, "report")
    md = open(os.path.join(res.report_dir, "results.md")).read()
    # the stub's gap falls with p: 0.30 at p = 0, 0.10 at p = 1, in 1 finding x 1 attribute x AUC on the OOD split
    # (the paper's count; no per-finding hit rate in the stub), and the same on the in-domain split (listed apart)
    assert "alignment improved **1 of 1** comparisons" in md and "in-domain split(s) test, best p improved 1 of 1" in md
    # the stub writes no model_selection.json: the best p falls back to test data, and says so
    assert "FALLBACK: chosen by test mean_auc" in md
    # two seeds per setting, one configuration: no warning (the runner's seed-free fingerprints agree)
    assert "mix runs" not in md and "not checked" not in md
    assert "| p = 0 | 30.00 ± 0.00 |" in md and "| random, p = 1 |" in md


def test_sigterm_stops_the_children_and_leaves_runs_resumable(stub_env):
    import signal
    import subprocess
    import time

    path = _stub_config(stub_env, seeds=[0])
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "run_study.py"),
            "--config",
            path,
            "--workers",
            "2",
            "--train",
            "stub_sleep=60",
            "--set",
            "grid.groups=[alignment]",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 60
    while len(_calls(stub_env)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert len(_calls(stub_env)) == 2, proc.communicate(timeout=30)[0]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    assert "interrupted" in out
    for c in _calls(stub_env):  # the trainings were stopped with the runner
        with pytest.raises(ProcessLookupError):
            os.kill(c["pid"], 0)
    cfg = load_study_config(path, overrides={"grid.groups": ["alignment"]}, train_overrides={"stub_sleep": 60})
    statuses = run_study(cfg, dry_run=True, log=lambda s: None).statuses
    assert statuses == {"p0.00_seed0": "partial", "p1.00_seed0": "partial"}  # not failed, not done: resumed later


# ------------------------------------------------------------------------------------------------ MLflow
def test_unreachable_mlflow_server_does_not_stop_the_study(tmp_path):
    cfg = load_study_config(STUDY_YAML, study_dir=str(tmp_path / "s"), tracking_uri="http://127.0.0.1:9")
    lines = []
    assert study.ensure_parent_run(cfg, log=lines.append) is None
    assert "unreachable" in lines[0]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_real_mini_study_end_to_end(tmp_path, monkeypatch, tiny_datalist):
    """2 settings x 1 seed of the real training (tiny data and network, 1 epoch), 2 workers, then the report."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_study_config(
        STUDY_YAML,
        profile="smoke",
        study_dir=str(tmp_path / "study"),
        overrides={"grid.groups": ["alignment"]},
        train_overrides={"datalist_file": tiny_datalist, "eval_splits": ["test_ood"]},
    )
    lines = []
    res = run_study(cfg, workers=2, log=lines.append)
    assert res.ok, "\n".join(lines)
    assert sorted(res.finished_now) == ["p0.00_seed0", "p1.00_seed0"]
    for rid in res.finished_now:
        rdir = os.path.join(cfg.study_dir, "runs", rid)
        assert os.path.isfile(os.path.join(rdir, "DONE")) and os.path.isfile(os.path.join(rdir, "model.pt"))
        summ = json.load(open(os.path.join(rdir, "eval", "report", "summary.json")))
        assert set(summ) == {"test_ood"}  # eval_splits reached the training

    rep = os.path.join(cfg.study_dir, "report")
    for name in (
        "results.md",
        "results.csv",
        "aggregated.csv",
        "table2.csv",
        "positive_control.csv",
        "fig3_gap_vs_performance.png",
        "fig6_radar.png",
        "attention_gallery_test_ood.png",
    ):
        assert os.path.getsize(os.path.join(rep, name)) > 200, name
    md = open(os.path.join(rep, "results.md")).read()
    assert "| p = 0 |" in md and "| p = 1 |" in md and "comparisons" in md

    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    parent = json.load(open(os.path.join(cfg.study_dir, "mlflow_parent.json")))["run_id"]
    exp = client.get_experiment_by_name(cfg.experiment_name)
    parent_filter = f"tags.mlflow.parentRunId = '{parent}'"  # noqa: B907 (MLflow wants single quotes)
    children = client.search_runs([exp.experiment_id], filter_string=parent_filter)
    assert sorted(r.info.run_name for r in children) == ["p0.00_seed0", "p1.00_seed0"]
    for r in children:
        assert r.info.status == "FINISHED"
        assert r.data.tags["alignment_fraction"] == r.data.params["alignment_fraction"]
        assert r.data.tags["study"] == "smoke" and "test_ood_mean_auc" in r.data.metrics
    p = client.get_run(parent)
    assert p.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(parent, "report")}
    assert "report/results.md" in arts and "report/fig3_gap_vs_performance.png" in arts

    params = client.get_run(parent).data.params  # the study config on the parent run (keys made MLflow-safe)
    assert params["train_overrides.network_def_vit_layers"] == "2" and params["n_runs"] == "2"
    assert "study_config.json" in {a.path for a in client.list_artifacts(parent)}

    # rerun: everything is finished, nothing trains again; the parent run is reused (and reopened)
    res2 = run_study(cfg, workers=2, report=False, log=lines.append)
    assert res2.ok and not res2.finished_now and len(res2.done) == 2 and res2.parent_run_id == parent
    client.delete_run(parent)  # gone from the store: the next invocation makes and records a new parent
    new = study.ensure_parent_run(cfg, log=lines.append)
    assert new and new != parent
    assert json.load(open(os.path.join(cfg.study_dir, "mlflow_parent.json")))["run_id"] == new
