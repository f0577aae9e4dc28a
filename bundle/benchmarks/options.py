"""Speed options of the training step (docs/performance.md): threads, bf16 autocast, fused AdamW, channels-last, the
frozen-prompt cache, each against the default step measured in the same run.

One training step = forward + AlignerLoss + backward + grad clip + AdamW step of the demo network on a batch of
random images with masks (the step's cost does not depend on the pixel values). The variants are interleaved round
by round so that other load on the machine hits them alike; the median step of each is reported with its ratio to
the default (``ratio`` < 1: faster). The options are compared on one thread by the process's CPU time, which other
load on a shared machine barely changes (wall time does: it is reported too); the thread counts by wall time.
"""

from __future__ import annotations

import copy
import os
import statistics
import time

from bundle.benchmarks._common import time_row


def _batch(b: int, size: int, classes: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 1, size, size, generator=g)
    label = (torch.rand(b, classes, generator=g) > 0.5).float()
    mask = torch.zeros(b, classes, size, size)
    mask[:, :, size // 4 : size // 2, size // 3 : 2 * size // 3] = 1.0
    return image, label, mask, label.clone()


def run(quick: bool = False) -> dict:
    import torch

    from bundle.losses import AlignerLoss
    from bundle.networks import DEMO_PRESET, AlignerVLM
    from bundle.workflow import parameter_groups

    threads0 = torch.get_num_threads()
    b, reps = (8, 3) if quick else (32, 5)
    size = DEMO_PRESET["image_size"]
    torch.manual_seed(0)
    base_net = AlignerVLM(**{**DEMO_PRESET, "classes": ("nodule_mass", "pleural_effusion", "edema")})
    image, label, mask, align = _batch(b, size, 3)
    loss_fn = AlignerLoss(lambda_al=1.0, w_fp=2.0)

    def make(fused=False, uncached=False):
        net = copy.deepcopy(base_net).train()
        if uncached:  # what a step costs when the frozen encoder's prompts are recomputed every step
            from bundle.text import encode_prompts

            net.prompt_embeddings = lambda n=net: encode_prompts(
                n.text_encoder, n.prompt_ids, n.prompt_mask, n.text_pooling
            )
        opt = torch.optim.AdamW(parameter_groups(net, 0.02), lr=3e-4, fused=fused or None)
        return net, opt

    def step(net, opt, threads, amp=None, channels_last=False):
        torch.set_num_threads(threads)
        x = image.contiguous(memory_format=torch.channels_last) if channels_last else image
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
            losses = loss_fn(net(x), label, mask, align)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    n = max(2, os.cpu_count() or 2)  # all cores against one, whatever thread count the run set
    base_key = "fp32, 1 thread"
    variants = {
        base_key: (make(), dict(threads=1)),
        f"fp32, {n} threads": (make(), dict(threads=n)),
        "bf16 autocast": (make(), dict(threads=1, amp="bf16")),
        "fused AdamW": (make(fused=True), dict(threads=1)),
        "channels-last input": (make(), dict(threads=1, channels_last=True)),
        "prompts recomputed every step": (make(uncached=True), dict(threads=1)),
    }
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    try:
        for (net, opt), kw in variants.values():  # warm-up
            step(net, opt, **kw)
        for _ in range(reps):
            for k, ((net, opt), kw) in variants.items():
                times[k].append(step(net, opt, **kw))
    finally:
        torch.set_num_threads(threads0)
    wall0 = statistics.median(t[0] for t in times[base_key])
    cpu0 = statistics.median(t[1] for t in times[base_key])
    out = {"batch": b, "image_size": size, "repeats": reps, "baseline": base_key, "step_wall_s": {}, "step_cpu_s": {}}
    out.update(wall_ratio={}, cpu_ratio={})
    for k, ts in times.items():
        wall, cpu = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        out["step_wall_s"][k], out["step_cpu_s"][k] = round(wall, 4), round(cpu, 4)
        out["wall_ratio"][k], out["cpu_ratio"][k] = round(wall / wall0, 3), round(cpu / cpu0, 3)
    # table rows (ratio > 1: the option is faster), per repetition: CPU time for the one-thread options (other load
    # on a shared machine barely changes it), wall time for the thread count (CPU time cannot show its gain)
    out["rows"] = []
    for k in variants:
        if k == base_key:
            continue
        col = 0 if k.endswith("threads") else 1
        out["rows"].append(
            time_row(
                f"training step, demo ({size} px, batch {b}), {'wall' if col == 0 else 'CPU'} time",
                k,
                base_key,
                [t[col] for t in times[k]],
                [t[col] for t in times[base_key]],
                per=b,
                throughput="images/s",
            )
        )
    try:
        out["load_avg_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return out
