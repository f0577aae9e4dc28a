"""The bundle as users run it: the configs (parsed in-process) and `python -m monai.bundle run ...` on the tiny
synthetic benchmark (subprocesses, marked slow)."""

import glob
import json
import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
TRAIN = os.path.join(CONFIGS, "train.yaml")
META = os.path.join(CONFIGS, "metadata.json")
# the config merges users run (docs, README)
MERGES = {
    "train": [TRAIN],
    "evaluate": [TRAIN, os.path.join(CONFIGS, "evaluate.yaml")],
    "multi_gpu": [TRAIN, os.path.join(CONFIGS, "multi_gpu_train.yaml")],
    "paper": [TRAIN, os.path.join(CONFIGS, "paper.yaml")],
    "inference": [os.path.join(CONFIGS, "inference.yaml")],
    "paper_inference": [os.path.join(CONFIGS, "inference.yaml"), os.path.join(CONFIGS, "paper.yaml")],
}
# the params every training run logs to MLflow (MONAI's handler adds epoch_length)
MLFLOW_PARAMS = {
    "alignment_fraction", "random_alignment", "data_ratio", "seed", "lambda_al", "w_fp", "lr", "weight_decay",
    "batch_size", "max_epochs", "network_preset", "model", "n_parameters", "n_trainable", "image_size", "patch_size",
    "vit_hidden", "vit_layers", "vit_heads", "text_encoder", "text_hidden", "text_layers", "freeze_text",
    "fusion_layers", "fusion_dim", "aligner", "dataset", "dataset_digest", "n_train", "n_train_aligned",
    "alignment_fraction_of", "class_schedule",
}  # fmt: skip


