"""The study on Ray (``--executor ray``): one Ray task per run, the same subprocess and study folder as the local
executor, Ray's retries for a failed training, resume, and the same results as the local executor.

The Ray tests share one local Ray instance with 2 CPUs (started once for this module, about 30 s on 2 busy cores).
"""

import csv
import json
import os
import sys
import textwrap

import pytest
import yaml

from bundle.study import load_study_config, run_study
from bundle.study.cli import run_study_main
from bundle.study.config import RayOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_YAML = os.path.join(ROOT, "configs", "study.yaml")

# A stand-in for the training job (no environment variables: Ray workers keep the environment of the moment Ray
# started): records each call in <calls>, fails for the run names listed in the file <fail_always>, fails the first
# attempt of those in <fail_once>, else writes the summary.json a real run writes.
STUB = textwrap.dedent("""
    import json, os, sys
    a = {k[2:]: v for k, v in zip(sys.argv[1::2], sys.argv[2::2])}
    out, name = a["output_dir"], a["run_name"]
    ckpt = os.path.join(out, "checkpoints")
    with open(a["stub_calls"], "a") as f:
        f.write(json.dumps({"run_name": name, "resumed": os.path.isdir(ckpt), "omp": os.environ.get("OMP_NUM_THREADS"),
                            "uri": os.environ.get("MLFLOW_TRACKING_URI")}) + "\\n")
    os.makedirs(ckpt, exist_ok=True)
    if name in open(a["stub_fail_always"]).read().split():
        sys.exit("stub: planned failure")
    once = os.path.join(out, "failed_once")
    if name in a["stub_fail_once"].split(",") and not os.path.exists(once):
        open(once, "w").close()
        sys.exit("stub: planned first-attempt failure")
    p = float(a["alignment_fraction"])
    summ = {s: {"n": 10, f"{s}_mean_auc": 0.6 + 0.2 * p, f"{s}_macro/sex/gap_auc": 0.3 - 0.2 * p,
                f"{s}_a/sex/gap_auc": 0.3 - 0.2 * p} for s in ("test", "test_ood")}
    os.makedirs(os.path.join(out, "report"), exist_ok=True)
    json.dump(summ, open(os.path.join(out, "report", "summary.json"), "w"))
""")


