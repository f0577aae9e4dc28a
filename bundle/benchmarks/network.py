"""Training speed and memory of the AlignerVLM (demo and paper sizes) on this machine's CPU.

One training step = forward + loss + backward + AdamW step on a batch of random images, labels and masks. Variants,
interleaved step by step in the same process so that other jobs slow all of them alike:
- ``vlm``: the full loss, every positive pair aligned (masks at image resolution, p = 1), fp32;
- ``vlm_ce``: classification only (no pair selected, p = 0): the baseline of the alignment cost;
- ``vlm_bf16``: ``vlm`` with the forward and loss under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (the
  benchmark's own autocast, independent of the trainer's ``amp`` option);
- ``vit``: a plain ViT classifier of the same size (Hugging Face ``ViTForImageClassification`` with the VLM's own
  image-encoder config, one logit per class, BCE loss): the baseline of what the text queries, fusion layers and
  alignment head cost on top of the backbone.
Sizes: demo (configs/train.yaml's network: 96 px ViT, small random text encoder) and paper (ViT-B/16 at 224 px, a
random BERT-base-sized text encoder built offline, KAD's 4 fusion layers: configs/paper.yaml). Peak memory: the
growth of resident memory during one (post-warm-up) step of each variant (activations, gradients, temporaries; the
weights and optimizer state exist before it), measured in the first timed repetition.
"""

from __future__ import annotations

import os

import torch

from bundle.benchmarks._common import Sizes, interleave, memory_row, time_row
from bundle.losses import AlignerLoss
from bundle.networks import build_aligner_vlm

EPOCH_IMAGES = 2400  # the synthetic training set
TINY = {
    "image_size": 32,
    "vit_hidden": 32,
    "vit_layers": 1,
    "vit_heads": 2,
    "vit_mlp": 64,
    "text_hidden": 32,
    "text_layers": 1,
    "text_heads": 2,
    "text_intermediate": 64,
    "fusion_dim": 32,
    "fusion_heads": 2,
    "fusion_ffn": 64,
}


def plain_vit(net) -> torch.nn.Module:
    """A ViT classifier with the same image-encoder config (size, depth, width, attention implementation)."""
    from transformers import ViTConfig, ViTForImageClassification

    d = {k: v for k, v in net.image_encoder.config.to_dict().items() if k not in ("id2label", "label2id")}
    cfg = ViTConfig(**d, num_labels=len(net.classes))
    cfg._attn_implementation = net.image_encoder.config._attn_implementation
    return ViTForImageClassification(cfg)


def _steps(net, vit, batch) -> dict:
    image, label, mask = batch
    loss_fn = AlignerLoss(lambda_al=1.0)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-4)
    opt_vit = torch.optim.AdamW(vit.parameters(), lr=3e-4)
    ones, zeros = torch.ones_like(label), torch.zeros_like(label)

    def vlm_step(align, bf16=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(image)
            loss = loss_fn(out, label, mask, align)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def vit_step():
        logits = vit(pixel_values=image).logits
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, label)
        opt_vit.zero_grad(set_to_none=True)
        loss.backward()
        opt_vit.step()

    return {
        "vlm": lambda: vlm_step(ones),
        "vlm_ce": lambda: vlm_step(zeros),
        "vlm_bf16": lambda: vlm_step(ones, bf16=True),
        "vit": vit_step,
    }


