"""The MLflow spool, key sanitising, run ownership and resume (docs/mlflow.md), against one SQLite store per module;
a real server going away is tests/test_mlflow_outage.py."""

import json
import logging
import os

import pytest
import torch
from ignite.engine import Engine, Events

from bundle.handlers import SafeMLFlowHandler
from bundle.utils.mlflow import KeySanitizer, apply_client_defaults, sanitize_key
from bundle.utils.mlflow_spool import Spool, replay

FAST = {"send_interval": 0.05, "retry_interval": 0.2}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating MLflow's tables takes seconds)."""
    import mlflow

    d = tmp_path_factory.mktemp("mlflow_store")
    uri = f"sqlite:///{d}/mlruns.db"
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield uri, mlflow.MlflowClient(tracking_uri=uri)
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def _engine(epoch_metrics=None, iterations=3):
    eng = Engine(lambda e, b: {"loss": torch.tensor(float(e.state.iteration))})

    @eng.on(Events.EPOCH_COMPLETED)
    def metrics(e):
        e.state.metrics.update(epoch_metrics or {"val_auc": 0.5 + 0.1 * e.state.epoch})

    eng.data = list(range(iterations))
    return eng


def _steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# ------------------------------------------------------------------------------------------------ names
def test_sanitize_key_gives_names_mlflow_accepts():
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name

    assert sanitize_key("val_auc_nodule(mass)") == "val_auc_nodule_mass_"
    assert sanitize_key("val_fair_macro/sex/gap_auc") == "val_fair_macro/sex/gap_auc"  # valid names unchanged
    for name in ["a(b),c", "/lead", "trail/", "a//b", "a/./b", "../up", "..", ".", "", "é#x", "x" * 300]:
        key = sanitize_key(name)
        _validate_metric_name(key)  # raises on a name MLflow refuses
        _validate_param_name(key)
        assert len(key) <= 250


def test_key_sanitizer_never_merges_two_names(caplog):
    keys = KeySanitizer()
    a, b, c = keys("auc_nodule(mass)"), keys("auc_nodule_mass_"), keys("auc_effusion, left")
    assert a == "auc_nodule_mass_" and b.startswith("auc_nodule_mass__") and a != b
    assert c == "auc_effusion_ left"
    assert keys("auc_nodule_mass_") == b  # stable within a run
    assert "both sanitise" in caplog.text


