"""Selected DICOM series -> model inputs, with the bundle's own loading (``preprocessing`` of the inference config:
LoadCXRd with the modality and VOI LUTs and MONOCHROME1 inversion, Letterboxd, CXRIntensityd), as in training.

Written because the SDK's DICOMSeriesToVolumeOperator applies no VOI LUT or window, inverts MONOCHROME1 only with a
Presentation LUT, and builds no usable geometry for a single-frame radiograph (docs/deploy.md).
"""

from __future__ import annotations

import logging

from monai.deploy.core import Fragment, Operator, OperatorSpec

from bundle.deploy.rules import rejection_reasons
from bundle.transforms import letterbox_params

logger = logging.getLogger(__name__)


def root_cause(e: BaseException) -> BaseException:
    """The innermost exception (MONAI wraps a transform's error in 'applying transform ...')."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e


class CXRLoaderOperator(Operator):
    """Inputs ``dicom_study_list`` and ``study_selected_series_list``; output ``images``: a list of dicts with
    ``image`` (1, S, S) float32, ``dataset`` (the source pydicom Dataset), ``path`` and ``letterbox``.

    Logs why every series the selector left out, and every instance it cannot use, is skipped, naming the files.
    """

    def __init__(self, fragment: Fragment, *args, parser, **kwargs):
        self.transform = parser.get_parsed_content("preprocessing", instantiate=True)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("dicom_study_list")
        spec.input("study_selected_series_list")
        spec.output("images")

    def compute(self, op_input, op_output, context):
        studies = op_input.receive("dicom_study_list") or []
        selections = op_input.receive("study_selected_series_list") or []
        selected = [s.series for study in selections for s in study.selected_series]
        chosen = {series.SeriesInstanceUID for series in selected}
        for study in studies:
            for series in study.get_all_series():
                if series.SeriesInstanceUID not in chosen:
                    log_skipped_series(series)
        if not selected:
            logger.warning("No frontal chest CR/DX series in the input: nothing to report")
        images = [item for series in selected for item in self.load_series(series)]
        logger.info(f"{len(images)} chest radiograph(s) loaded from {len(selected)} series")
        op_output.emit(images, "images")

    def load_series(self, series) -> list[dict]:
        out = []
        datasets = [sop.get_native_sop_instance() for sop in series.get_sop_instances()]
        for ds in sorted(datasets, key=lambda d: int(d.get("InstanceNumber", 0) or 0)):
            path = str(getattr(ds, "filename", "") or ds.SOPInstanceUID)
            reasons = rejection_reasons(ds)
            if reasons:
                logger.warning(f"Skipped {path}: {'; '.join(reasons)}")
                continue
            try:
                image = self.transform({"image": path, "index": len(out)})["image"]
                lb = letterbox_params(int(ds.Rows), int(ds.Columns), int(image.shape[-1]))
            except Exception as e:  # a damaged file must not end the run: report it and go on
                cause = root_cause(e)
                logger.warning(f"Skipped {path}: {type(cause).__name__}: {cause}")
                continue
            out.append({"image": image, "dataset": ds, "path": path, "letterbox": lb})
        return out


def log_skipped_series(series) -> None:
    """One warning per left-out series: its files (the first three) and why."""
    datasets = [sop.get_native_sop_instance() for sop in series.get_sop_instances()]
    files = [str(getattr(ds, "filename", "") or ds.SOPInstanceUID) for ds in datasets]
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    reasons = rejection_reasons(datasets[0]) if datasets else []
    why = "; ".join(reasons) or "not matched by the series selection rules"
    logger.warning(f"Skipped series {series.SeriesInstanceUID} ({shown}): {why}")
