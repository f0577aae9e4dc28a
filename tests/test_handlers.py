"""Checkpoints (atomic, resumable), collection across samples, and MLflow that never kills training."""

import os

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from bundle.handlers import BestModelSaver, PredictionCollector, ResumeCheckpoint, SafeMLFlowHandler
from bundle.metrics import attention_mass_in_mask
from bundle.utils.atomic import torch_save_atomic


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    torch_save_atomic(str(path), {"a": torch.ones(2)})
    assert torch.load(path)["a"].sum() == 2

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        torch_save_atomic(str(path), {"a": torch.zeros(2)})
    monkeypatch.undo()
    assert torch.load(path)["a"].sum() == 2  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary file left behind


def test_collector_deduplicates_and_sorts_by_index():
    c = PredictionCollector()
    c.reset()
    c.update(
        {"pred": torch.tensor([[0.9], [0.1]]), "label": torch.tensor([[1.0], [0.0]]), "index": torch.tensor([3, 1])}
    )
    c.update(
        {"pred": torch.tensor([[0.9], [0.4]]), "label": torch.tensor([[1.0], [1.0]]), "index": torch.tensor([3, 0])}
    )
    out = c.compute()
    assert out["index"].tolist() == [0, 1, 3]
    assert np.allclose(out["pred"][:, 0], [0.4, 0.1, 0.9])


def test_attention_mass_in_mask_exact_on_patch_grid():
    attn = torch.zeros(1, 1, 4, 4)
    attn[0, 0, 0, 0], attn[0, 0, 3, 3] = 0.75, 0.25
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, :4, :4] = 1  # covers patch (0, 0) entirely
    assert attention_mass_in_mask(attn, mask).item() == pytest.approx(0.75)
    mask[0, 0, 12:14, 12:16] = 1  # half of patch (3, 3)
    assert attention_mass_in_mask(attn, mask).item() == pytest.approx(0.875)


def _toy_engine(net, opt, max_epochs):
    def step(engine, batch):
        opt.zero_grad()
        loss = (net(batch) ** 2).mean()
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    eng = Engine(step)
    return eng


def test_resume_continues_from_last_epoch(tmp_path):
    torch.manual_seed(0)
    data = [torch.randn(4, 3) for _ in range(3)]
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    eng = _toy_engine(net, opt, 2)
    ResumeCheckpoint(str(tmp_path), {"network": net, "optimizer": opt, "trainer": eng}).attach(eng)
    eng.run(data, max_epochs=2)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_epoch=2.pt"]  # only the last one is kept

    # a new process: fresh objects, same folder -> continues at epoch 2 with the saved weights
    net2 = torch.nn.Linear(3, 1)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1)
    eng2 = _toy_engine(net2, opt2, 4)
    seen = []
    eng2.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(e.state.epoch))
    ResumeCheckpoint(str(tmp_path), {"network": net2, "optimizer": opt2, "trainer": eng2}).attach(eng2)
    loaded = {}
    eng2.add_event_handler(
        Events.STARTED, lambda e: loaded.update({k: v.clone() for k, v in net2.state_dict().items()})
    )
    eng2.run(data, max_epochs=4)
    assert seen == [3, 4]
    for k in saved:
        assert torch.equal(saved[k], loaded[k])


def test_best_model_saver_only_on_improvement(tmp_path):
    net = torch.nn.Linear(2, 1)
    path = str(tmp_path / "model.pt")
    saver = BestModelSaver(path, net, metric_name="auc")
    eng = Engine(lambda e, b: None)
    scores = iter([0.6, 0.8, 0.7])

    @eng.on(Events.EPOCH_COMPLETED)
    def set_metric(e):
        e.state.metrics["auc"] = next(scores)
        with torch.no_grad():
            net.weight.fill_(e.state.epoch)

    saver.attach(eng)
    eng.run([0], max_epochs=3)
    assert saver.best == 0.8 and saver.best_epoch == 2
    assert torch.load(path)["weight"].flatten()[0].item() == 2  # the epoch-2 weights, not epoch 3
    restored = BestModelSaver(path, net)
    restored.load_state_dict(saver.state_dict())
    assert restored.best == 0.8


def test_mlflow_down_falls_back_to_local_store_and_training_finishes(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fallback = f"sqlite:///{tmp_path}/mlruns.db"
    h = SafeMLFlowHandler(
        tracking_uri="http://127.0.0.1:9",
        fallback_uri=fallback,
        experiment_name="t",
        output_transform=lambda o: o["loss"],
        probe_timeout=0.5,
        close_on_complete=True,
    )
    eng = Engine(lambda e, b: {"loss": torch.tensor(1.0)})

    @eng.on(Events.EPOCH_COMPLETED)
    def metric(e):
        e.state.metrics["val_auc"] = 0.5 + 0.1 * e.state.epoch

    h.attach(eng)
    eng.run([0, 1], max_epochs=2)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=fallback)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert len(runs) == 1
    assert [m.value for m in client.get_metric_history(runs[0].info.run_id, "val_auc")] == pytest.approx([0.6, 0.7])


def test_mlflow_failure_mid_run_disables_logging_not_training(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    h = SafeMLFlowHandler(
        tracking_uri=f"sqlite:///{tmp_path}/db.db", experiment_name="t", output_transform=lambda o: o["loss"]
    )
    eng = Engine(lambda e, b: {"loss": torch.tensor(1.0)})
    h.attach(eng)

    def broken(*a, **k):  # a bug in logging itself (a server going away is tests/test_mlflow_outage.py)
        raise RuntimeError("unexpected")

    monkeypatch.setattr(h, "_log_metrics", broken)
    state = eng.run([0, 1, 2], max_epochs=2)
    assert state.epoch == 2 and h.disabled


def test_mlflow_log_metrics_outside_an_engine(tmp_path, monkeypatch):
    """What an evaluation job uses: a standalone run, public log_metrics / log_artifact, no-ops when disabled."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/db.db"
    h = SafeMLFlowHandler(tracking_uri=uri, experiment_name="eval")
    h.log_metrics({"test_mean_auc": 0.5})  # before start: nothing to log into, no error
    assert h.start_standalone({"n_boot": 10}) and not h.disabled
    h.log_metrics({"test_mean_auc": 0.75, "test_a/auc": 0.5})
    (tmp_path / "summary.json").write_text("{}")
    h.log_artifact(str(tmp_path / "summary.json"), artifact_path="evaluation")
    run_id = h.run_id
    h.close()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.metrics == {"test_mean_auc": 0.75, "test_a/auc": 0.5}
    assert run.data.params["n_boot"] == "10"

    off = SafeMLFlowHandler(tracking_uri="http://127.0.0.1:9", experiment_name="t", probe_timeout=0.2)
    assert off.disabled and not off.start_standalone()
    off.log_metrics({"x": 1.0})  # disabled: a no-op