def _parser(files, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(files)
    parser.update({"bundle_root": ROOT, **overrides})
    return parser


def _items(config, prefix=""):
    """(id, value) of every leaf of a config."""
    children = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    if not children:
        yield prefix, config
    for k, v in children:
        yield from _items(v, f"{prefix}#{k}" if prefix else str(k))


def _network_kwargs(parser) -> dict:
    """network_def's constructor arguments as configured (image_size resolved), without _target_, classes and the
    checkpoint arguments."""
    kwargs = {
        k: v for k, v in parser["network_def"].items() if k not in ("_target_", "classes", "ckpt_path", "inference")
    }
    kwargs["image_size"] = parser.get_parsed_content("image_size")
    return kwargs


# ------------------------------------------------------------------------------------------ in-process, fast
def test_configs_declare_short_expressions_and_the_key_metric_once():
    from monai.bundle.reference_resolver import ReferenceResolver

    long_lines = []
    for path in sorted(glob.glob(os.path.join(CONFIGS, "*.yaml"))):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if re.search(r"""(^|[\s:'"-])\$""", line) and len(line.rstrip("\n")) > 120:
                    long_lines.append(f"{os.path.basename(path)}:{n} ({len(line.rstrip())} characters)")
    assert not long_lines, f"$ expressions longer than 120 characters: {long_lines}"

    # the key metric's name is written once, and the components that need it refer to it
    text = "".join(open(p).read() for p in glob.glob(os.path.join(CONFIGS, "*.yaml")))
    assert text.count("val_mean_auc") == 1
    parser = _parser([TRAIN])
    assert parser.get_parsed_content("key_metric_name") == "val_mean_auc"
    assert "@key_metric_name" in parser["validate#key_metric"]
    assert parser["best_saver#metric_name"] == "@key_metric_name"
    assert "@key_metric_name" in parser["early_stop#score_function"]

    # every reference of every merge users run exists (a broken @id would only fail deep inside a run)
    for name, files in MERGES.items():
        if name == "paper_inference":  # paper.yaml's training keys (lr_scheduler) are not used by inference
            continue
        parser = _parser(files)
        missing = {
            (id_, ref)
            for id_, value in _items(parser.get())
            if isinstance(value, str)
            for ref in ReferenceResolver.match_refs_pattern(value)
            if ref not in parser
        }
        assert not missing, f"{name}: references to undefined ids {sorted(missing)}"

    # the DDP network is a component, and the rank-0-only handlers are disabled elsewhere
    ddp = _parser(MERGES["multi_gpu"])
    assert ddp["network#_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert [h for h in ddp["train#handlers"] if h.get("_disabled_") == "@is_not_rank0"]
    assert [h for h in ddp["validate#handlers"] if isinstance(h, dict) and h.get("_disabled_") == "@is_not_rank0"]

    # evaluate.yaml overrides the final evaluation key by key instead of repeating it
    ev = _parser(MERGES["evaluate"])
    # the thread count, set_determinism, then the report
    assert ev["evaluating"][-1] == "@final_report" and len(ev["evaluating"]) == 3
    assert ev["evaluating"][0].startswith("$bundle.workflow.set_threads(")
    assert ev["final_report#mlflow_logger"] == "@mlflow_eval" and ev["final_report#ckpt_path"] == "@ckpt_path"


def test_config_network_sizes_are_the_presets():
    """train.yaml / inference.yaml list the demo preset's sizes and paper.yaml overrides them with the paper preset's:
    the configured networks are the ones build_aligner_vlm builds (same arguments, same weights)."""
    from bundle.networks import DEMO_PRESET, PAPER_PRESET, build_aligner_vlm

    train = _parser(MERGES["train"])
    demo = _network_kwargs(train)
    assert train["network_preset"] == "demo"
    assert demo == {**DEMO_PRESET, "aligner": "max_norm"}
    assert _network_kwargs(_parser(MERGES["inference"])) == demo

    paper = _parser(MERGES["paper"])
    assert paper["network_preset"] == "paper"
    expected = {**demo, **PAPER_PRESET, "text_fallback": None, "fusion_init_std": 0.02}
    expected.update(dict.fromkeys(("text_hidden", "text_layers", "text_heads", "text_intermediate")))
    assert _network_kwargs(paper) == expected
    assert _network_kwargs(_parser(MERGES["paper_inference"])) == expected

    classes = ["nodule_mass", "pleural_effusion", "edema"]
    torch.manual_seed(0)
    net = _parser(MERGES["train"], classes=classes).get_parsed_content("network_def")
    torch.manual_seed(0)
    ref = build_aligner_vlm("demo", classes=classes, image_size=96, aligner="max_norm")
    assert type(net) is type(ref)
    a, b = net.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mlflow_params_mapping(tiny_datalist):
    from bundle.workflow import experiment_params

    parser = _parser([TRAIN], datalist_file=tiny_datalist, random_alignment="false")
    params = parser.get_parsed_content("mlflow_train#experiment_param")
    assert set(params) == MLFLOW_PARAMS
    assert all(isinstance(v, str) for v in params.values())
    assert params["random_alignment"] == "False" and params["network_preset"] == "demo"
    assert params["vit_layers"] == "4" and params["model"] == "AlignerVLM"
    assert experiment_params({"a": None, "b": 1.5, "net": {"c": True}}) == {"a": "none", "b": "1.5", "c": "True"}


@pytest.mark.parametrize("workflow_type,config", [("train", "train.yaml"), ("inference", "inference.yaml")])
def test_bundle_properties_complete(workflow_type, config, tiny_datalist):
    from monai.bundle import ConfigWorkflow

    data = {"datalist_file": tiny_datalist} if workflow_type == "train" else {"input_path": tiny_datalist}
    wf = ConfigWorkflow(
        config_file=os.path.join(CONFIGS, config),
        meta_file=META,
        workflow_type=workflow_type,
        run_id="run" if workflow_type == "inference" else "training",
        **data,
    )
    wf.initialize()
    assert not wf.check_properties()


# ------------------------------------------------------------------------------------------ subprocesses, slow
def _train_args(datalist, out, tiny_train_args, *extra):
    return [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN, "--datalist_file", datalist,
        "--output_dir", str(out / "eval"), "--best_model_path", str(out / "model.pt"), *tiny_train_args, *extra,
    ]  # fmt: skip


def _mlflow_runs(out):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'eval' / 'mlruns.db'}")
    exp = client.get_experiment_by_name("cxr_aligner_fairness")
    return client, client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_train_two_epochs_checkpoint_mlflow_report_and_resume(tiny_datalist, tiny_train_args, run_cmd, tmp_path):
    run_cmd(_train_args(tiny_datalist, tmp_path, tiny_train_args, "--max_epochs", "2", "--alignment_fraction", "0.5"))
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert any(k.startswith("image_encoder.") for k in state)  # a plain state_dict of AlignerVLM

    client, runs = _mlflow_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert set(params) == MLFLOW_PARAMS | {"epoch_length"}
    assert params["alignment_fraction"] == "0.5" and params["vit_layers"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "val_mean_auc")) == 2  # one per epoch
    for key in ("train_loss_ce", "train_loss_al"):  # the loss components, logged separately per iteration
        assert len(client.get_metric_history(run.info.run_id, key)) >= 2
    for key in ("val_hit_rate", "val_fair_macro/sex/gap_auc", "test_ood_mean_auc", "test_ood_hit_rate"):
        assert key in run.data.metrics, key
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "evaluation", "command.json", "train.yaml"} <= arts  # checkpoint, reports, executed config
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}  # the pyfunc model

    report_dir = tmp_path / "eval" / "report" / "test_ood"
    for f in (
        "fairness_report.json",
        "fairness_report.csv",
        "predictions.csv",
        "plots/auc_by_sex.png",
        "plots/attention_overlays.png",
    ):
        assert (report_dir / f).is_file(), f
    report = json.loads((report_dir / "fairness_report.json").read_text())
    assert report["thresholds"]["edema"]["method"] == "val_f1"

    # a crashed run resumes: the same command with more epochs continues at epoch 3
    p = run_cmd(
        _train_args(
            tiny_datalist, tmp_path, tiny_train_args, "--max_epochs", "3", "--alignment_fraction", "0.5",
            "--final_evaluation", "false", "--resume_on_code_change", "true",
        )  # fmt: skip
    )
    assert "resumed from" in p.stdout + p.stderr
    log = p.stdout + p.stderr
    assert "AlignmentTrainer - INFO - Epoch[3] Complete" in log
    assert "AlignmentTrainer - INFO - Epoch[1] Complete" not in log and "evaluating test" not in log


