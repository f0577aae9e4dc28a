"""Export of a trained AlignerVLM: TorchScript by tracing (models/model.ts) and ONNX with a dynamic batch axis.

Both are built from ``models/model.pt`` and its architecture sidecar ``models/model.json`` (no size flags):

    python scripts/export.py                      # models/model.ts + models/model.onnx, checked against eager
    python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.yaml --use_trace True \\
        --input_shape "[1, 1, 96, 96]"            # the zoo's command; S = the trained image_size (model.json)

What the exported graphs compute: ``AlignerVLMInference.forward``, image (B, 1, S, S) float32 -> sigmoid
probabilities (B, C). The class prompts' embeddings (frozen text encoder) are constants of the graph, so neither
file needs the tokenizer, ``transformers`` or ``bundle``. The attention maps are not outputs. The batch axis is
dynamic; the image size is fixed to the trained S (position embeddings are not interpolated in the graph).
Scripting (``torch.jit.script``) is not supported: Hugging Face's ViT/BERT are not scriptable (``Failed to get
source for ViTConfig.__init__``); tracing is exact (docs/export.md has the measured differences).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence

import torch

from bundle.networks import (
    CheckpointConfigError,
    build_from_checkpoint,
    config_path_for,
    read_network_config,
    write_network_config,
)

logger = logging.getLogger("bundle")

__all__ = [
    "ATOL",
    "RTOL",
    "input_shape",
    "trace_network",
    "export_torchscript",
    "export_onnx",
    "compare",
    "write_config_from_yaml",
    "main",
]

# Exported-vs-eager tolerance on probabilities (float32, CPU): measured max abs diff is ~1e-7 (docs/export.md).
ATOL, RTOL = 1e-5, 1e-4
ONNX_OPSET = 17
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def input_shape(ckpt_file: str, batch: int = 1) -> list[int]:
    """[batch, in_channels, S, S] at the size ``ckpt_file`` was trained at (its sidecar)."""
    record = read_network_config(ckpt_file, check=True)
    if record is None:
        raise CheckpointConfigError(
            f"{ckpt_file} has no architecture sidecar {config_path_for(ckpt_file)}: write it first "
            f"(python scripts/export.py --ckpt_file {ckpt_file} --write_config --config_file configs/train.yaml "
            "[--image_size S --network_def#vit_layers L ...])"
        )
    kw = record["kwargs"]
    return [int(batch), int(kw.get("in_channels", 1)), int(kw["image_size"]), int(kw["image_size"])]


def trace_network(net: torch.nn.Module, shape: Sequence[int]) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of an inference network (forward -> a tensor) on a random input of ``shape``.

    The batch size of ``shape`` does not matter: the batch axis stays symbolic in the traced graph.
    """
    net = net.eval()
    with torch.no_grad():
        return torch.jit.trace(net, torch.rand(*shape), check_trace=False)


def export_torchscript(
    ckpt_file: str,
    filepath: str,
    config_file: str | Sequence[str] | None = None,
    meta_file: str | None = None,
) -> str:
    """``models/model.ts`` via MONAI's ``ckpt_export`` (trace, metadata and configs embedded as extra files), with
    the network built from the checkpoint and its sidecar, traced at the trained image size."""
    from monai.bundle import ckpt_export

    config_file = config_file or os.path.join(_ROOT, "configs", "inference.yaml")
    meta_file = meta_file or os.path.join(_ROOT, "configs", "metadata.json")
    network_def = {"_target_": "bundle.networks.build_from_checkpoint", "ckpt_path": ckpt_file, "inference": True}
    ckpt_export(
        net_id="network_def",
        filepath=filepath,
        ckpt_file=ckpt_file,
        meta_file=meta_file,
        config_file=config_file,
        use_trace=True,
        input_shape=input_shape(ckpt_file),
        network_def=network_def,
    )
    return filepath


