"""Image pipeline: loading (PNG/JPEG/DICOM), letterbox geometry, intensity, attention rasterising, augmentation."""
from .io import CXRLoadError, LoadCXRd, content_size, load_cxr, parse_dicom_age

__all__ = ["CXRLoadError", "LoadCXRd", "content_size", "load_cxr", "parse_dicom_age"]
