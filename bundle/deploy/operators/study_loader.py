"""The SDK's DICOM study loader, with a header check first that names every file it cannot use."""

from __future__ import annotations

import logging

from monai.deploy.operators import DICOMDataLoaderOperator

logger = logging.getLogger(__name__)

REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def header_problem(path: str) -> str | None:
    """Why ``path`` cannot join a study (None when its header is readable and has the UIDs a study needs)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:  # InvalidDicomError, EOFError, struct.error, ... on damaged or non-DICOM files
        return f"not a readable DICOM file ({type(e).__name__}: {e})"
    missing = [key for key in REQUIRED if not ds.get(key)]
    return f"DICOM header lacks {', '.join(missing)} (truncated or incomplete file?)" if missing else None


class StudyLoaderOperator(DICOMDataLoaderOperator):
    """DICOMDataLoaderOperator (output ``dicom_study_list``) that skips unusable files with a reason naming them.

    Written because the SDK loader catches only InvalidDicomError (any other read error ends the whole run) and
    logs a missing UID without the file's name. The header-only pre-read costs little (no pixel data).
    """

    def _load_data(self, files):
        usable = []
        for path in sorted(files):
            problem = header_problem(path)
            if problem:
                logger.warning(f"Skipped {path}: {problem}")
            else:
                usable.append(path)
        logger.info(f"{len(usable)} of {len(files)} files are DICOM instances")
        return super()._load_data(usable)
