"""The model: its architecture from the bundle's inference config (plus overrides), its weights from a state_dict
file, and its identity (name, version, creator from configs/metadata.json; a UID derived from the weights).

Checkpoints do not record their architecture, so the config that trained them must be given (``--config``,
``--override``), exactly as for ``python -m monai.bundle run``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml

from bundle.utils.atomic import file_sha256

# bundle/deploy/model.py -> the bundle root (configs/, models/), wherever the app is started from
BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(BUNDLE_ROOT, "configs", "inference.yaml")
DEFAULT_MODEL = os.path.join(BUNDLE_ROOT, "models", "model.pt")
METADATA = os.path.join(BUNDLE_ROOT, "configs", "metadata.json")
TRAIN_HINT = (
    "train one with `python -m monai.bundle run training --config_file configs/train.yaml` (writes models/model.pt) "
    "or copy a trained model.pt there, then pass it with -m"
)


@dataclass(frozen=True)
class ModelSpec:
    """What the operators need to build the model: config files, overrides and the checkpoint path."""

    config_files: tuple[str, ...]
    overrides: tuple[tuple[str, object], ...]
    model_path: str


def resolve_model_path(path: str) -> str | None:
    """A checkpoint file: ``path`` itself, or in a folder (a MAP's HOLOSCAN_MODEL_PATH) its model.pt, else its
    only .pt file found recursively; None when there is none."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, "model.pt")):
        return os.path.join(path, "model.pt")
    found = sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files if f.endswith(".pt"))
    return found[0] if len(found) == 1 else None


def parse_override(text: str) -> tuple[str, object]:
    """``"network_def#vit_layers=2"`` -> ("network_def#vit_layers", 2); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--override {text!r}: expected KEY=VALUE, e.g. image_size=224")
    return key.strip(), yaml.safe_load(value)


def load_parser(spec: ModelSpec):
    """The bundle's inference config as a MONAI ConfigParser, ``bundle_root`` set to the bundle root."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(spec.config_files))
    parser["bundle_root"] = BUNDLE_ROOT
    parser["ckpt_path"] = spec.model_path  # network_def reads the architecture from this checkpoint's model.json
    for key, value in spec.overrides:
        parser[key] = value
    return parser


def load_network(spec: ModelSpec, parser):
    """``network_def`` of the config with the checkpoint's weights (strict), in eval mode on the CPU."""
    import torch

    from bundle.workflow import set_threads

    # the app runs inference on the CPU: the same deliberate thread count as the bundle's inference
    set_threads(parser.get("num_threads"), 0)
    net = parser.get_parsed_content("network_def", instantiate=True)
    state = torch.load(spec.model_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a CheckpointSaver dict {"model": ...}
        state = state["model"]
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        shown = " ".join(f"--override {k}={v}" for k, v in spec.overrides) or "no overrides"
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:2])[:300]
        raise ValueError(
            f"{spec.model_path} does not fit network_def of {', '.join(spec.config_files)} with {shown}: pass the "
            f"config and --override values it was trained with ({detail})"
        ) from None
    return net.eval()


def model_identity(model_path: str) -> dict:
    """{creator, name, version, uid}: the bundle's metadata and a UID derived from the checkpoint's bytes, so that
    every retrained model gets a new Device UID (IHE AI Results)."""
    from pydicom.uid import generate_uid

    with open(METADATA, encoding="utf-8") as f:
        meta = json.load(f)
    return {
        "creator": str(meta.get("authors", "")),
        "name": str(meta.get("name", "model")),
        "version": str(meta.get("version", "")),
        "uid": str(generate_uid(entropy_srcs=[file_sha256(model_path)])),
    }
