"""The loop the DICOM writers of the app share: one object per source image, written to
``<output_folder>/<SOPInstanceUID>.dcm``, one output series per source series; an image that fails is logged and
skipped, never costing the others their output."""

from __future__ import annotations

import logging
import os

from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.uid import generate_uid

logger = logging.getLogger(__name__)


class PerImageWriterOperator(Operator):
    """Input ``results`` (one dict per source image, with its pydicom ``dataset`` and ``path``). Subclasses give
    ``build(result, series_uid, number)`` -> a pydicom Dataset and ``kind``, the word used in the log lines."""

    kind = "Output"

    def __init__(self, fragment: Fragment, *args, output_folder, **kwargs):
        self.output_folder = str(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("results")

    def build(self, result: dict, series_uid: str, number: int):
        raise NotImplementedError

    def compute(self, op_input, op_output, context):
        results = op_input.receive("results") or []
        os.makedirs(self.output_folder, exist_ok=True)
        series_uids: dict[str, str] = {}
        for number, result in enumerate(results, start=1):
            series_uid = series_uids.setdefault(str(result["dataset"].SeriesInstanceUID), generate_uid())
            try:
                ds = self.build(result, series_uid, number)
                path = os.path.join(self.output_folder, f"{ds.SOPInstanceUID}.dcm")
                ds.save_as(path, enforce_file_format=True)
            except Exception as e:  # one bad image must not cost the others their output
                logger.warning(f"No {self.kind} for {result['path']}: {type(e).__name__}: {e}")
                continue
            logger.info(f"{self.kind} for {result['path']} saved in {path}")
