"""Inference latency and memory: the inference workflow's own pieces at batch 1 and 32, with and without overlays.

The pipeline of configs/inference.yaml, built in Python without the config parser: ``SkipFailedDataset`` with
``LoadCXRd(target_size) -> Letterboxd -> CXRIntensityd``, a DataLoader (no worker processes: latency of one
process), ``AlignmentEvaluator`` with ``SimpleInferer`` on the demo AlignerVLM (random weights: speed does not
depend on them), and ``InferenceWriter`` (predictions CSV/JSON, attention peaks in original pixels; ``save_maps``
off; ``save_overlays`` on or off: one PNG per image at the original geometry, one panel per finding).
Files: 16-bit grey chest phantoms as PNG (the synthetic benchmark's format, at a larger size). Time per image is the
wall time of a whole run (engine start to the CSV written) divided by the images in it.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import torch

from bundle.benchmarks._common import Sizes, interleave, memory_row, time_row


def _write_pngs(d: str, n: int, h: int, w: int) -> list[str]:
    from PIL import Image

    from bundle.benchmarks.pipeline import _phantom

    paths = []
    for i in range(n):
        arr = (65535 - _phantom(h, w, i, bits=16)).astype(np.uint16)  # display convention: lungs dark
        p = os.path.join(d, f"cxr_{i:03d}.png")
        Image.fromarray(arr).save(p, compress_level=1)
        paths.append(p)
    return paths


def _runner(net, paths: list[str], image_size: int, out_dir: str):
    from monai.data import DataLoader
    from monai.inferers import SimpleInferer
    from monai.transforms import Compose, EnsureTyped, SelectItemsd

    from bundle.engines import AlignmentEvaluator
    from bundle.handlers import InferenceWriter
    from bundle.inference import SkipFailedDataset
    from bundle.transforms import CXRIntensityd, Letterboxd, LoadCXRd

    pre = Compose(
        [
            LoadCXRd(keys="image", target_size=image_size),
            Letterboxd(keys="image", size=image_size),
            CXRIntensityd(keys="image"),
            SelectItemsd(keys=["image", "index", "letterbox"]),
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        ]
    )
    classes = list(net.classes)

    def run(batch_size: int, n_images: int, overlays: bool) -> None:
        records = [{"image": p, "index": i} for i, p in enumerate(paths[:n_images])]
        ds = SkipFailedDataset(records, transform=pre, image_size=image_size)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
        folder = os.path.join(out_dir, f"b{batch_size}_{int(overlays)}")
        shutil.rmtree(folder, ignore_errors=True)
        writer = InferenceWriter(folder, records, classes, save_overlays=overlays, save_maps=False)
        ev = AlignmentEvaluator(
            device=torch.device("cpu"),
            val_data_loader=loader,
            network=net,
            inferer=SimpleInferer(),
            val_handlers=[writer],
        )
        ev.run()
        if len(writer.results) != n_images:
            raise RuntimeError(f"inference benchmark: {len(writer.results)} of {n_images} images scored")

    return run


def run(quick: bool = False, tiny: bool = False, repeats: int | None = None) -> dict:
    from bundle.benchmarks.network import TINY
    from bundle.networks import build_aligner_vlm

    sz = Sizes(quick, tiny, repeats)
    h, w = sz.pick((1024, 896), (256, 224), (64, 56))  # quick: the synthetic benchmark's 256 px
    big = sz.pick(32, 32, 4)  # the large batch, and the images it runs on
    n1 = sz.pick(16, 8, 2)  # images run at batch 1
    reps = sz.reps(5, 2, 1)
    torch.manual_seed(0)
    net = build_aligner_vlm("demo", **(TINY if sz.mode == "tiny" else {})).eval()
    tmp = tempfile.mkdtemp(prefix="bench_inference_")
    try:
        os.makedirs(os.path.join(tmp, "in"))
        paths = _write_pngs(os.path.join(tmp, "in"), big, h, w)
        go = _runner(net, paths, net.image_size, os.path.join(tmp, "out"))
        variants = {
            "b1": lambda: go(1, n1, False),
            "b1_overlays": lambda: go(1, n1, True),
            f"b{big}": lambda: go(big, big, False),
            f"b{big}_overlays": lambda: go(big, big, True),
        }
        per = {"b1": n1, "b1_overlays": n1, f"b{big}": big, f"b{big}_overlays": big}
        if sz.mode != "tiny":  # warm-up (imports, first-call costs) on the cheap variants: same code paths
            go(1, 2, False)
            go(1, 2, True)
        mem: dict[str, list[float]] = {}
        t = interleave(variants, reps, warmup=0, memory=mem)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    img = {k: [x / per[k] for x in v] for k, v in t.items()}  # seconds per image
    what = f"inference, demo network, {h} x {w} PNG"
    ms = {"unit": "ms/image", "scale": 1e3}
    rows = [
        time_row(f"{what}: batch {big} vs batch 1", f"batch {big}", "batch 1", img[f"b{big}"], img["b1"], **ms),
        time_row(
            f"{what}, batch 1: overlays cost", "with overlays", "without overlays", img["b1_overlays"], img["b1"], **ms
        ),
        time_row(
            f"{what}, batch {big}: overlays cost",
            "with overlays",
            "without overlays",
            img[f"b{big}_overlays"],
            img[f"b{big}"],
            **ms,
            note="ratio < 1 is the price of the overlay PNGs (full-resolution reload + one panel per finding)",
        ),
        memory_row(
            f"{what}: peak memory, batch {big} vs batch 1", f"batch {big}", "batch 1", mem[f"b{big}"], mem["b1"]
        ),
    ]
    return {
        "description": __doc__.split("\n\n")[0].replace("\n", " ")
        + " Time per image = wall time of a whole run / images; peak memory = resident-memory growth of one run.",
        "rows": rows,
        "details": {
            "image_size": [h, w],
            "network_input": net.image_size,
            "images_batch1": n1,
            "images_large_batch": big,
            "ms_per_image": {k: sorted(round(1e3 * x, 1) for x in v) for k, v in img.items()},
            "peak_rss_growth_mb": {k: round(v[0], 1) for k, v in mem.items()},
        },
    }
