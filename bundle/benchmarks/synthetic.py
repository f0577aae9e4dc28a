"""Speed of the synthetic benchmark generator: images/s per core at 256 px.

Baseline (same run, same process, one core): writing the same number of 256 x 256 16-bit noise PNGs
with PIL, i.e. the cost of just storing that many images. ``ratio_vs_noise_png`` = generator time /
baseline time (how many "plain image writes" one synthetic image with its masks costs). Goal:
>= 100 images/s per core for site A (issue 2).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np


def _noise_baseline(n: int, h: int, w: int, root: str) -> float:
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(n):
        arr = (rng.random((h, w), dtype=np.float32) * 65535).astype(np.uint16)
        Image.fromarray(arr).save(os.path.join(root, f"noise_{i}.png"), compress_level=1)
    return time.perf_counter() - t0


def run(quick: bool = False, tiny: bool = False, repeats: int | None = None) -> dict:
    from bundle.benchmarks._common import Sizes, interleave, time_row  # noqa: PLC0415
    from bundle.data import synthetic as S  # noqa: PLC0415

    sz = Sizes(quick, tiny, repeats)
    n_a = sz.pick(600, 60, 8)
    n_b = sz.pick(150, 6, 2)
    reps = sz.reps(3, 2, 1)
    root = tempfile.mkdtemp(prefix="bench_synthetic_")
    try:
        # warm-up (imports, caches) outside the timed region
        S.generate(
            os.path.join(root, "warm"),
            0,
            S.SyntheticParams(n_train=8, n_val=0, n_test=0, n_ood=2),
            workers=1,
            progress=False,
        )
        pa = S.SyntheticParams(n_train=n_a, n_val=0, n_test=0, n_ood=0)
        os.makedirs(os.path.join(root, "noise"))
        k = iter(range(10**6))

        def gen_a():
            S.generate(os.path.join(root, f"a{next(k)}"), 0, pa, workers=1, progress=False)

        def noise():
            _noise_baseline(n_a, *pa.size_a, os.path.join(root, "noise"))

        # the generator and the plain PNG writes interleaved, so that other jobs slow both alike
        t = interleave({"generator": gen_a, "noise_png": noise}, reps, warmup=0)
        t_a, t_noise = (
            sorted(t["generator"])[len(t["generator"]) // 2],
            sorted(t["noise_png"])[len(t["noise_png"]) // 2],
        )
        pb = S.SyntheticParams(n_train=0, n_val=0, n_test=0, n_ood=n_b)
        t0 = time.perf_counter()
        S.generate(os.path.join(root, "b"), 0, pb, workers=1, progress=False)
        t_b = time.perf_counter() - t0
        # render only (no files): how the time splits between drawing and encoding
        planned = S.plan(0, pa)["training"][: sz.pick(n_a, 20, 4)]
        t0 = time.perf_counter()
        for item in planned:
            S.render(item, 0, pa)
        t_render = time.perf_counter() - t0
        size_a = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, "a0")) for f in fs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    row = time_row(
        f"synthetic generator, site A {pa.size_a[0]} px, {n_a} images, one core",
        "generator (image + masks + datalist)",
        "writing 16-bit noise PNGs",
        t["generator"],
        t["noise_png"],
        per=n_a,
        throughput="images/s",
        note="ratio < 1 is expected: it is the cost of one synthetic image in plain image writes (goal: >= 100 "
        "images/s per core)",
    )
    return {
        "description": "synthetic benchmark generation speed (site A PNG) vs just writing as many noise PNGs.",
        "rows": [row],
        "images_site_a": n_a,
        "site_a_images_per_s_per_core": round(n_a / t_a, 1),
        "site_a_render_only_images_per_s": round(len(planned) / t_render, 1),
        "site_b_dicom_images_per_s_per_core": round(n_b / t_b, 1),
        "baseline_noise_png_images_per_s": round(n_a / t_noise, 1),
        "ratio_vs_noise_png": round(t_a / t_noise, 2),
        "site_a_mb_per_1000_images": round(size_a / n_a * 1000 / 1e6, 1),
        "goal_images_per_s_per_core": 100,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
