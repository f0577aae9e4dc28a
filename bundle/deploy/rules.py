"""Which DICOM images the app accepts: the selection rules of the SDK's series selector, and the reasons it gives
for what it leaves out.

One table serves both: DICOMSeriesSelectorOperator gets it as its JSON rules (series level, first instance), and
:func:`rejection_reasons` re-checks every instance with it, because the SDK selector neither explains a rejection
nor looks past a series' first instance.
"""

from __future__ import annotations

import json
import re

# DICOM keyword -> (regular expression the whole value must match, case-insensitive; what is expected, for humans)
CONDITIONS = {
    "Modality": (r"CR|DX", "CR or DX"),
    "BodyPartExamined": (r"CHEST|THORAX", "CHEST"),
    "ViewPosition": (r"PA|AP", "a frontal view (PA or AP)"),
}


def selector_rules() -> str:
    """The rules JSON of ``DICOMSeriesSelectorOperator`` (anchored: the SDK otherwise also accepts a substring)."""
    conditions = {key: f"(?i)^({pattern})$" for key, (pattern, _) in CONDITIONS.items()}
    return json.dumps({"selections": [{"name": "CXR frontal", "conditions": conditions}]})


def rejection_reasons(ds) -> list[str]:
    """Why a pydicom dataset is not a frontal chest radiograph ([] when it is)."""
    reasons = []
    for key, (pattern, expected) in CONDITIONS.items():
        value = str(ds.get(key, "") or "").strip()
        if not re.fullmatch(pattern, value, flags=re.IGNORECASE):
            reasons.append(f"{key} is {value or 'missing'!r}, expected {expected}")
    return reasons
