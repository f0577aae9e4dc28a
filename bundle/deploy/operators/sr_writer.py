"""Results -> one DICOM Comprehensive SR (TID 1500 Measurement Report, written with highdicom) per source image.

Written instead of the SDK's DICOMTextSRWriterOperator, which writes a Basic Text SR with one free-text item per
run, copies the tags of the first selected series only, and cannot reference the source SOP instance. Here each
finding is a numeric content item (its probability), the source image is referenced in the measurement group and
in the evidence sequence, and the model's identity is recorded as in IHE AI Results (the device observer, the
algorithm identification and the Contributing Equipment Sequence, as the SDK's ModelInfo does).
"""

from __future__ import annotations

import highdicom as hd
from monai.deploy.core import Fragment
from monai.deploy.operators.dicom_utils import ModelInfo
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from bundle.deploy.operators.writer import PerImageWriterOperator

SCHEME = "99CXRAF"  # private coding scheme of this bundle's findings
PROBABILITY_UNIT = hd.sr.CodedConcept("1", "UCUM", "no units")


def finding_concept(name: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(name, SCHEME, f"Probability of {name.replace('_', ' ')}")


def algorithm_equipment(model: ModelInfo) -> Dataset:
    """A Contributing Equipment item for the model, as IHE AI Results asks and the SDK's ``write_common_modules``
    writes it (by hand: highdicom's ContributingEquipment refuses the 99IHE "Processing Algorithm" purpose)."""
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = "Newcode1", "99IHE", "Processing Algorithm"
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = model.creator
    item.ManufacturerModelName = model.name
    item.SoftwareVersions = model.version
    item.DeviceUID = model.uid
    return item


# Patient and General Study attributes of type 2 (present, may be empty) that highdicom copies from the evidence
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID")
TYPE2 += ("AccessionNumber", "ReferringPhysicianName")


def evidence_of(src: Dataset) -> Dataset:
    """The source header (a new dataset sharing its elements) with absent type 2 attributes added empty (many
    radiographs lack some)."""
    ds = Dataset(src)
    for key in TYPE2:
        if key not in ds:
            setattr(ds, key, "")
    return ds


def build_sr(result: dict, model: ModelInfo, series_uid: str, instance_number: int) -> hd.sr.ComprehensiveSR:
    """The SR of one result (see CXRInferenceOperator) in the source image's study."""
    src = evidence_of(result["dataset"])
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version or "unknown")
    measurements = [
        hd.sr.Measurement(name=finding_concept(c), value=float(p), unit=PROBABILITY_UNIT, algorithm_id=algorithm)
        for c, p in zip(result["classes"], result["probs"], strict=True)
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="AI findings"),
        algorithm_id=algorithm,
        measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(src)],
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=model.uid, name=model.name, manufacturer_name=model.creator or None, model_name=model.name
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray"),
        imaging_measurements=[group],
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[src],
        content=report,
        series_instance_uid=series_uid,
        series_number=9001,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer="MONAI Deploy App SDK",
        is_complete=True,
    )
    sr.ContributingEquipmentSequence = [*sr.get("ContributingEquipmentSequence", []), algorithm_equipment(model)]
    sr.SeriesDescription = f"Research use only: AI findings, {model.name} {model.version}"[:64]
    return sr


class FindingsSRWriterOperator(PerImageWriterOperator):
    """Input ``results``; writes ``<output_folder>/<SOPInstanceUID>.dcm``, one SR series per source series."""

    kind = "SR"

    def __init__(self, fragment: Fragment, *args, output_folder, model_info: ModelInfo, **kwargs):
        self.model_info = model_info
        super().__init__(fragment, *args, output_folder=output_folder, **kwargs)

    def build(self, result: dict, series_uid: str, number: int):
        return build_sr(result, self.model_info, series_uid, number)
