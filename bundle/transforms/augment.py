"""Joint image/attention-mask augmentation for training (MONAI RandAffined/RandFlipd + intensity on the image).

Horizontal flip is OFF by default: chest radiographs are not left-right symmetric (heart on the patient's left,
the image's right on a PA view; aortic knob, gastric bubble, liver), and a flipped film is a different, implausible
anatomy whose laterality a model could otherwise learn to ignore; it would also mix left/right-specific findings.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping

import numpy as np
from monai.transforms import MapTransform, RandAdjustContrastd, RandAffined, RandFlipd, RandGaussianNoised, Randomizable
from monai.utils import MAX_SEED

__all__ = ["JointAugmentd"]


class JointAugmentd(Randomizable, MapTransform):
    """Random affine (+ optional flip) applied with the SAME parameters to image and mask; intensity on the image.

    Args:
        image_key, mask_key: the image (bilinear) and the attention mask (nearest, stays in {0, 1}); the mask may
            be missing from a record.
        prob: probability of the affine.
        rotate_deg: max |rotation| in degrees.
        scale: max relative zoom (0.1 -> factor in [0.9, 1.1]).
        translate: max shift as a fraction of the image side.
        flip_prob: probability of a left-right flip (default 0: see the module docstring).
        intensity: strength s of intensity changes (image only), each applied with probability ``prob``:
            gamma in [1 / (1 + s), 1 + s] (RandAdjustContrastd) and Gaussian noise with std s / 10. 0 disables.
    Randomizable: ``set_random_state`` / ``monai.utils.set_determinism`` make it reproducible; sub-transforms are
    seeded from this transform's generator. Pickles for DataLoader workers.
    """

    def __init__(
        self,
        image_key: str = "image",
        mask_key: str = "attn_mask",
        prob: float = 0.5,
        rotate_deg: float = 10.0,
        scale: float = 0.1,
        translate: float = 0.05,
        flip_prob: float = 0.0,
        intensity: float = 0.2,
    ) -> None:
        MapTransform.__init__(self, [image_key, mask_key], allow_missing_keys=True)
        for name, v in (("prob", prob), ("flip_prob", flip_prob)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"JointAugmentd: {name} must be in [0, 1], got {v}")
        for name, v in (
            ("rotate_deg", rotate_deg),
            ("scale", scale),
            ("translate", translate),
            ("intensity", intensity),
        ):
            if v < 0:
                raise ValueError(f"JointAugmentd: {name} must be >= 0, got {v}")
        if scale >= 1:
            raise ValueError(f"JointAugmentd: scale must be < 1 (relative zoom), got {scale}")
        self.image_key, self.mask_key = image_key, mask_key
        self.prob, self.rotate_deg, self.scale, self.translate = prob, rotate_deg, scale, translate
        self.flip_prob, self.intensity = flip_prob, intensity
        keys = [image_key, mask_key]
        self._flip = RandFlipd(keys, prob=flip_prob, spatial_axis=1, allow_missing_keys=True)  # axis 1 = columns
        self._intensity = []
        if intensity > 0:
            self._intensity = [
                RandAdjustContrastd(image_key, prob=prob, gamma=(1.0 / (1.0 + intensity), 1.0 + intensity)),
                RandGaussianNoised(image_key, prob=prob, mean=0.0, std=intensity / 10.0),
            ]
        self._affines: dict[tuple[int, int], RandAffined] = {}  # translate is in pixels: one per image size
        self._affine_seed = 0
        self.set_random_state(seed=0)

    def _affine(self, hw: tuple[int, int]) -> RandAffined:
        aff = self._affines.get(hw)
        if aff is None:
            aff = RandAffined(
                keys=[self.image_key, self.mask_key],
                prob=self.prob,
                rotate_range=(math.radians(self.rotate_deg),),
                scale_range=(self.scale, self.scale),
                translate_range=(self.translate * hw[0], self.translate * hw[1]),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                allow_missing_keys=True,
            )
            aff.set_random_state(seed=self._affine_seed)
            self._affines[hw] = aff
        return aff

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self._flip.set_random_state(seed=int(self.R.randint(MAX_SEED)))
        for t in self._intensity:
            t.set_random_state(seed=int(self.R.randint(MAX_SEED)))
        self._affine_seed = int(self.R.randint(MAX_SEED))
        for aff in self._affines.values():
            aff.set_random_state(seed=self._affine_seed)
        return self

    def randomize(self, data: Any = None) -> None:
        """The MONAI sub-transforms draw their own parameters; nothing to draw here."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        img = d[self.image_key]
        hw = (int(img.shape[-2]), int(img.shape[-1]))
        if self.mask_key in d and tuple(d[self.mask_key].shape[-2:]) != hw:
            raise ValueError(
                f"JointAugmentd: {self.mask_key} shape {tuple(d[self.mask_key].shape)} does not match "
                f"{self.image_key} {tuple(img.shape)}; rasterise attention at the image size"
            )
        d = self._affine(hw)(d)
        d = self._flip(d)
        for t in self._intensity:
            d = t(d)
        return d
