"""``class_schedule``: "batched" (all class prompts in one pass, one optimizer step per batch; the default) or
"sequential" (the paper: per batch, each class in turn with only its prompt, its own loss and optimizer step)."""

import os

import pytest
import torch
from ignite.engine import Events

from bundle.engines import AlignmentTrainer
from bundle.losses import AlignerLoss
from bundle.networks import build_aligner_vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32  # 2 x 2 attention maps
# a network small enough that a step takes milliseconds
SMALL = dict(image_size=SIZE, vit_layers=1, vit_hidden=32, vit_heads=2, vit_mlp=64, fusion_dim=32, fusion_ffn=64)


def _batches(n_classes, n_batches=3, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        label = torch.randint(0, 2, (batch, n_classes), generator=g).float()
        label[0, -1] = -1.0  # an unknown label: no L_CE
        mask = torch.zeros(batch, n_classes, SIZE, SIZE)
        mask[..., 4:20, 8:24] = 1.0
        out.append(
            {
                "image": torch.rand(batch, 1, SIZE, SIZE, generator=g),
                "label": label,
                "attn_mask": mask,
                "attn_available": torch.ones(batch, n_classes),
                "align": (label == 1).float(),
                "index": torch.arange(i * batch, (i + 1) * batch),
            }
        )
    return out


def _train(schedule, classes, batches, **net_kw):
    torch.manual_seed(0)
    net = build_aligner_vlm("demo", classes=classes, **{**SMALL, **net_kw})
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    steps = []
    opt.register_step_post_hook(lambda *a: steps.append(1))
    trainer = AlignmentTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=batches,
        network=net,
        optimizer=opt,
        loss_function=AlignerLoss(lambda_al=1.0),
        grad_clip=1.0,
        class_schedule=schedule,
    )
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    torch.manual_seed(1)  # the same dropout draws for both schedules
    trainer.run()
    return net, steps, outputs


@pytest.mark.parametrize("aligner", ["max_norm", "sigmoid"])
def test_sequential_with_one_class_is_batched(aligner):
    batches = _batches(1)
    net_b, steps_b, out_b = _train("batched", ["edema"], batches, aligner=aligner)
    net_s, steps_s, out_s = _train("sequential", ["edema"], batches, aligner=aligner)
    assert len(steps_b) == len(steps_s) == 3
    sb, ss = net_b.state_dict(), net_s.state_dict()
    for k in sb:
        torch.testing.assert_close(ss[k], sb[k], atol=1e-6, rtol=1e-5, msg=k)
    for a, b in zip(out_b, out_s, strict=True):
        for k in ("loss_ce", "loss_al", "n_aligned"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
        torch.testing.assert_close(a["loss"], b["loss"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a["attn_refined"], b["attn_refined"], atol=1e-6, rtol=1e-5)


def test_sequential_steps_once_per_class_per_batch():
    batches = _batches(2)
    net_b, steps_b, out_b = _train("batched", ["a", "b"], batches, aligner="projector", classifier="per_class")
    net, steps_s, out_s = _train("sequential", ["a", "b"], batches, aligner="projector", classifier="per_class")
    assert len(steps_b) == 3 and len(steps_s) == 6  # 3 batches x 2 classes
    first = out_s[0]
    assert first["pred"].shape == (4, 2) and first["attn"].shape == first["attn_refined"].shape == (4, 2, 2, 2)
    assert first["n_aligned"] == out_b[0]["n_aligned"] == float((batches[0]["label"] == 1).sum())
    assert all(torch.isfinite(o["loss"]) for o in out_s) and out_s[0]["loss"] != out_b[0]["loss"]
    # the weights moved differently: two smaller steps per batch are not one summed step
    assert not torch.equal(net.state_dict()["classifier.weight"], net_b.state_dict()["classifier.weight"])


def test_a_class_subset_forward_queries_only_that_prompt(monkeypatch):
    torch.manual_seed(0)
    net = build_aligner_vlm("demo", classes=["a", "b", "c"], **SMALL).eval()
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        full, one = net(x), net(x, classes=[1])
        prompts = net.prompt_embeddings().clone()
        altered = prompts.clone()
        altered[[0, 2]] = torch.randn(2, prompts.shape[1])  # change the other classes' prompts
        monkeypatch.setattr(net, "prompt_embeddings", lambda: altered)
        one_again, full_again = net(x, classes=[1]), net(x)
    assert one["logits"].shape == (2, 1) and one["attn"].shape == (2, 1, 2, 2)
    torch.testing.assert_close(one_again["logits"], one["logits"])  # alone: the other prompts do not matter
    torch.testing.assert_close(one_again["attn"], one["attn"])
    assert not torch.allclose(full_again["logits"][:, 1], full["logits"][:, 1])  # batched: they do (self-attention)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="class_schedule='classwise'"):
        _train("classwise", ["a"], _batches(1, n_batches=1))


def test_the_study_passes_the_schedule_to_every_run(tmp_path):
    from bundle.study import load_study_config
    from bundle.study.grid import train_command

    study_yaml = os.path.join(ROOT, "configs", "study.yaml")
    cfg = load_study_config(
        study_yaml, profile="quick", study_dir=str(tmp_path / "q"), train_overrides={"class_schedule": "sequential"}
    )
    for spec in cfg.runs[:3]:
        cmd = train_command(cfg, spec)
        assert cmd[cmd.index("--class_schedule") + 1] == "sequential"


@pytest.mark.slow
def test_sequential_schedule_trains_the_tiny_benchmark(tmp_path, tiny_datalist, tiny_train_args, run_cmd, python):
    out = tmp_path / "eval"
    run_cmd(
        [
            python, "-m", "monai.bundle", "run", "training", "--config_file", os.path.join(ROOT, "configs", "train.yaml"),
            "--datalist_file", tiny_datalist, "--max_epochs", "1", "--output_dir", str(out),
            "--best_model_path", str(tmp_path / "model.pt"), "--final_evaluation", "false",
            "--mlflow_log_model", "false", "--class_schedule", "sequential", *tiny_train_args,
        ]  # fmt: skip
    )
    assert (tmp_path / "model.pt").exists() and (tmp_path / "model.json").exists()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and runs[0].data.params["class_schedule"] == "sequential"
    assert "train_loss_ce" in runs[0].data.metrics or any("loss_ce" in k for k in runs[0].data.metrics)
