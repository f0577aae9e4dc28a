"""Results -> one DICOM Secondary Capture per source image (highdicom): the image with the attention map of its
most probable finding overlaid, in the source image's geometry (rows, columns, pixel spacing), in its study, and
referencing the source image and series."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from bundle.deploy.operators.writer import PerImageWriterOperator
from bundle.plots import blend_heatmap
from bundle.transforms import load_cxr

ALPHA = 0.35  # heatmap opacity, as in the bundle's overlay figures (bundle/plots.py)


def unletterbox_map(attn: np.ndarray, letterbox, out_hw) -> np.ndarray:
    """An (S, S) map over the letterboxed image -> (H, W) over the source image (the content crop, resized
    bilinearly: the inverse of Letterboxd, cf. ``bundle.transforms.unletterbox_points``)."""
    scale, top, left, oh, ow = (float(v) for v in letterbox)
    nh, nw = max(1, int(round(oh * scale))), max(1, int(round(ow * scale)))
    crop = torch.as_tensor(attn[int(top) : int(top) + nh, int(left) : int(left) + nw], dtype=torch.float32)
    up = F.interpolate(crop[None, None], size=tuple(int(v) for v in out_hw), mode="bilinear", align_corners=False)
    return up[0, 0].numpy()


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
        pixel_array=blend_heatmap(grey, heat, ALPHA),
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


class HeatmapSCWriterOperator(PerImageWriterOperator):
    """Input ``results``; writes ``<output_folder>/<SOPInstanceUID>.dcm``, one SC series per source series."""

    kind = "Overlay"

    def build(self, result: dict, series_uid: str, number: int):
        return build_sc(result, series_uid, number)
