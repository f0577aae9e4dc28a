"""Image pipeline as MONAI dictionary transforms (docs/image_pipeline.md).

LoadCXRd -> Letterboxd -> CXRIntensityd -> RasterizeAttentiond -> JointAugmentd (training only)
"""

from .attention import ATTENTION_TYPES, AttentionError, RasterizeAttentiond, rasterize_attention
from .augment import JointAugmentd
from .geometry import CXRIntensityd, Letterboxd, letterbox_params, letterbox_points, unletterbox_points
from .io import RADIOGRAPH_MODALITIES, CXRLoadError, LoadCXRd, content_size, load_cxr, parse_dicom_age

__all__ = [
    "ATTENTION_TYPES",
    "AttentionError",
    "CXRIntensityd",
    "CXRLoadError",
    "JointAugmentd",
    "Letterboxd",
    "LoadCXRd",
    "RADIOGRAPH_MODALITIES",
    "RasterizeAttentiond",
    "content_size",
    "letterbox_params",
    "letterbox_points",
    "load_cxr",
    "parse_dicom_age",
    "rasterize_attention",
    "unletterbox_points",
]
