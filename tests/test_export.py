"""The architecture travels with the weights (models/model.json beside models/model.pt), and the exports.

Fast tests use a tiny network (64 px, 2 ViT layers) trained at other sizes than the configs' (96 px, 4 layers), so
that anything still built from the configs' sizes fails. The real-size DICOM comparison (6-10 s on 2 cores) is marked slow.
Exported-vs-eager tolerance: bundle.export.ATOL (1e-5 absolute on probabilities; measured ~1e-7, docs/export.md).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from ignite.engine import Engine, Events

from bundle.evaluation import load_checkpoint
from bundle.export import ATOL, compare, export_onnx, input_shape, trace_network
from bundle.handlers import BestModelSaver
from bundle.networks import (
    DEMO_PRESET,
    CheckpointConfigError,
    build_aligner_vlm,
    build_from_checkpoint,
    checkpoint_image_size,
    config_path_for,
    file_sha256,
    network_config,
    write_network_config,
)
from bundle.utils.atomic import torch_save_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
TINY = {"image_size": 64, "vit_layers": 2}  # trained sizes that differ from the configs' (96, 4)
CONFIG_SIZES = {**DEMO_PRESET, "classes": ["nodule_mass", "pleural_effusion", "edema"], "aligner": "max_norm"}


def _tiny(**kw):
    torch.manual_seed(0)
    return build_aligner_vlm("demo", **{**TINY, **kw})


def _saved(tmp_path, net=None, sidecar=True):
    net = net or _tiny()
    path = str(tmp_path / "models" / "model.pt")
    torch_save_atomic(path, net.state_dict())
    if sidecar:
        write_network_config(path, net)
    return path, net


def test_best_model_saver_writes_the_architecture_beside_a_plain_state_dict(tmp_path):
    net = _tiny()
    path = str(tmp_path / "models" / "model.pt")
    saver = BestModelSaver(path, net, metric_name="auc")
    eng = Engine(lambda e, b: None)
    scores = iter([0.6, 0.8, 0.7])

    @eng.on(Events.EPOCH_COMPLETED)
    def set_metric(e):
        e.state.metrics["auc"] = next(scores)
        with torch.no_grad():
            net.classifier.bias.fill_(e.state.epoch)

    saver.attach(eng)
    eng.run([0], max_epochs=3)
    state = torch.load(path, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())  # the zoo's format
    assert float(state["classifier.bias"]) == 2.0  # the best epoch's weights
    record = json.load(open(config_path_for(path)))
    assert config_path_for(path) == str(tmp_path / "models" / "model.json")
    assert record["model_sha256"] == file_sha256(path) and record["bundle_version"]
    assert record["kwargs"] == network_config(net)
    assert record["kwargs"]["image_size"] == 64 and record["kwargs"]["vit_layers"] == 2
    assert record["kwargs"]["text_encoder"] == "random-small" and record["kwargs"]["vit_pretrained"] is None

    # a network that is not an AlignerVLM still gets its weights saved (no sidecar)
    other = str(tmp_path / "other.pt")
    BestModelSaver(other, torch.nn.Linear(1, 1), metric_name="auc")(type("E", (), {"state": eng.state})())
    assert os.path.exists(other) and not os.path.exists(config_path_for(other))


def test_build_from_checkpoint_needs_no_flags(tmp_path):
    path, net = _saved(tmp_path)
    # the configs' (other) sizes are only a fallback: the sidecar wins
    rebuilt = build_from_checkpoint(path, inference=True, **CONFIG_SIZES)
    assert network_config(rebuilt) == network_config(net) and rebuilt.return_probs and not rebuilt.training
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), torch.sigmoid(net.eval()(x)["logits"]))
    assert checkpoint_image_size(path, 96) == 64
    assert input_shape(path, 4) == [4, 1, 64, 64]


@pytest.mark.parametrize(
    "variant",
    [
        {"aligner": "conv", "classifier": "per_class"},
        {"aligner": "sigmoid", "text_pooling": "pooler", "fusion_layers": 2, "fusion_dim": 96, "freeze_text": False},
        {"classes": ["effusion", "cardiomegaly"], "prompts": {"effusion": "fluid", "cardiomegaly": "large heart"}},
    ],
)
def test_network_config_round_trips(tmp_path, variant):
    path, net = _saved(tmp_path, _tiny(**variant))
    rebuilt = build_from_checkpoint(path)
    assert network_config(rebuilt) == network_config(net)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x)["attn_refined"], net.eval()(x)["attn_refined"])


def test_no_checkpoint_builds_the_configs_untrained_network(tmp_path):
    net = build_from_checkpoint(str(tmp_path / "missing.pt"), inference=True, **CONFIG_SIZES)
    assert net.image_size == 96 and net.image_encoder.config.num_hidden_layers == 4
    assert checkpoint_image_size(str(tmp_path / "missing.pt"), 96) == 96
    with pytest.raises(FileNotFoundError, match="train first"):
        build_from_checkpoint(str(tmp_path / "missing.pt"))


def test_stale_or_missing_sidecar_and_mismatches_say_what_to_do(tmp_path):
    path, net = _saved(tmp_path)
    torch_save_atomic(path, _tiny(vit_layers=1).state_dict())  # model.pt replaced, sidecar left behind
    with pytest.raises(CheckpointConfigError, match="model.json is stale"):
        build_from_checkpoint(path)

    os.remove(config_path_for(path))  # a checkpoint from before sidecars
    with pytest.raises(CheckpointConfigError, match="no architecture sidecar .*--write_config"):
        build_from_checkpoint(path)
    with pytest.raises(CheckpointConfigError) as e:  # the config's sizes do not fit: the trained ones are named
        build_from_checkpoint(path, **CONFIG_SIZES)
    msg = str(e.value)
    assert "trained with image_size=64, vit_layers=1" in msg and "image_size=96, vit_layers=4" in msg
    assert "--image_size 64 --network_def#vit_layers 1" in msg


def test_load_checkpoint_names_the_differing_sizes(tmp_path):
    path, _ = _saved(tmp_path)
    config_net = build_aligner_vlm("demo")  # 96 px, 4 layers: what flags-less inference used to build
    with pytest.raises(CheckpointConfigError, match=r"trained with image_size=64, vit_layers=2 \(from .*model.json\)"):
        load_checkpoint(config_net, path)
    os.remove(config_path_for(path))  # without sidecar: read off the tensor shapes
    with pytest.raises(RuntimeError, match="trained with image_size=64, vit_layers=2 .*no sidecar"):
        load_checkpoint(config_net, path)
    assert load_checkpoint(_tiny(), path) is not None


def test_write_config_for_a_checkpoint_from_before_sidecars(tmp_path):
    from bundle.export import write_config_from_yaml

    path, net = _saved(tmp_path, sidecar=False)
    overrides = {"classes": list(net.classes), "image_size": 64, "network_def#vit_layers": 2}
    write_config_from_yaml(path, os.path.join(CONFIGS, "train.yaml"), overrides)
    assert network_config(build_from_checkpoint(path)) == network_config(net)
    os.remove(config_path_for(path))
    with pytest.raises(CheckpointConfigError, match="image_size=64"):  # wrong sizes: refused, nothing written
        write_config_from_yaml(path, os.path.join(CONFIGS, "train.yaml"), {"classes": list(net.classes)})
    assert not os.path.exists(config_path_for(path))


def test_tracing_at_another_size_than_trained_is_refused():
    with pytest.raises(ValueError, match=r"trained at image_size=64: trace with input_shape \[1, 1, 64, 64\]"):
        trace_network(_tiny(return_probs=True), [1, 1, 96, 96])


_LOAD_TS = """
import sys, torch
m = torch.jit.load(sys.argv[1])
outs = [m(torch.load(p)) for p in sys.argv[2:]]
torch.save(outs, sys.argv[1] + ".out")
assert "bundle" not in sys.modules and "transformers" not in sys.modules, sorted(sys.modules)
print("ok")
"""


def _run_ts_in_fresh_interpreter(ts_path, images, tmp_path):
    """The outputs of ``ts_path`` on ``images`` from a Python that never imports bundle or transformers."""
    paths = []
    for i, x in enumerate(images):
        paths.append(str(tmp_path / f"x{i}.pt"))
        torch.save(x.as_subclass(torch.Tensor).clone(), paths[-1])  # a plain tensor (not a MetaTensor)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_LOAD_TS), ts_path, *paths],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]
    return torch.load(ts_path + ".out")


def _export_and_compare(path, images, tmp_path):
    """model.ts through MONAI's ckpt_export with configs/inference.yaml (network_def from the checkpoint, as the
    inference config's network_def does), ONNX; both compared with eager on ``images``. Returns the diffs."""
    from monai.bundle import ckpt_export

    ts_path = str(tmp_path / "models" / "model.ts")
    ckpt_export(
        net_id="network_def",
        filepath=ts_path,
        ckpt_file=path,
        meta_file=os.path.join(CONFIGS, "metadata.json"),
        config_file=os.path.join(CONFIGS, "inference.yaml"),
        use_trace=True,
        input_shape=input_shape(path),
        **{  # what configs/inference.yaml's network_def is (no-ops once it says so itself)
            "ckpt_path": path,
            "network_def#_target_": "bundle.networks.build_from_checkpoint",
            "network_def#ckpt_path": "@ckpt_path",
            "network_def#inference": True,
        },
    )
    eager = build_from_checkpoint(path, inference=True)
    with torch.no_grad():
        expected = [eager(x) for x in images]
    got = _run_ts_in_fresh_interpreter(ts_path, images, tmp_path)
    diffs = {"ts": [float((g - e).abs().max()) for g, e in zip(got, expected, strict=True)]}
    assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expected]

    # the .ts also carries the bundle's metadata and config, as the zoo's ckpt_export writes them
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(ts_path, _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] and json.loads(extra["inference.json"])["network_def"]

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return diffs
    from bundle.export import run_onnx

    onnx_path = export_onnx(eager, str(tmp_path / "models" / "model.onnx"), input_shape(path))
    diffs["onnx"] = compare(eager, lambda x: run_onnx(onnx_path, x), images)
    return diffs