def test_client_defaults_only_where_unset(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    applied = apply_client_defaults()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77" and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in applied
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 2  # what MLflow's client reads at each request


# ------------------------------------------------------------------------------------------------ the spool file
def test_spool_log_survives_a_torn_write(tmp_path, caplog):
    sp = Spool.open(str(tmp_path), "run1", {"tracking_uri": "sqlite:///x.db"})
    sp.append([{"op": "metric", "key": "a", "value": 1.0, "step": 1, "ts": 5}])
    with open(sp.path(Spool.RECORDS), "ab") as f:  # a process killed in the middle of a write
        f.write(b'{"op":"metric","key":"a","val')
    sp2 = Spool(sp.folder)  # the next process appends on a fresh line
    sp2.append([{"op": "metric", "key": "a", "value": float("nan"), "step": 2, "ts": 6}, {"op": "param", "key": "p"}])
    recs = [r for _, _, r in sp2.read()]
    assert [r.get("step") for r in recs] == [1, 2, None] and recs[1]["value"] != recs[1]["value"]  # NaN kept
    assert "torn write" in caplog.text
    with open(sp.path(Spool.RECORDS), "ab") as f:  # a line still being written is not a record yet
        f.write(b'{"op":"tag"')
    assert sp2.complete_end() < sp2.end() and len(sp2.read()) == 3
    assert json.load(open(sp.path(Spool.META)))["run_id"] == "run1"
    sp2.set_sent(10)
    assert Spool(sp.folder).sent_offset() == 10


# ------------------------------------------------------------------------------------------------ the handler
def test_every_metric_reaches_mlflow_and_the_spool_goes(store, tmp_path):
    uri, client = store
    names = {"val_auc_nodule(mass)": 0.1, "val_auc_nodule_mass_": 0.2, "val_auc_effusion, left": 0.3}
    (tmp_path / "model.pt").write_bytes(b"w")
    h = SafeMLFlowHandler(
        tracking_uri=uri, experiment_name="names", output_transform=lambda o: o["loss"], tag_name="train_loss",
        experiment_param={"net(arch)": "vit"}, run_tags={"setting, p": "0.5"}, artifacts=[str(tmp_path / "model.pt")],
        spool_dir=str(tmp_path / "spool"), **FAST,
    )  # fmt: skip
    eng = _engine(names)
    h.attach(eng)
    eng.run(eng.data, max_epochs=2)
    run_id, folder = h.run_id, h.spool_folder
    assert os.path.isdir(folder)
    h.close()
    assert not os.path.exists(folder) and not os.path.exists(tmp_path / "spool")  # all sent: nothing left behind
    run = client.get_run(run_id)
    val = {k for k in run.data.metrics if k.startswith("val_auc")}
    assert len(val) == 3 and "val_auc_nodule_mass_" in val and "val_auc_effusion_ left" in val
    assert _steps(client, run_id, "train_loss") == list(range(1, 7))
    assert run.data.params["net_arch_"] == "vit" and run.data.tags["setting_ p"] == "0.5"
    assert run.info.status == "FINISHED" and "model.pt" in {a.path for a in client.list_artifacts(run_id)}


def test_outage_keeps_everything_for_a_replay(store, tmp_path, monkeypatch, caplog):
    """The store fails mid-run (every call raises, as a dead server): training goes on, close() does not wait,
    the spool keeps metrics, params and a copy of the artifact (its original is gone); a replay sends it all into
    the same run, and a second replay adds nothing."""
    from mlflow.exceptions import MlflowException

    uri, client = store
    art = tmp_path / "report"
    art.mkdir()
    (art / "summary.json").write_text("{}")
    h = SafeMLFlowHandler(tracking_uri=uri, experiment_name="outage", output_transform=lambda o: o["loss"],
                          tag_name="train_loss", spool_dir=str(tmp_path / "spool"), **FAST)  # fmt: skip
    eng = _engine(iterations=4)
    h.attach(eng)
    saved = {n: getattr(h.client, n) for n in ("log_batch", "log_artifact", "log_artifacts", "set_terminated")}

    def down(*a, **k):
        raise MlflowException("API request failed: Connection refused")  # an outage, not a refusal

    @eng.on(Events.ITERATION_COMPLETED(once=2))
    def server_goes(e):
        h.flush()
        for n in saved:
            monkeypatch.setattr(h.client, n, down)

    eng.run(eng.data, max_epochs=2)
    h.log_metrics({"test_auc": 0.9})
    h.log_artifact(str(art), artifact_path="evaluation")
    run_id, folder = h.run_id, h.spool_folder
    h.close()
    assert "kept in" in caplog.text and "mlflow_replay.py" in caplog.text
    assert os.path.isdir(folder)
    assert _steps(client, run_id, "train_loss") == [1, 2]  # what went through before the outage
    (art / "summary.json").unlink()  # the original artifact is gone: the spool's copy is replayed
    for n, fn in saved.items():
        monkeypatch.setattr(h.client, n, fn)
    assert replay(str(tmp_path / "spool"), keep=True, log=print) == 0
    assert replay(str(tmp_path / "spool"), keep=True, from_start=True, log=print) == 0  # twice: no duplicates
    assert _steps(client, run_id, "train_loss") == list(range(1, 9))
    assert _steps(client, run_id, "val_auc") == [1, 2] and _steps(client, run_id, "test_auc") == [0]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["max_epochs"] == "2"
    assert [a.path for a in client.list_artifacts(run_id, "evaluation")] == ["evaluation/summary.json"]
    assert replay(str(tmp_path / "spool"), log=print) == 0 and not os.path.exists(folder)  # nothing new; removed


def test_each_training_owns_its_run(store, tmp_path):
    """Another process's RUNNING run of the experiment (same run name) is never joined."""
    uri, client = store
    exp = client.get_experiment_by_name("own") or client.get_experiment(client.create_experiment("own"))
    other = client.create_run(exp.experiment_id, run_name="train")  # RUNNING, as a concurrent training's
    runs = []
    for i in range(2):
        h = SafeMLFlowHandler(tracking_uri=uri, experiment_name="own", run_name="train",
                              spool_dir=str(tmp_path / f"s{i}"), **FAST)  # fmt: skip
        assert h.start_standalone()
        runs.append(h.run_id)
        h.close()
    assert len({other.info.run_id, *runs}) == 3


def test_resume_continues_the_run_and_skips_logged_steps(store, tmp_path, caplog):
    uri, client = store
    ckpt, record = tmp_path / "checkpoints", str(tmp_path / "mlflow_run.json")
    ckpt.mkdir()

    def handler(resume):
        return SafeMLFlowHandler(
            tracking_uri=uri, experiment_name="resume", output_transform=lambda o: o["loss"],
            spool_dir=str(tmp_path / "spool"), run_record=record, resume_run=resume, resume_ckpt_dir=str(ckpt), **FAST,
        )  # fmt: skip

    h1 = handler(True)  # nothing to resume from yet: a new run, recorded
    eng = _engine()
    h1.attach(eng)
    eng.run(eng.data, max_epochs=2)  # iterations 1..6, epochs 1..2
    first = h1.run_id
    h1.close()
    assert json.load(open(record))["run_id"] == first
    (ckpt / "checkpoint_epoch=1.pt").write_bytes(b"")  # the last checkpoint: epoch 1 (crashed during epoch 2)

    h2 = handler(True)
    eng2 = _engine()
    h2.attach(eng2)
    eng2.load_state_dict({"iteration": 3, "epoch_length": 3, "max_epochs": 3})  # what ResumeCheckpoint restores
    eng2.run(eng2.data, max_epochs=3)  # iterations 4..9, epochs 2..3
    assert h2.resumed and h2.run_id == first
    h2.close()
    assert _steps(client, first, "Loss") == list(range(1, 10))  # 4..6 were logged once, by the first process
    assert _steps(client, first, "val_auc") == [1, 2, 3]
    run = client.get_run(first)
    assert run.data.params["max_epochs"] == "2" and run.data.tags["changed.max_epochs"] == "3"
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1

    h3 = handler(False)  # resume off (or no checkpoint): a new run
    assert h3.start_standalone() and h3.run_id != first
    h3.close()
    assert json.load(open(record))["run_id"] != first


def test_replay_says_what_is_wrong(store, tmp_path):
    uri, _ = store
    lines = []
    assert replay(str(tmp_path / "none"), log=lines.append) == 2 and "no MLflow spool" in lines[-1]
    sp = Spool.open(str(tmp_path / "spool"), "0123", {"tracking_uri": uri})
    sp.append([{"op": "metric", "key": "a", "value": 1.0, "step": 1, "ts": 1}])
    assert replay(str(tmp_path / "spool"), log=lines.append) == 1
    assert "run 0123 (field 'run_id') is not in" in lines[-1] and "--tracking_uri" in lines[-1]
    os.remove(sp.path(Spool.META))
    Spool.open(str(tmp_path / "spool"), "0123", {})
    assert replay(str(tmp_path / "spool"), log=lines.append) == 1 and "field 'tracking_uri'" in lines[-1]
    assert os.path.isfile(sp.path(Spool.RECORDS))  # nothing is deleted when nothing was sent


def test_a_broken_spool_disables_logging_not_training(store, tmp_path, monkeypatch, caplog):
    uri, _ = store
    h = SafeMLFlowHandler(tracking_uri=uri, experiment_name="broken", output_transform=lambda o: o["loss"],
                          spool_dir=str(tmp_path / "spool"), **FAST)  # fmt: skip
    eng = _engine()
    h.attach(eng)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    @eng.on(Events.ITERATION_COMPLETED(once=1))
    def disk_full(e):
        monkeypatch.setattr(Spool, "append", full)

    with caplog.at_level(logging.WARNING):
        state = eng.run(eng.data, max_epochs=2)
    assert state.epoch == 2 and h.disabled and "disabled for the rest of this run" in caplog.text
    h.close()
