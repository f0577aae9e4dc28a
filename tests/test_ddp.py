"""DDP (configs/multi_gpu_train.yaml) trains the same model as one process: 2 gloo processes with batch B each vs
1 process with batch 2B on the same data order give the same validation metrics (docs/ddp.md states the tolerance).

What makes the two comparable: the same permutation of the training set (the 1-process run uses the same seeded
DistributedSampler with one replica, so set_epoch gives both the same permutation each epoch; rank r takes every
2nd index of it, so each step's global batch is the same set of images), a loss that is a mean over the samples
(alignment fraction 0: L_AL, a mean over each rank's aligned pairs, is not), and nothing random per rank (no
augmentation, no dropout). Then DDP's averaged gradient equals the 2B-batch gradient up to float summation order.
"""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
TRAIN = os.path.join(CONFIGS, "train.yaml")

# the tolerance docs/ddp.md states: validation metrics within 1e-6 absolute, weights within 1e-4
METRIC_ATOL, WEIGHT_ATOL = 1e-6, 1e-4

ONE_REPLICA = """
train#sampler:
  _target_: DistributedSampler
  dataset: "@train#dataset"
  num_replicas: 1
  rank: 0
  even_divisible: true
  shuffle: true
  seed: "@seed"
train#dataloader#sampler: "@train#sampler"
train#dataloader#shuffle: false
"""


def _val_metrics(out) -> dict[str, list[float]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'eval' / 'mlruns.db'}")
    exp = client.get_experiment_by_name("cxr_aligner_fairness")
    (run,) = client.search_runs([exp.experiment_id])  # one run: under DDP only rank 0 logs
    keys = sorted(k for k in run.data.metrics if k.startswith("val_"))
    return {
        k: [m.value for m in sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)] for k in keys
    }


def test_multi_gpu_config_seeds_the_sampler_from_the_run_seed():
    """The DDP sampler's permutation follows the run's seed (MONAI's trainer calls set_epoch every epoch)."""
    from monai.bundle import ConfigParser
    from monai.data import DistributedSampler

    parser = ConfigParser()
    parser.read_config([TRAIN, os.path.join(CONFIGS, "multi_gpu_train.yaml")])
    assert parser["train#sampler#seed"] == "@seed" and parser["train#dataloader#sampler"] == "@train#sampler"
    s = [DistributedSampler(list(range(20)), num_replicas=2, rank=0, shuffle=True, seed=k) for k in (0, 0, 3)]
    assert list(s[0]) == list(s[1]) != list(s[2])
    s[1].set_epoch(1)
    assert list(s[0]) != list(s[1])  # a new permutation per epoch


@pytest.mark.slow  # two trainings (1 process, then 2 gloo processes), about a minute on 2 cores
def test_two_processes_match_one_process_with_double_batch(tiny_datalist, run_cmd, tmp_path):
    (tmp_path / "one_replica.yaml").write_text(ONE_REPLICA)
    common = [
        "-m", "monai.bundle", "run", "training", "--datalist_file", tiny_datalist, "--image_size", "64",
        "--network_def#vit_layers", "2", "--max_epochs", "2", "--final_evaluation", "false",
        "--mlflow_log_model", "false", "--alignment_fraction", "0", "--network_def#dropout", "0.0",
        "--transforms#random", "[]", "--seed", "3",
    ]  # fmt: skip
    runs = {
        "one": [
            sys.executable, *common, "--config_file", f"[{TRAIN!r},{str(tmp_path / 'one_replica.yaml')!r}]",
            "--batch_size", "16",
        ],
        "two": [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
            *common, "--config_file", f"[{TRAIN!r},{os.path.join(CONFIGS, 'multi_gpu_train.yaml')!r}]",
            "--batch_size", "8",
        ],
    }  # fmt: skip
    for name, cmd in runs.items():
        out = tmp_path / name
        run_cmd([*cmd, "--output_dir", str(out / "eval"), "--best_model_path", str(out / "model.pt")],
                env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    one, two = _val_metrics(tmp_path / "one"), _val_metrics(tmp_path / "two")
    assert set(one) == set(two) and "val_mean_auc" in one and len(one["val_mean_auc"]) == 2  # every epoch
    for k in one:
        assert one[k] == pytest.approx(two[k], abs=METRIC_ATOL, nan_ok=True), k
    w1 = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert set(w1) == set(w2)  # rank 0 saved the unwrapped module
    diff = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    assert diff < WEIGHT_ATOL, diff
