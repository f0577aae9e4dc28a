"""The bundle as users run it: `python -m monai.bundle run ...` on a tiny synthetic benchmark."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.yaml")
TINY_SYNTH = {"n_train": 64, "n_val": 32, "n_test": 32, "n_ood": 32, "size_a": [64, 64], "size_b": [80, 72]}
# a small network and image so that two epochs take seconds on a CPU
TINY = ["--image_size", "64", "--batch_size", "16", "--network_def#vit_layers", "2", "--eval_n_boot", "20"]


@pytest.fixture(scope="session")
def tiny_datalist(tmp_path_factory):
    from bundle.data.synthetic import ensure_synthetic

    return ensure_synthetic(str(tmp_path_factory.mktemp("synthetic")), seed=5, progress=False, **TINY_SYNTH)


def _run(args, cwd=ROOT, env=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT, "MLFLOW_TRACKING_URI": "", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI") if not env["MLFLOW_TRACKING_URI"] else None
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"command failed ({p.returncode}): {' '.join(args)}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def _train_args(tiny_datalist, out, *extra):
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN,
            "--datalist_file", tiny_datalist, "--output_dir", str(out / "eval"),
            "--best_model_path", str(out / "model.pt"), *TINY, *extra]


def _mlflow_runs(out):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'eval' / 'mlruns.db'}")
    exp = client.get_experiment_by_name("cxr_aligner_fairness")
    return client, client.search_runs([exp.experiment_id])


@pytest.mark.parametrize("workflow_type,config", [("train", "train.yaml"), ("inference", "inference.yaml")])
def test_bundle_properties_complete(workflow_type, config, tiny_datalist):
    from monai.bundle import ConfigWorkflow

    data = {"datalist_file": tiny_datalist} if workflow_type == "train" else {"input_path": tiny_datalist}
    wf = ConfigWorkflow(config_file=os.path.join(ROOT, "configs", config),
                        meta_file=os.path.join(ROOT, "configs", "metadata.json"),
                        workflow_type=workflow_type, run_id="run" if workflow_type == "inference" else "training",
                        **data)
    wf.initialize()
    assert not wf.check_properties()


def test_train_two_epochs_checkpoint_mlflow_report_and_resume(tiny_datalist, tmp_path):
    _run(_train_args(tiny_datalist, tmp_path, "--max_epochs", "2", "--alignment_fraction", "0.5"))
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert any(k.startswith("image_encoder.") for k in state)  # a plain state_dict of AlignerVLM

    client, runs = _mlflow_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    for key in ("alignment_fraction", "random_alignment", "data_ratio", "seed", "lambda_al", "w_fp", "lr",
                "batch_size", "vit_hidden", "dataset", "dataset_digest"):
        assert key in params, key
    assert params["alignment_fraction"] == "0.5"
    assert len(client.get_metric_history(run.info.run_id, "val_mean_auc")) == 2  # one per epoch
    for key in ("train_loss_ce", "train_loss_al"):  # the loss components, logged separately per iteration
        assert len(client.get_metric_history(run.info.run_id, key)) >= 2
    for key in ("val_hit_rate", "val_fair_macro/sex/gap_auc", "test_ood_mean_auc", "test_ood_hit_rate"):
        assert key in run.data.metrics, key
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "evaluation", "command.json", "train.yaml"} <= arts  # checkpoint, reports, executed config

    report_dir = tmp_path / "eval" / "report" / "test_ood"
    for f in ("fairness_report.json", "fairness_report.csv", "predictions.csv", "plots/auc_by_sex.png",
              "plots/attention_overlays.png"):
        assert (report_dir / f).is_file(), f
    report = json.loads((report_dir / "fairness_report.json").read_text())
    assert report["thresholds"]["edema"]["method"] == "val_f1"

    # a crashed run resumes: the same command with more epochs continues at epoch 3
    p = _run(_train_args(tiny_datalist, tmp_path, "--max_epochs", "3", "--final_evaluation", "false"))
    assert "resumed from" in p.stdout + p.stderr
    log = p.stdout + p.stderr
    assert "AlignmentTrainer - INFO - Epoch[3] Complete" in log
    assert "AlignmentTrainer - INFO - Epoch[1] Complete" not in log and "evaluating test" not in log


def test_evaluate_and_inference_configs(tiny_datalist, tmp_path):
    _run(_train_args(tiny_datalist, tmp_path, "--max_epochs", "1", "--final_evaluation", "false"))
    _run([sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
          f"['{TRAIN}','{os.path.join(ROOT, 'configs', 'evaluate.yaml')}']", "--datalist_file", tiny_datalist,
          "--output_dir", str(tmp_path / "eval"), "--best_model_path", str(tmp_path / "model.pt"), *TINY,
          "--eval_splits", "['test_ood']"])
    assert (tmp_path / "eval" / "report" / "test_ood" / "fairness_report.json").is_file()
    client, runs = _mlflow_runs(tmp_path)
    ev = [r for r in runs if r.info.run_name == "evaluate"]
    assert ev and ev[0].info.status == "FINISHED" and "test_ood_mean_auc" in ev[0].data.metrics

    out = tmp_path / "inference"
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", os.path.join(ROOT, "configs", "inference.yaml"),
          "--input_path", tiny_datalist, "--input_split", "test_ood", "--ckpt_path", str(tmp_path / "model.pt"),
          "--output_dir", str(out), "--image_size", "64", "--network_def#vit_layers", "2"])
    rows = (out / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 32 and rows[0].startswith("index,image,prob_nodule_mass")
    assert len(list((out / "overlays").glob("*.png"))) == 32


def test_ddp_two_gloo_processes(tiny_datalist, tmp_path):
    """configs/multi_gpu_train.yaml with torchrun and 2 CPU processes: trains, validates, rank 0 writes."""
    cfg = f"['{TRAIN}','{os.path.join(ROOT, 'configs', 'multi_gpu_train.yaml')}']"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
          "-m", "monai.bundle", "run", "training", "--config_file", cfg, "--datalist_file", tiny_datalist,
          "--output_dir", str(tmp_path / "eval"), "--best_model_path", str(tmp_path / "model.pt"), *TINY,
          "--max_epochs", "1", "--final_evaluation", "false"], env={"OMP_NUM_THREADS": "1"})
    assert (tmp_path / "model.pt").is_file()
    client, runs = _mlflow_runs(tmp_path)
    assert len(runs) == 1  # only rank 0 logged
    assert len(client.get_metric_history(runs[0].info.run_id, "val_mean_auc")) == 1


def test_replica_datalist_trains_one_epoch(tmp_path):
    """A converted public-dataset replica (NIH layout, boxes in the 1024 frame, 16 px PNGs) trains as is."""
    from tests.replicas import write_nih

    write_nih(tmp_path / "nih")
    out = tmp_path / "nih.json"
    _run([sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), "nih", "--root", str(tmp_path / "nih"),
          "--out", str(out), "--check-images"])
    data = json.loads(out.read_text())
    assert any(a["type"] == "bbox_xywh" for r in data["training"] for a in r.get("attention", []))
    _run(_train_args(str(out), tmp_path, "--max_epochs", "1", "--batch_size", "2", "--final_evaluation", "False",
                     "--alignment_fraction", "1.0"))
    assert (tmp_path / "eval" / "checkpoints" / "checkpoint_epoch=1.pt").is_file()


def test_zoo_metadata_and_network_shape_checks():
    """The Model Zoo CI's checks: metadata against the 20240725 schema (offline copy) and verify_net_in_out."""
    schema = os.path.join(ROOT, "tests", "data", "meta_schema_20240725.json")
    meta = os.path.join(ROOT, "configs", "metadata.json")
    p = _run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", meta, "--filepath", schema])
    assert "metadata is verified with no error" in p.stdout + p.stderr
    p = _run([sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file", meta,
              "--config_file", os.path.join(ROOT, "configs", "inference.yaml")])
    assert "data shape of network is verified with no error" in p.stdout + p.stderr
