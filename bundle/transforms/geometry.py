"""Letterbox geometry (aspect-preserving resize + centred pad to S x S) and robust intensity scaling.

Convention (docs/architecture.md): continuous pixel coordinates, pixel i covers [i, i+1); native (x, y) maps to
final (x * scale + pad_left, y * scale + pad_top) with scale = S / max(H, W); the content is resized to
(round(H * scale), round(W * scale)) (MONAI Resize size_mode="longest" rounding) and padded evenly, the odd pixel
at the end (MONAI SpatialPad method="symmetric").
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Resize, ScaleIntensityRange, SpatialPad

from .io import content_size

__all__ = ["letterbox_params", "letterbox_points", "unletterbox_points", "Letterboxd", "CXRIntensityd"]


def letterbox_params(h: int, w: int, size: int) -> np.ndarray:
    """float32 [scale, pad_top, pad_left, orig_h, orig_w] for an h x w image letterboxed into size x size."""
    if h < 1 or w < 1 or size < 1:
        raise ValueError(f"letterbox_params: sizes must be positive, got h={h}, w={w}, size={size}")
    nh, nw = content_size(h, w, size)
    return np.array([size / max(h, w), (size - nh) // 2, (size - nw) // 2, h, w], dtype=np.float32)


def letterbox_points(xy, letterbox) -> np.ndarray:
    """Map image-pixel (x, y) points, shape (..., 2), to final letterboxed pixels (same continuous convention)."""
    xy = np.asarray(xy, dtype=np.float64)
    scale, pad_top, pad_left = (float(v) for v in np.asarray(letterbox, dtype=np.float64)[:3])
    return np.stack([xy[..., 0] * scale + pad_left, xy[..., 1] * scale + pad_top], axis=-1)


def unletterbox_points(xy, letterbox) -> np.ndarray:
    """Inverse of ``letterbox_points``: final pixels -> image pixels (e.g. to draw model attention on the original)."""
    xy = np.asarray(xy, dtype=np.float64)
    scale, pad_top, pad_left = (float(v) for v in np.asarray(letterbox, dtype=np.float64)[:3])
    return np.stack([(xy[..., 0] - pad_left) / scale, (xy[..., 1] - pad_top) / scale], axis=-1)


class Letterboxd(MapTransform):
    """Resize so the longer side is ``size`` (aspect kept) and pad to ``size`` x ``size``; store ``d["letterbox"]``.

    Geometry comes from the native size ``d["orig_size"]`` when present (LoadCXRd sets it), else from the image:
    so an image already reduced by ``LoadCXRd(target_size=...)`` gets exactly the geometry of the full image.
    Built on MONAI ``Resize`` (explicit content size; ``size_mode="longest"`` would recompute the size from the
    possibly pre-reduced array and could round differently) and ``SpatialPad(method="symmetric")``.
    Output: torch MetaTensor (1, size, size) float32; padding value 0 (black).
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        size: int = 224,
        mode: str | Sequence[str] = "area",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.size = int(size)
        self.modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(self.modes) != len(self.keys):
            raise ValueError(f"Letterboxd: {len(self.modes)} modes for {len(self.keys)} keys")
        self._pad = SpatialPad(spatial_size=(self.size, self.size), method="symmetric", mode="constant")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        lb = None
        for key, mode in self.key_iterator(d, self.modes):
            img = d[key]
            if img.ndim != 3:
                raise ValueError(
                    f"Letterboxd: d[{key!r}] must be channel-first (C, H, W), " f"got shape {tuple(img.shape)}"
                )
            orig = d.get("orig_size")
            h, w = (int(v) for v in (img.shape[-2:] if orig is None else orig))
            self._check_aspect(img.shape[-2:], (h, w), key)
            lb = letterbox_params(h, w, self.size)
            nh, nw = content_size(h, w, self.size)
            if tuple(img.shape[-2:]) != (nh, nw):
                kw = {"anti_aliasing": False} if mode == "area" else {}
                img = Resize(spatial_size=(nh, nw), mode=mode, **kw)(img)
            img = self._pad(img)
            if isinstance(img, torch.Tensor) and img.dtype != torch.float32 and img.is_floating_point():
                img = img.float()
            d[key] = img
        if lb is not None:
            d["letterbox"] = lb
        return d

    @staticmethod
    def _check_aspect(shape, orig, key) -> None:
        h, w = (int(v) for v in shape)
        oh, ow = orig
        # a pre-reduced image must show the same field of view: h/oh == w/ow up to one pixel of rounding
        if abs(h * ow - w * oh) > max(oh, ow):
            raise ValueError(
                f"Letterboxd: d[{key!r}] has shape {(h, w)} but d['orig_size'] is {(oh, ow)} "
                "(different aspect); do not change the image geometry between LoadCXRd and Letterboxd"
            )


class CXRIntensityd(MapTransform):
    """Robust percentile scaling to [0, 1] (clipped), then optional (x - mean) / std.

    Percentiles are taken inside the letterbox content only when ``d["letterbox"]`` exists, so the black padding
    does not pull the lower percentile to 0; padding stays 0 before standardisation. Uses MONAI
    ``ScaleIntensityRange`` for the mapping (its percentile variant cannot exclude the padding).
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        lower: float = 0.5,
        upper: float = 99.5,
        mean: float | None = None,
        std: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"CXRIntensityd: need 0 <= lower < upper <= 100, got {lower}, {upper}")
        if (mean is None) != (std is None) or (std is not None and std <= 0):
            raise ValueError("CXRIntensityd: give both mean and std (std > 0) or neither")
        self.lower, self.upper, self.mean, self.std = lower, upper, mean, std

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        lb = d.get("letterbox")
        for key in self.key_iterator(d):
            img = d[key]
            arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
            region = arr
            if lb is not None:
                _, top, left, oh, ow = (float(v) for v in lb)
                nh, nw = content_size(int(oh), int(ow), arr.shape[-1])
                if arr.shape[-2] == arr.shape[-1]:
                    region = arr[..., int(top) : int(top) + nh, int(left) : int(left) + nw]
            lo, hi = (float(v) for v in np.percentile(region, [self.lower, self.upper]))
            if hi - lo < 1e-8:  # flat image: nothing to stretch
                out = img * 0 if isinstance(img, torch.Tensor) else np.zeros_like(arr)
            else:
                out = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(img)
            if self.mean is not None:
                out = (out - self.mean) / self.std
            d[key] = out
        return d
