"""Training-step speed of the demo AlignerVLM on this machine's CPU (or GPU when present).

Measures forward + backward + AdamW step on batches of 32 at the demo preset, with the full loss (every positive
pair aligned, masks at image resolution: p = 1) and with classification only (no pair selected: p = 0, the
baseline), and projects the time of one epoch of the 2,400-image synthetic training set. Goal: an epoch well under
a minute on 2 CPU cores.
"""

from __future__ import annotations

import os
import time

import torch

from bundle.losses import AlignerLoss
from bundle.networks import build_aligner_vlm

EPOCH_IMAGES = 2400
BATCH = 32


def _time_steps(net, loss_fn, batch, aligns: dict, steps: int, warmup: int) -> dict:
    """Median step time per variant. The variants are interleaved step by step, so that other processes sharing
    the cores slow all of them alike and the ratio stays meaningful."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-4)
    image, label, mask = batch
    times = {k: [] for k in aligns}
    for i in range(warmup + steps):
        for name, align in aligns.items():
            t0 = time.perf_counter()
            out = net(image)
            loss = loss_fn(out, label, mask, align)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if image.is_cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}  # median: robust to short slow-downs


def run(quick: bool = False) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = build_aligner_vlm("demo").to(device).train()
    size = net.image_size
    g = torch.Generator().manual_seed(0)
    image = torch.randn(BATCH, 1, size, size, generator=g)
    label = (torch.rand(BATCH, len(net.classes), generator=g) > 0.5).float()
    mask = torch.zeros(BATCH, len(net.classes), size, size)
    mask[..., size // 4 : size // 2, size // 4 : size // 2] = 1.0
    batch = (image.to(device), label.to(device), mask.to(device))
    loss_fn = AlignerLoss(lambda_al=1.0)
    steps, warmup = (3, 1) if quick else (10, 2)
    aligns = {"ce_only": torch.zeros_like(batch[1]), "alignment": torch.ones_like(batch[1])}
    t = _time_steps(net, loss_fn, batch, aligns, steps, warmup)
    t_ce, t_al = t["ce_only"], t["alignment"]
    per_epoch = EPOCH_IMAGES / BATCH
    return {
        "device": str(device),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "threads": torch.get_num_threads(),
        "preset": "demo",
        "batch": BATCH,
        "step_s_ce_only": round(t_ce, 4),
        "step_s_with_alignment": round(t_al, 4),
        "images_per_s_ce_only": round(BATCH / t_ce, 1),
        "images_per_s_with_alignment": round(BATCH / t_al, 1),
        "epoch_s_projected": round(per_epoch * t_al, 1),
        "ratio_alignment_vs_ce_only": round(t_al / t_ce, 3),
        "ratio_epoch_vs_60s_goal": round(per_epoch * t_al / 60.0, 3),
    }