def _stub_yaml(tmp_path, fail_always=(), fail_once=(), **extra) -> str:
    (tmp_path / "stub.py").write_text(STUB)
    (tmp_path / "datalist.json").write_text("{}")
    (tmp_path / "fail.txt").write_text("\n".join(fail_always))
    cfg = {
        "name": "raystub",
        "output_root": str(tmp_path / "results"),
        "seeds": [0, 1],
        "train_command": [sys.executable, str(tmp_path / "stub.py")],
        "grid": {"groups": ["alignment"], "alignment_fractions": [0.0, 1.0]},
        "train_overrides": {
            "datalist_file": str(tmp_path / "datalist.json"),
            "stub_calls": str(tmp_path / "calls.jsonl"),
            "stub_fail_always": str(tmp_path / "fail.txt"),
            "stub_fail_once": ",".join(fail_once) or "-",
        },
        "tracking_uri": "http://127.0.0.1:9",  # nothing listens: the study runs without MLflow
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _calls(tmp_path) -> list[dict]:
    f = tmp_path / "calls.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


# ------------------------------------------------------------------------------------------------ without Ray
def test_missing_ray_is_one_line_naming_the_pin(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    rc = run_study_main(["--config", _stub_yaml(tmp_path), "--executor", "ray"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "pip install ray==2.60.0" in err, err
    assert not _calls(tmp_path)  # nothing ran
    rc = run_study_main(["--config", _stub_yaml(tmp_path), "--executor", "ray", "--dry-run"])
    assert rc == 0  # a dry run needs no Ray


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--executor", "ray", "--shard", "1/2"], "drop --shard"),
        (["--executor", "ray", "--gpus", "0,1"], "--gpus-per-run"),
        (["--address", "auto"], "only apply to --executor ray"),
        (["--executor", "ray", "--max-retries", "-1"], "ray.max_retries"),
        (["--set", "ray.nope=1"], "ray.['nope']"),
        (["--set", "executor=slurm"], "executor 'slurm'"),
    ],
)
def test_executor_options_are_checked(tmp_path, capsys, args, needle):
    assert run_study_main(["--config", _stub_yaml(tmp_path), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not _calls(tmp_path)


def test_executor_keys_of_the_yaml(tmp_path):
    cfg = load_study_config(STUDY_YAML, profile="smoke")
    assert cfg.executor == "local" and cfg.ray == RayOptions()  # the embedded default
    cfg = load_study_config(
        _stub_yaml(tmp_path, executor="ray", ray={"address": "auto", "gpus_per_run": 0.5, "max_retries": 0})
    )
    assert cfg.executor == "ray" and cfg.ray.address == "auto" and cfg.ray.gpus_per_run == 0.5
    assert cfg.ray.max_retries == 0 and cfg.ray.cpus_per_run == 1
    assert cfg.to_dict()["ray"]["gpus_per_run"] == 0.5  # recorded in study_config.json


# ------------------------------------------------------------------------------------------------ on Ray
@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs for this module (run_study uses a connected Ray as it is)."""
    pytest.importorskip("ray", reason="requirements-dev.txt installs ray")
    import ray

    from bundle.study.executors import init_ray

    init_ray("local", num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.mark.slow  # starts the module's Ray instance (about 20 s) and 8 stub subprocesses
def test_stub_study_on_ray_retries_and_resumes(tmp_path, local_ray):
    path = _stub_yaml(tmp_path, fail_always=["p1.00_seed1"], fail_once=["p0.00_seed1"])
    cfg = load_study_config(path)
    lines = []
    res = run_study(cfg, executor="ray", ray=RayOptions(max_retries=1), report=False, log=lines.append)
    # p0.00_seed1 failed once and was retried by Ray (resuming its folder); p1.00_seed1 failed twice (1 + 1 retry)
    assert sorted(res.finished_now) == ["p0.00_seed0", "p0.00_seed1", "p1.00_seed0"], lines
    assert res.failed == ["p1.00_seed1"] and not res.ok
    calls = _calls(tmp_path)
    by = {n: [c for c in calls if c["run_name"] == n] for n in {c["run_name"] for c in calls}}
    assert len(by["p0.00_seed1"]) == 2 and by["p0.00_seed1"][1]["resumed"]
    assert len(by["p1.00_seed1"]) == 2 and len(by["p0.00_seed0"]) == 1
    assert {c["omp"] for c in calls} == {"1"} and {c["uri"] for c in calls} == {"http://127.0.0.1:9"}
    assert any("FAILED p1.00_seed1" in x and "planned failure" in x for x in lines)  # the log tail reaches the driver
    rdir = os.path.join(cfg.study_dir, "runs")
    assert os.path.isfile(os.path.join(rdir, "p1.00_seed1", "FAILED"))
    assert json.load(open(os.path.join(rdir, "p0.00_seed1", "DONE")))["fingerprint"]
    assert not os.path.exists(os.path.join(rdir, "p0.00_seed1", "FAILED"))  # the retry cleared it

    # rerun once the failure is fixed: finished runs are skipped, the failed one resumes its folder
    (tmp_path / "fail.txt").write_text("")
    res2 = run_study(cfg, executor="ray", ray=RayOptions(max_retries=0), report=False, log=lines.append)
    assert res2.ok and res2.finished_now == ["p1.00_seed1"] and len(res2.done) == 4
    new = _calls(tmp_path)[len(calls) :]
    assert [c["run_name"] for c in new] == ["p1.00_seed1"] and new[0]["resumed"]


def _results(study_dir, run_id) -> dict:
    with open(os.path.join(study_dir, "report", "results.csv"), newline="") as f:
        return {(r["split"], r["metric"]): r["value"] for r in csv.DictReader(f) if r["run_id"] == run_id}


@pytest.mark.slow  # 2 real runs on Ray (in parallel) + 1 local run, 1 epoch each: about a minute on 2 cores
def test_smoke_profile_on_ray_gives_the_local_executors_results(tmp_path, monkeypatch, tiny_datalist, local_ray):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    kw = {
        "profile": "smoke",
        "overrides": {"grid.groups": ["alignment"]},  # p = 0 and p = 1, seed 0, 1 epoch
        # the same overrides for both executors; no MLflow model logging (seconds per run, not what is compared)
        "train_overrides": {"datalist_file": tiny_datalist, "eval_splits": ["test_ood"], "mlflow_log_model": False},
    }
    cfg = load_study_config(STUDY_YAML, study_dir=str(tmp_path / "ray"), **kw)
    lines = []
    res = run_study(cfg, executor="ray", log=lines.append)  # 1 CPU per run: both at once on the 2-CPU instance
    assert res.ok and sorted(res.finished_now) == ["p0.00_seed0", "p1.00_seed0"], "\n".join(lines)
    assert res.report_dir and os.path.isfile(os.path.join(res.report_dir, "results.md"))

    client = MlflowClient(tracking_uri=cfg.tracking_uri)  # the shared record: children nested under the parent
    parent = json.load(open(os.path.join(cfg.study_dir, "mlflow_parent.json")))["run_id"]
    exp = client.get_experiment_by_name(cfg.experiment_name)
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")  # noqa
    assert sorted(r.info.run_name for r in children) == ["p0.00_seed0", "p1.00_seed0"]
    assert client.get_run(parent).info.status == "FINISHED"

    # the local executor, same configuration, one of the runs, 1 thread: the same numbers in results.csv
    local = load_study_config(STUDY_YAML, study_dir=str(tmp_path / "local"), **kw)
    res_l = run_study(local, executor="local", only=["p1.00_seed0"], threads=1, log=lines.append)
    assert res_l.ok, "\n".join(lines)
    on_ray, here = _results(cfg.study_dir, "p1.00_seed0"), _results(local.study_dir, "p1.00_seed0")
    assert len(here) > 20 and ("test_ood", "mean_auc") in here
    assert on_ray == here
    done = json.load(open(os.path.join(cfg.study_dir, "runs", "p1.00_seed0", "DONE")))
    assert (
        done["fingerprint"]
        == json.load(open(os.path.join(local.study_dir, "runs", "p1.00_seed0", "DONE")))["fingerprint"]
    )  # the same run: configuration, command and data
