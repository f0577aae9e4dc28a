"""Small glue used by the bundle configs (kept here so the YAML stays declarative)."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence

import torch

__all__ = ["rank", "with_index", "file_digest", "split_records", "pick_device", "experiment_params", "parameter_groups"]


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


def rank() -> int:
    """This process's rank under torch.distributed (0 when not distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def pick_device(name: str | None = None) -> torch.device:
    """``cuda`` when available unless a device is named (``cpu``, ``cuda:1``)."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def experiment_params(**params) -> dict:
    """The run-defining hyper-parameters as MLflow params (strings, None -> 'none')."""
    return {k: ("none" if v is None else str(v)) for k, v in params.items()}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as in KAD: no weight decay on biases and normalisation weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
