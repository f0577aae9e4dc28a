"""Results -> one DICOM Secondary Capture per source image (highdicom): the image with the attention map of its
most probable finding overlaid, in the source image's geometry (rows, columns, pixel spacing), in its study, and
referencing the source image and series."""

from __future__ import annotations

import logging
import os

import highdicom as hd
import numpy as np
import torch
import torch.nn.functional as F
from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from bundle.transforms import load_cxr

logger = logging.getLogger(__name__)

ALPHA = 0.35  # heatmap opacity, as in the bundle's overlay figures (bundle/plots.py)


def unletterbox_map(attn: np.ndarray, letterbox, out_hw) -> np.ndarray:
    """An (S, S) map over the letterboxed image -> (H, W) over the source image (the content crop, resized
    bilinearly: the inverse of Letterboxd, cf. ``bundle.transforms.unletterbox_points``)."""
    scale, top, left, oh, ow = (float(v) for v in letterbox)
    nh, nw = max(1, int(round(oh * scale))), max(1, int(round(ow * scale)))
    crop = torch.as_tensor(attn[int(top) : int(top) + nh, int(left) : int(left) + nw], dtype=torch.float32)
    up = F.interpolate(crop[None, None], size=tuple(int(v) for v in out_hw), mode="bilinear", align_corners=False)
    return up[0, 0].numpy()


def overlay(grey: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(H, W) grey in [0, 1] and a heatmap -> (H, W, 3) uint8 RGB with the jet colour map."""
    from matplotlib import colormaps

    heat = heat - heat.min()
    heat = heat / heat.max() if heat.max() > 0 else heat
    rgb = np.repeat(grey[..., None], 3, axis=-1) * (1 - ALPHA) + colormaps["jet"](heat)[..., :3] * ALPHA
    return (rgb.clip(0, 1) * 255 + 0.5).astype(np.uint8)


def references(src) -> dict:
    """Source Image Sequence and Referenced Series Sequence items pointing at the source image."""
    image = Dataset()
    image.ReferencedSOPClassUID = src.SOPClassUID
    image.ReferencedSOPInstanceUID = src.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = src.SeriesInstanceUID
    series.ReferencedInstanceSequence = Sequence([image])
    return {"SourceImageSequence": Sequence([image]), "ReferencedSeriesSequence": Sequence([series])}


def build_sc(result: dict, series_uid: str, instance_number: int) -> hd.sc.SCImage:
    src = result["dataset"]
    grey = load_cxr(result["path"])  # full resolution, display convention (same LUTs as the model input)
    best = int(np.argmax(result["probs"]))
    heat = unletterbox_map(result["attn"][best], result["letterbox"], grey.shape)
    spacing = src.get("PixelSpacing") or src.get("ImagerPixelSpacing")
    orientation = src.get("PatientOrientation") or ["L", "F"]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=src,
        pixel_array=overlay(grey, heat),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=9002,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer="MONAI Deploy App SDK",
        pixel_spacing=tuple(float(v) for v in spacing) if spacing else None,
        patient_orientation=tuple(str(v) for v in orientation[:2]),
    )
    for key, value in references(src).items():
        setattr(sc, key, value)
    finding = result["classes"][best]
    sc.SeriesDescription = "AI attention overlay, not for diagnostic use"
    sc.DerivationDescription = f"Attention map of {finding} (p={float(result['probs'][best]):.3f}) over the source"
    sc.BurnedInAnnotation = "NO"
    return sc


class HeatmapSCWriterOperator(Operator):
    """Input ``results``; writes ``<output_folder>/<SOPInstanceUID>.dcm``, one SC series per source series."""

    def __init__(self, fragment: Fragment, *args, output_folder, **kwargs):
        self.output_folder = str(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("results")

    def compute(self, op_input, op_output, context):
        results = op_input.receive("results") or []
        os.makedirs(self.output_folder, exist_ok=True)
        series_uids: dict[str, str] = {}
        for number, result in enumerate(results, start=1):
            series_uid = series_uids.setdefault(str(result["dataset"].SeriesInstanceUID), generate_uid())
            try:
                sc = build_sc(result, series_uid, number)
                path = os.path.join(self.output_folder, f"{sc.SOPInstanceUID}.dcm")
                sc.save_as(path, enforce_file_format=True)
            except Exception as e:  # one bad image must not cost the others their overlays
                logger.warning(f"No overlay for {result['path']}: {type(e).__name__}: {e}")
                continue
            logger.info(f"Overlay for {result['path']} saved in {path}")