def _measure(preset: str, overrides: dict, batch_size: int, reps: int, skip: tuple = ()) -> tuple[dict, dict, dict]:
    torch.manual_seed(0)
    net = build_aligner_vlm(preset, **overrides).train()
    vit = plain_vit(net).train()
    s, c = net.image_size, len(net.classes)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch_size, 1, s, s, generator=g)
    label = (torch.rand(batch_size, c, generator=g) > 0.5).float()
    label[:, 0] = 1.0  # at least one positive pair per image: the alignment loss always has work
    mask = torch.zeros(batch_size, c, s, s)
    mask[..., s // 4 : s // 2, s // 4 : s // 2] = 1.0
    variants = {k: v for k, v in _steps(net, vit, (image, label, mask)).items() if k not in skip}
    # warm-up: one step of each code path (first-call costs, AdamW state of both optimizers, bf16 kernels);
    # vlm_ce runs the same path as vlm with another selection, so it needs none (saves a paper-size step)
    for name in ("vlm", "vlm_bf16", "vit"):
        if name in variants:
            variants[name]()
    mem: dict[str, list[float]] = {}
    times = interleave(variants, reps, warmup=0, memory=mem)
    info = {
        "params_vlm_trainable_m": float(f"{sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6:.3g}"),
        "params_vlm_total_m": float(f"{sum(p.numel() for p in net.parameters()) / 1e6:.3g}"),
        "params_vit_m": float(f"{sum(p.numel() for p in vit.parameters()) / 1e6:.3g}"),
        "image_size": s,
        "batch": batch_size,
    }
    return times, mem, info


def run(quick: bool = False, tiny: bool = False, repeats: int | None = None) -> dict:
    sz = Sizes(quick, tiny, repeats)
    paper = {"text_encoder": "random-base"}
    configs = sz.pick(
        full=[("demo", {}, 32, sz.reps(7, 3), ()), ("paper", paper, 8, sz.reps(5, 2), ())],
        # paper size in the quick set: batch 1, and the alignment cost only at demo size (a paper step takes ~2 s
        # on an idle 2-core machine, ~15 s under load: each variant is two steps of the budget)
        quick=[("demo", {}, 32, sz.reps(7, 3), ()), ("paper", paper, 1, sz.reps(5, 2), ("vlm_ce",))],
        tiny=[("tiny", {**TINY}, 4, sz.reps(1, 1, 1), ())],
    )
    rows, details = [], {}
    for label, overrides, bsz, reps, skip in configs:
        preset = "demo" if label == "tiny" else label
        t, mem, info = _measure(preset, overrides, bsz, reps, skip)
        what = f"training, {label} ({info['image_size']} px, batch {bsz})"
        kw = {"per": bsz, "throughput": "images/s"}
        if "vlm_ce" in t:
            rows.append(
                time_row(
                    f"{what}: alignment cost", "L_CE + L_AL (p = 1)", "L_CE only (p = 0)", t["vlm"], t["vlm_ce"], **kw
                )
            )
        rows += [
            time_row(f"{what}: bf16 autocast", "bf16 autocast", "fp32", t["vlm_bf16"], t["vlm"], **kw),
            time_row(
                f"{what}: VLM vs plain ViT",
                f"AlignerVLM ({info['params_vlm_trainable_m']}M trainable)",
                f"plain ViT ({info['params_vit_m']}M)",
                t["vlm"],
                t["vit"],
                **kw,
                note="the plain ViT is the VLM's own image encoder with a linear head: the ratio is the cost of the "
                "text queries, fusion layers and alignment head",
            ),
            memory_row(f"{what}: peak memory, VLM vs plain ViT", "AlignerVLM", "plain ViT", mem["vlm"], mem["vit"]),
            memory_row(f"{what}: peak memory, bf16 vs fp32", "bf16 autocast", "fp32", mem["vlm_bf16"], mem["vlm"]),
        ]
        details[label] = {
            **info,
            "step_s": {k: sorted(v) for k, v in t.items()},
            "peak_rss_growth_mb": {k: round(v[0], 1) for k, v in mem.items()},
        }
        if label == "demo":
            med = sorted(t["vlm"])[len(t["vlm"]) // 2]
            details[label]["epoch_s_projected"] = round(EPOCH_IMAGES / bsz * med, 1)
    return {
        "description": __doc__.split("\n\n")[0].replace("\n", " ")
        + " Variants interleaved per step; images/s = batch / median step time.",
        "threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "rows": rows,
        "details": details,
    }