def export_onnx(net: torch.nn.Module, filepath: str, shape: Sequence[int], opset: int = ONNX_OPSET) -> str:
    """ONNX of an inference network: input ``image`` (batch, C, S, S), output ``probs`` (batch, C), batch dynamic.

    Uses the TorchScript-based exporter (``dynamo=False``): in torch 2.13 the dynamo exporter specialised the batch
    of this network to the example's (onnxruntime then refuses batch 4)."""
    os.makedirs(os.path.dirname(os.path.abspath(filepath)), exist_ok=True)
    net = net.eval()
    tmp = filepath + ".tmp"
    # not under no_grad: there nn.MultiheadAttention takes its fused fast path (aten::_native_multi_head_attention),
    # which has no ONNX symbolic
    torch.onnx.export(
        net,
        (torch.rand(*shape),),
        tmp,
        input_names=["image"],
        output_names=["probs"],
        dynamic_axes={"image": {0: "batch"}, "probs": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )
    os.replace(tmp, filepath)
    return filepath


def run_onnx(filepath: str, image: torch.Tensor) -> torch.Tensor:
    """Probabilities of the ONNX file on ``image`` with onnxruntime (CPU)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(filepath, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"image": image.cpu().numpy()})[0])


def compare(net: torch.nn.Module, exported, images: Sequence[torch.Tensor]) -> list[float]:
    """Max abs difference between ``exported`` (a callable: TorchScript module or run_onnx partial) and eager
    ``net`` on each of ``images``."""
    diffs = []
    with torch.no_grad():
        for x in images:
            diffs.append(float((exported(x).float() - net.eval()(x)).abs().max()))
    return diffs


def write_config_from_yaml(ckpt_file: str, config_file: str | Sequence[str], overrides: Mapping | None = None) -> str:
    """Write the sidecar of a checkpoint trained before sidecars existed: build ``network_def`` of the config it was
    trained with (and the same overrides), check that the weights fit (strict), then write models/model.json."""
    from monai.bundle import ConfigParser

    from bundle.evaluation import load_checkpoint

    parser = ConfigParser()
    parser.read_config(config_file)
    parser["bundle_root"] = _ROOT
    for k, v in (overrides or {}).items():
        parser[k] = v
    net = parser.get_parsed_content("network_def", instantiate=True)
    load_checkpoint(net, ckpt_file)
    return write_network_config(ckpt_file, net)


def _parse_overrides(rest: Sequence[str]) -> dict:
    """``--key value`` pairs (monai.bundle style, values read as YAML) -> {key: value}."""
    import yaml

    out, it = {}, iter(rest)
    for tok in it:
        if not tok.startswith("--"):
            raise SystemExit(f"unexpected argument {tok!r}: config overrides are --key value pairs")
        key = tok[2:]
        if "=" in key:
            key, val = key.split("=", 1)
        else:
            val = next(it, None)
            if val is None:
                raise SystemExit(f"{tok} needs a value")
        out[key] = yaml.safe_load(val)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="models/model.pt (+ its sidecar models/model.json) -> models/model.ts (trace) + models/model.onnx"
    )
    p.add_argument("--ckpt_file", default=os.path.join(_ROOT, "models", "model.pt"))
    p.add_argument("--ts", default=None, help="TorchScript output (default: beside the checkpoint, model.ts)")
    p.add_argument("--onnx", default=None, help="ONNX output (default: beside the checkpoint, model.onnx)")
    p.add_argument("--no_onnx", action="store_true", help="TorchScript only")
    p.add_argument("--config_file", default=None, help="inference config embedded in model.ts / for --write_config")
    p.add_argument("--meta_file", default=os.path.join(_ROOT, "configs", "metadata.json"))
    p.add_argument(
        "--write_config",
        action="store_true",
        help="only write the sidecar of a checkpoint that has none, from --config_file (default configs/train.yaml) "
        "and the --key value overrides it was trained with",
    )
    args, rest = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ckpt = args.ckpt_file
    if not os.path.isfile(ckpt):
        raise SystemExit(
            f"checkpoint {ckpt} not found: train first (python -m monai.bundle run training --config_file "
            "configs/train.yaml) or pass --ckpt_file /path/to/model.pt"
        )
    if args.write_config:
        path = write_config_from_yaml(
            ckpt, args.config_file or os.path.join(_ROOT, "configs", "train.yaml"), _parse_overrides(rest)
        )
        print(f"wrote {path}")
        return 0
    if rest:
        raise SystemExit(f"unexpected arguments {rest}: the sizes come from {config_path_for(ckpt)}")
    folder = os.path.dirname(os.path.abspath(ckpt))
    ts_path = args.ts or os.path.join(folder, "model.ts")
    shape1, shape4 = input_shape(ckpt, 1), input_shape(ckpt, 4)
    net = build_from_checkpoint(ckpt, inference=True)
    images = [torch.rand(*shape1), torch.rand(*shape4)]

    export_torchscript(ckpt, ts_path, args.config_file, args.meta_file)
    d_ts = compare(net, torch.jit.load(ts_path), images)
    print(f"wrote {ts_path}: max |ts - eager| batch 1 {d_ts[0]:.2e}, batch 4 {d_ts[1]:.2e}")
    worst = max(d_ts)
    if not args.no_onnx:
        onnx_path = args.onnx or os.path.join(folder, "model.onnx")
        export_onnx(net, onnx_path, shape1)
        d_onnx = compare(net, lambda x: run_onnx(onnx_path, x), images)
        print(f"wrote {onnx_path}: max |onnx - eager| batch 1 {d_onnx[0]:.2e}, batch 4 {d_onnx[1]:.2e}")
        worst = max(worst, *d_onnx)
    if worst > ATOL:
        print(f"FAILED: exported outputs differ from eager by {worst:.2e} > atol {ATOL}")
        return 1
    return 0
