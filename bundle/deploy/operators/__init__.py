"""The app's own operators (the SDK's DICOM loader and series selector are used as they are, or nearly)."""

from .cxr_loader import CXRLoaderOperator
from .inference import CXRInferenceOperator
from .sc_writer import HeatmapSCWriterOperator
from .sr_writer import FindingsSRWriterOperator
from .study_loader import StudyLoaderOperator