@pytest.mark.slow
def test_evaluate_and_inference_configs(tiny_datalist, tiny_train_args, run_cmd, tmp_path):
    run_cmd(_train_args(tiny_datalist, tmp_path, tiny_train_args, "--max_epochs", "1", "--final_evaluation", "false"))
    run_cmd(
        [
            sys.executable, "-m", "monai.bundle", "run", "evaluating",
            "--config_file", f"[{TRAIN!r},{os.path.join(CONFIGS, 'evaluate.yaml')!r}]", "--datalist_file", tiny_datalist,
            "--output_dir", str(tmp_path / "eval"), "--best_model_path", str(tmp_path / "model.pt"), *tiny_train_args,
            "--eval_splits", "['test_ood']",
        ]
    )  # fmt: skip
    assert (tmp_path / "eval" / "report" / "test_ood" / "fairness_report.json").is_file()
    client, runs = _mlflow_runs(tmp_path)
    ev = [r for r in runs if r.info.run_name == "evaluate"]
    assert ev and ev[0].info.status == "FINISHED" and "test_ood_mean_auc" in ev[0].data.metrics

    out = tmp_path / "inference"
    run_cmd(
        [
            sys.executable, "-m", "monai.bundle", "run", "--config_file", os.path.join(CONFIGS, "inference.yaml"),
            "--input_path", tiny_datalist, "--input_split", "test_ood", "--ckpt_path", str(tmp_path / "model.pt"),
            "--output_dir", str(out), "--image_size", "64", "--network_def#vit_layers", "2",
        ]
    )  # fmt: skip
    rows = (out / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 32 and rows[0].startswith("index,image,prob_nodule_mass")
    assert len(list((out / "overlays").glob("*.png"))) == 32


@pytest.mark.slow
def test_ddp_two_gloo_processes(tiny_datalist, tiny_train_args, run_cmd, tmp_path):
    """configs/multi_gpu_train.yaml with torchrun and 2 CPU processes: trains, validates, rank 0 writes."""
    cfg = f"[{TRAIN!r},{os.path.join(CONFIGS, 'multi_gpu_train.yaml')!r}]"
    run_cmd(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
            "-m", "monai.bundle", "run", "training", "--config_file", cfg, "--datalist_file", tiny_datalist,
            "--output_dir", str(tmp_path / "eval"), "--best_model_path", str(tmp_path / "model.pt"), *tiny_train_args,
            "--max_epochs", "1", "--final_evaluation", "false",
        ],
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert (tmp_path / "model.pt").is_file()
    client, runs = _mlflow_runs(tmp_path)
    assert len(runs) == 1  # only rank 0 logged
    assert len(client.get_metric_history(runs[0].info.run_id, "val_mean_auc")) == 1


@pytest.mark.slow
def test_replica_datalist_trains_one_epoch(tiny_train_args, run_cmd, tmp_path):
    """A converted public-dataset replica (NIH layout, boxes in the 1024 frame, 16 px PNGs) trains as is."""
    from tests.replicas import write_nih

    write_nih(tmp_path / "nih")
    out = tmp_path / "nih.json"
    run_cmd(
        [
            sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), "nih", "--root", str(tmp_path / "nih"),
            "--out", str(out), "--check-images",
        ]
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert any(a["type"] == "bbox_xywh" for r in data["training"] for a in r.get("attention", []))
    extra = ["--max_epochs", "1", "--batch_size", "2", "--final_evaluation", "False", "--alignment_fraction", "1.0"]
    run_cmd(_train_args(str(out), tmp_path, tiny_train_args, *extra))
    assert (tmp_path / "eval" / "checkpoints" / "checkpoint_epoch=1.pt").is_file()


def test_zoo_metadata_and_network_shape_checks(run_cmd):
    """The Model Zoo CI's checks: metadata against the 20240725 schema (offline copy) and verify_net_in_out."""
    schema = os.path.join(ROOT, "tests", "data", "meta_schema_20240725.json")
    p = run_cmd([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", META, "--filepath", schema])
    assert "metadata is verified with no error" in p.stdout + p.stderr
    p = run_cmd(
        [
            sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file", META,
            "--config_file", os.path.join(CONFIGS, "inference.yaml"),
        ]
    )  # fmt: skip
    assert "data shape of network is verified with no error" in p.stdout + p.stderr