def test_torchscript_and_onnx_match_eager_at_batch_1_and_4(tmp_path):
    path, _ = _saved(tmp_path)
    torch.manual_seed(1)
    images = [torch.rand(1, 1, 64, 64), torch.rand(4, 1, 64, 64)]
    diffs = _export_and_compare(path, images, tmp_path)
    assert max(diffs["ts"]) <= ATOL, diffs
    if "onnx" in diffs:
        assert max(diffs["onnx"]) <= ATOL, diffs


def test_scripts_export_writes_both_files(tmp_path):
    from bundle.export import main

    path, _ = _saved(tmp_path)
    onnx_args = [] if _has_onnx() else ["--no_onnx"]
    assert main(["--ckpt_file", path, *onnx_args]) == 0
    assert os.path.exists(tmp_path / "models" / "model.ts")
    assert os.path.exists(tmp_path / "models" / "model.onnx") == _has_onnx()


def _has_onnx() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_exports_match_eager_on_real_size_dicoms(tmp_path):
    """Four 2048 x 1792 12-bit DX DICOMs through the bundle's preprocessing (LoadCXRd -> Letterboxd ->
    CXRIntensityd) at the trained size, the demo-size network (96 px, 4 ViT layers): batch 1 and batch 4."""
    import numpy as np
    from monai.transforms import Compose

    from bundle.transforms import CXRIntensityd, Letterboxd, LoadCXRd
    from bundle.utils.dicom import make_dataset, phantom, write

    torch.manual_seed(0)
    net = build_aligner_vlm("demo")
    path, _ = _saved(tmp_path, net)
    size = checkpoint_image_size(path)
    files = []
    for seed in range(4):
        pixels = np.round(phantom(2048, 1792, bits=12, seed=seed) * 4095).astype(np.uint16)
        files.append(write(make_dataset(pixels, bits_stored=12), tmp_path / f"cxr{seed}.dcm"))
    pre = Compose([LoadCXRd("image", target_size=size), Letterboxd("image", size=size), CXRIntensityd("image")])
    batch = torch.stack([pre({"image": f})["image"].as_subclass(torch.Tensor).float() for f in files])
    assert batch.shape == (4, 1, size, size)
    diffs = _export_and_compare(path, [batch[:1].clone(), batch.clone()], tmp_path)
    print(f"max |exported - eager| on real-size DICOMs (batch 1, batch 4): {diffs}")
    assert max(diffs["ts"]) <= ATOL, diffs
    if "onnx" in diffs:
        assert max(diffs["onnx"]) <= ATOL, diffs


def test_export_script_names_a_missing_checkpoint(tmp_path):
    from bundle.export import main

    missing = str(tmp_path / "model.pt")
    with pytest.raises(SystemExit, match=r"checkpoint .*model\.pt not found: train first"):
        main(["--ckpt_file", missing])
