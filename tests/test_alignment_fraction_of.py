"""``alignment_fraction_of``: p as a share of all training images ("all", the default) or of the images that carry a
human mask on a positive finding ("annotated"); both nested across p and seeded."""

import itertools

import pytest

from bundle.alignment import has_annotated_positive, prepare_training_records

CLASSES = ["nodule_mass", "pleural_effusion", "edema"]


def _records(n=300):
    """Every 3rd image has a mask on a positive; every 7th a mask only on a negative class (not 'annotated')."""
    recs = []
    for i in range(n):
        rec = {"image": f"img_{i:04d}.png", "patient_id": f"p{i // 2}", "label": [1, 0, int(i % 2 == 0)]}
        if i % 3 == 0:
            rec["attention"] = [{"class": "nodule_mass", "type": "bbox_xywh", "coords": [1, 1, 4, 4], "frame": [8, 8]}]
        elif i % 7 == 0:
            rec["attention"] = [{"class": "pleural_effusion", "type": "bbox_xywh", "coords": [1, 1, 4, 4]}]
        recs.append(rec)
    return recs


def _selected(recs):
    return {r["image"] for r in recs if r["in_align_subset"]}


def test_annotated_reading_is_nested_exact_and_only_annotated():
    recs = _records()
    annotated = {r["image"] for r in recs if has_annotated_positive(r, CLASSES)}
    assert len(annotated) == 100
    levels = (0, 0.25, 0.5, 0.75, 1)
    sets = [
        _selected(
            prepare_training_records(
                recs, alignment_fraction=p, seed=3, alignment_fraction_of="annotated", classes=CLASSES
            )
        )
        for p in levels
    ]
    assert [len(s) for s in sets] == [0, 25, 50, 75, 100]  # exactly round(p * n_annotated)
    assert all(s <= annotated for s in sets) and sets[-1] == annotated
    for small, big in itertools.pairwise(sets):
        assert small <= big  # nested
    # with a data ratio: still nested, and drawn among the kept images only
    kept = [
        prepare_training_records(
            recs, data_ratio=0.5, alignment_fraction=p, seed=3, alignment_fraction_of="annotated", classes=CLASSES
        )
        for p in (0.5, 1.0)
    ]
    assert _selected(kept[0]) <= _selected(kept[1]) <= {r["image"] for r in kept[1]}


def test_all_reading_is_unchanged_and_differs_from_annotated():
    recs = _records()
    default = prepare_training_records(recs, alignment_fraction=0.5, seed=3)
    explicit = prepare_training_records(
        recs, alignment_fraction=0.5, seed=3, alignment_fraction_of="all", classes=CLASSES
    )
    assert _selected(default) == _selected(explicit) and len(_selected(default)) == 150  # p of all 300 images
    annotated = _selected(
        prepare_training_records(
            recs, alignment_fraction=0.5, seed=3, alignment_fraction_of="annotated", classes=CLASSES
        )
    )
    assert len(annotated) == 50 and annotated != _selected(default)


def test_without_classes_any_mask_counts_and_bad_values_are_refused():
    recs = _records()
    sel = _selected(prepare_training_records(recs, alignment_fraction=1.0, alignment_fraction_of="annotated"))
    assert len(sel) == sum(1 for r in recs if r.get("attention"))  # the negative-only masks count without classes
    with pytest.raises(ValueError, match="alignment_fraction_of='positives'"):
        prepare_training_records(recs, alignment_fraction_of="positives")
