"""The application graph (MONAI Deploy App SDK 4.0, Holoscan):

StudyLoaderOperator (SDK DICOMDataLoaderOperator + header check) --dicom_study_list--> DICOMSeriesSelectorOperator
    --study_selected_series_list--> CXRLoaderOperator (also gets dicom_study_list, to explain what was left out)
    --images--> CXRInferenceOperator --results--> FindingsSRWriterOperator (OUT/sr) and HeatmapSCWriterOperator
    (OUT/sc)
"""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application
from monai.deploy.operators import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_utils import ModelInfo

from bundle.deploy.model import ModelSpec, load_parser, model_identity
from bundle.deploy.operators import (
    CXRInferenceOperator,
    CXRLoaderOperator,
    FindingsSRWriterOperator,
    HeatmapSCWriterOperator,
    StudyLoaderOperator,
)
from bundle.deploy.rules import selector_rules

logger = logging.getLogger(__name__)


class CXRFindingsApp(Application):
    """Frontal chest radiographs of a DICOM study folder -> findings SR + attention-overlay SC per image.

    ``sdk_argv`` are the SDK's own arguments (program name first: -i, -o, -m, -l); ``spec`` the model's config.
    """

    name = "cxr_findings"
    description = "Chest X-ray findings (nodule/mass, pleural effusion, edema) with attention overlays"
    version = "0.1.0"

    def __init__(self, sdk_argv: list[str], spec: ModelSpec, *args, **kwargs):
        self.sdk_argv = list(sdk_argv)
        self.spec = spec
        super().__init__(*args, **kwargs)

    def compose(self):
        ctx = Application.init_app_context(self.sdk_argv)
        out = Path(ctx.output_path)
        parser = load_parser(self.spec)
        model_info = ModelInfo(**model_identity(self.spec.model_path))
        logger.info(f"Model {model_info.name} {model_info.version} (UID {model_info.uid}) from {self.spec.model_path}")

        loader = StudyLoaderOperator(
            self, CountCondition(self, 1), input_folder=Path(ctx.input_path), must_load=False, name="study_loader"
        )
        selector = DICOMSeriesSelectorOperator(self, rules=selector_rules(), all_matched=True, name="series_selector")
        cxr = CXRLoaderOperator(self, parser=parser, name="cxr_loader")
        infer = CXRInferenceOperator(self, spec=self.spec, parser=parser, name="inference")
        sr = FindingsSRWriterOperator(self, output_folder=out / "sr", model_info=model_info, name="sr_writer")
        sc = HeatmapSCWriterOperator(self, output_folder=out / "sc", name="sc_writer")

        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(loader, cxr, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, cxr, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(cxr, infer, {("images", "images")})
        self.add_flow(infer, sr, {("results", "results")})
        self.add_flow(infer, sc, {("results", "results")})
