"""Small glue used by the bundle configs (kept here so that every ``$`` expression in configs/ is one short line)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Mapping, Sequence

import torch

from bundle.utils.atomic import write_json_atomic
from bundle.utils.dist import unwrap

__all__ = [
    "as_bool",
    "with_index",
    "split_records",
    "file_digest",
    "pick_device",
    "experiment_params",
    "network_params",
    "parameter_groups",
    "image_records",
    "save_run_config",
]


def as_bool(value, name: str = "flag") -> bool:
    """A command-line flag as a bool: fire passes ``--x false`` as the *string* "false", which is truthy."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    s = str(value).strip().lower()
    if s in ("true", "yes", "1", "on"):
        return True
    if s in ("false", "no", "0", "off", "none", ""):
        return False
    raise ValueError(f"{name}={value!r} is not a yes/no value: use true or false")


def with_index(records: Sequence[Mapping]) -> list[dict]:
    """Copies of the records with ``index`` = position in the split (joins predictions back to metadata)."""
    return [{**r, "index": i} for i, r in enumerate(records)]


def split_records(datalist: Mapping, split: str) -> list[dict]:
    """The records of one split, with ``index``; a clear error when the split does not exist."""
    if split not in datalist or not isinstance(datalist[split], list):
        have = [k for k, v in datalist.items() if isinstance(v, list) and k != "classes"]
        raise KeyError(f"the datalist has no split {split!r}; it has {have}. Set the split name in the config.")
    return with_index(datalist[split])


def file_digest(path: str, n: int = 12) -> str:
    """Short sha256 of a file (the dataset digest logged with every run)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def pick_device(name: str | None = None) -> torch.device:
    """``cuda`` when available unless a device is named (``cpu``, ``cuda:1``)."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def experiment_params(params: Mapping) -> dict:
    """The config's ``mlflow_params`` as MLflow params: strings, None -> 'none'. A value that is itself a mapping
    (the network's sizes from :func:`network_params`) is logged key by key, without its own name."""
    flat: dict = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            flat.update(v)
        else:
            flat[k] = v
    return {k: ("none" if v is None else str(v)) for k, v in flat.items()}


def network_params(net: torch.nn.Module) -> dict:
    """Model sizes worth logging with a run, read from the built network (whatever its sizes came from)."""
    net = unwrap(net)
    n_all = sum(p.numel() for p in net.parameters())
    n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    out = {"model": type(net).__name__, "n_parameters": n_all, "n_trainable": n_trainable}
    vit = getattr(getattr(net, "image_encoder", None), "config", None)
    if vit is not None:
        out.update(
            image_size=getattr(net, "image_size", vit.image_size),
            patch_size=vit.patch_size,
            vit_hidden=vit.hidden_size,
            vit_layers=vit.num_hidden_layers,
            vit_heads=vit.num_attention_heads,
        )
    txt = getattr(getattr(net, "text_encoder", None), "config", None)
    if txt is not None:
        out.update(
            text_encoder=getattr(net, "text_source", "?"),
            text_hidden=txt.hidden_size,
            text_layers=txt.num_hidden_layers,
            freeze_text=getattr(net, "freeze_text", None),
        )
    if hasattr(net, "layers"):
        out.update(
            fusion_layers=len(net.layers),
            fusion_dim=getattr(net, "fusion_dim", None),
            aligner=getattr(net, "aligner_type", None),
        )
    return out


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as in KAD: no weight decay on biases and normalisation weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def image_records(input_path: str, split: str = "test", exclude: str | None = None) -> list[dict]:
    """Records for inference from a folder (recursive), one file, or a datalist JSON (+ split).

    Each record has ``image`` and ``index``; a datalist keeps its metadata too. A folder gives *every* file under
    it, whatever its name (DICOM files often have no extension), except hidden ones (``.*``) and those under
    ``exclude`` (the output folder): :func:`bundle.inference.scan_inputs` then decides by content which are chest
    radiographs and lists the others, with the reason, in ``skipped.csv``.
    """
    if not os.path.exists(input_path):
        raise FileNotFoundError(
            f"inference input {input_path!r} does not exist: give a folder of PNG/JPEG/DICOM "
            f"files, one image file, or a datalist JSON with --input_path"
        )
    if os.path.isfile(input_path) and input_path.lower().endswith(".json"):
        from bundle.data import datalist as dl

        return split_records(dl.load(input_path), split)
    if os.path.isfile(input_path):
        return with_index([{"image": os.path.abspath(input_path)}])
    skip = os.path.abspath(exclude) if exclude else None
    files = []
    for root, dirs, names in os.walk(input_path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.abspath(os.path.join(root, d)) != skip)
        files += [os.path.join(root, f) for f in names if not f.startswith(".")]
    if not files:
        raise FileNotFoundError(f"no files found under {input_path!r} (hidden files are not read)")
    return with_index([{"image": os.path.abspath(f)} for f in sorted(files)])


def save_run_config(output_dir: str) -> str:
    """Record what was executed (for MLflow): the command line with its overrides and a copy of every config file
    it names, in ``<output_dir>/run_config/``. Returns the folder."""
    folder = os.path.join(output_dir, "run_config")
    os.makedirs(folder, exist_ok=True)
    argv = list(sys.argv)
    files: list[str] = []
    for i, a in enumerate(argv[:-1]):
        if a in ("--config_file", "--meta_file"):
            spec = argv[i + 1].strip()
            names = [x.strip(" '\"") for x in spec.strip("[]").split(",")] if spec.startswith("[") else [spec]
            files += [n for n in names if os.path.isfile(n)]
    for f in files:
        shutil.copy2(f, os.path.join(folder, os.path.basename(f)))
    write_json_atomic(os.path.join(folder, "command.json"), {"argv": argv, "cwd": os.getcwd(), "config_files": files})
    return folder
