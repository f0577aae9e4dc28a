"""The DICOM factory: radiographs built with pydicom, uncompressed or compressed with ``Dataset.compress``.

One builder for the synthetic generator (site B), the benchmarks and the tests, so every DICOM the project writes
follows the same rules (file meta, SOP class, pixel module) and a fix lands everywhere at once.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid


def phantom(h: int = 96, w: int = 80, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A chest-like attenuation map in [0, 1]: two low-attenuation (dark on display) lungs inside a brighter body.

    Returns float64 attenuation (display convention: lung low, mediastinum/bone high); callers quantise it.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    att = np.full((h, w), 0.75)
    for cx in (0.3 * w, 0.7 * w):
        lung = ((xx - cx) / (0.17 * w)) ** 2 + ((yy - 0.5 * h) / (0.33 * h)) ** 2 < 1
        att[lung] = 0.2
    att += rng.normal(0, 0.01, (h, w))
    return att.clip(0, 1)


def lung_masks(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(lung mask, mediastinum mask) of ``phantom`` (the mediastinum strip between the lungs)."""
    yy, xx = np.mgrid[0:h, 0:w]
    lung = np.zeros((h, w), bool)
    for cx in (0.3 * w, 0.7 * w):
        lung |= ((xx - cx) / (0.17 * w)) ** 2 + ((yy - 0.5 * h) / (0.33 * h)) ** 2 < 0.8
    med = (np.abs(xx - 0.5 * w) < 0.05 * w) & (np.abs(yy - 0.5 * h) < 0.25 * h)
    return lung, med


def make_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    window: tuple | None = None,
    voi_lut: tuple | None = None,
    rescale: tuple | None = None,
    modality_lut: tuple | None = None,
    modality: str | None = "DX",
    sex: str | None = "F",
    age: str | None = "045Y",
    view: str | None = "PA",
    presentation_shape: str | None = None,
    with_pixels: bool = True,
    frames: int = 1,
    patient_id: str | None = "P1",
    pixel_spacing: tuple | None = (0.2, 0.2),
    sop_class_uid: str = DigitalXRayImageStorageForPresentation,
    sop_instance_uid: str | None = None,
    extra: Mapping | None = None,
    file_meta_extra: Mapping | None = None,
) -> Dataset:
    """Dataset with the given stored pixels (uint8/uint16/int16 (H, W) or (F, H, W) when frames > 1).

    window: (center, width) or ([c1, c2], [w1, w2]); voi_lut / modality_lut: (first_map, bits, data list);
    rescale: (slope, intercept). ``extra`` sets further data elements by keyword (applied last, so it may
    override any default), ``file_meta_extra`` further file meta elements; ``sop_instance_uid`` defaults to a
    new random UID (pass a derived one for reproducible files).
    """
    pixels = np.asarray(pixels)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid or generate_uid()
    for k, v in (file_meta_extra or {}).items():
        setattr(ds.file_meta, k, v)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    if patient_id is not None:
        ds.PatientID = patient_id
    if modality is not None:
        ds.Modality = modality
    if sex is not None:
        ds.PatientSex = sex
    if age is not None:
        ds.PatientAge = age
    if view is not None:
        ds.ViewPosition = view
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if pixels.dtype.itemsize == 1 else 16
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    if frames > 1:
        ds.NumberOfFrames = frames
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if modality_lut is not None:
        ds.ModalityLUTSequence = Sequence([_lut_item(*modality_lut)])
        ds.ModalityLUTSequence[0].ModalityLUTType = "US"
    if voi_lut is not None:
        ds.VOILUTSequence = Sequence([_lut_item(*voi_lut)])
    if presentation_shape is not None:
        ds.PresentationLUTShape = presentation_shape
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    if with_pixels:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def _lut_item(first_map: int, bits: int, data) -> Dataset:
    item = Dataset()
    data = [int(v) for v in data]
    item.LUTDescriptor = [len(data) if len(data) < 65536 else 0, int(first_map), int(bits)]
    item["LUTDescriptor"].VR = "US" if first_map >= 0 else "SS"
    item.LUTData = data
    item["LUTData"].VR = "US"
    return item


def write(ds: Dataset, path, transfer_syntax=None, preamble: bool = True, encoding_plugin: str = "") -> str:
    """Save ``ds`` (a copy compressed with ``transfer_syntax`` when given) and return the path."""
    import copy

    if transfer_syntax is not None:
        ds = copy.deepcopy(ds)
        ds.compress(transfer_syntax, encoding_plugin=encoding_plugin)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=False, little_endian=True)
    return str(path)
