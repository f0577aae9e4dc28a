"""The built-in synthetic chest X-ray benchmark (docs/synthetic.md): the positive control of the study.

A seeded generator of chest-like radiographs with three findings and exact masks, plus a planted
SPURIOUS SHORTCUT: per class, a bright "device tag" glyph at a fixed place on the top edge whose
presence correlates with the label, strongly in one subgroup (by default: women or age >= 60) and
weakly in the rest, in site A (training / validation / test). In site B (test_ood: DICOM
MONOCHROME1, another size, contrast, noise and blur) the tag is independent of the label. A model
that reads the tag is therefore unfair (group-dependent reliance) and brittle out of domain; a model
that looks at the findings (e.g. aligned to the masks) is neither.

Generation is two-staged: :func:`plan` (:mod:`.plan`) draws every patient, label, tag and annotation
decision (cheap, sequential, seeded), then :func:`render` (:mod:`.render`) draws each image from its own
seeded streams, so the bytes do not depend on the number of worker processes. :mod:`.write` stores the
files and :func:`ensure_synthetic` generates on first use only; :mod:`.stats` summarises; :mod:`.params`
holds the knobs.
"""

from bundle.data.synthetic.params import (
    CLASSES,
    DATALIST_NAME,
    GENERATOR_VERSION,
    SITE_OF_SPLIT,
    SPLIT_CODE,
    SPLITS,
    SUMMARY_NAME,
    SyntheticParams,
    params_hash,
)
from bundle.data.synthetic.plan import plan
from bundle.data.synthetic.render import MARKER_POS, render, windowed_dicom
from bundle.data.synthetic.stats import save_sample_grid, shortcut_stats, synthetic_summary
from bundle.data.synthetic.write import ensure_synthetic, generate, is_up_to_date

__all__ = [
    "CLASSES",
    "DATALIST_NAME",
    "GENERATOR_VERSION",
    "MARKER_POS",
    "SITE_OF_SPLIT",
    "SPLITS",
    "SPLIT_CODE",
    "SUMMARY_NAME",
    "SyntheticParams",
    "ensure_synthetic",
    "generate",
    "is_up_to_date",
    "params_hash",
    "plan",
    "render",
    "save_sample_grid",
    "shortcut_stats",
    "synthetic_summary",
    "windowed_dicom",
]
