"""Dataset converters: public chest X-ray datasets, as downloaded, -> the bundle's datalist (docs/datasets.md).

One module per dataset (``nih``, ``vindr``, ``chexpert`` (+ CheXlocalize), ``mimic``, ``padchest``, ``jsrt``),
each declaring its converters and their command-line options in ``CONVERTERS``; :mod:`.registry` collects them
(``scripts/prepare_data.py`` is a loop over it) and runs one with :func:`prepare`; :mod:`.compose` merges
per-dataset datalists into one condition's datalist; :mod:`.common` holds the shared parsing and reporting.
"""

from bundle.data.converters.common import CLASSES, ConversionError, ConversionReport, finalize, summary_path
from bundle.data.converters.registry import Converter, Option, commands, converters, prepare

__all__ = [
    "CLASSES",
    "ConversionError",
    "ConversionReport",
    "Converter",
    "Option",
    "commands",
    "converters",
    "finalize",
    "prepare",
    "summary_path",
]
