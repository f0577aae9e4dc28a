"""torch.distributed helpers: the one place that asks which rank this process is."""

from __future__ import annotations

import torch

__all__ = ["rank", "is_rank0", "unwrap"]


def rank() -> int:
    """This process's rank under torch.distributed (0 when not distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_rank0() -> bool:
    """True on the process that writes files and logs (rank 0, or the only process)."""
    return rank() == 0


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / DataParallel, else the module itself."""
    return getattr(net, "module", net)
