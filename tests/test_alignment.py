"""The paper's knobs: nested alignment subsets, patient-level data ratio, random-alignment masks."""

import itertools

import numpy as np
import pytest
import torch

from bundle.alignment import AlignFlagsd, RandomAttentiond, prepare_training_records, random_shape_mask


def _records(n=200, per_patient=2):
    return [{"image": f"img_{i:04d}.png", "patient_id": f"p{i // per_patient}", "label": [1, 0, 1]} for i in range(n)]


def _selected(recs):
    return {r["image"] for r in recs if r["in_align_subset"]}


def test_alignment_subsets_are_nested_and_sized():
    recs = _records()
    sets = [_selected(prepare_training_records(recs, alignment_fraction=p, seed=3)) for p in (0, 0.25, 0.5, 0.75, 1)]
    assert [len(s) for s in sets] == [0, 50, 100, 150, 200]
    for small, big in itertools.pairwise(sets):
        assert small <= big
    # another seed draws another subset of the same size
    other = _selected(prepare_training_records(recs, alignment_fraction=0.5, seed=4))
    assert len(other) == 100 and other != sets[2]


def test_alignment_subset_independent_of_record_order():
    recs = _records()
    a = _selected(prepare_training_records(recs, alignment_fraction=0.25, seed=1))
    b = _selected(prepare_training_records(list(reversed(recs)), alignment_fraction=0.25, seed=1))
    assert a == b


def test_data_ratio_is_patient_level_and_nested():
    recs = _records(n=300, per_patient=3)
    half = prepare_training_records(recs, data_ratio=0.5, seed=0)
    quarter = prepare_training_records(recs, data_ratio=0.25, seed=0)
    pids_half = {r["patient_id"] for r in half}
    assert len(pids_half) == 50 and len(half) == 150  # whole patients only
    assert {r["patient_id"] for r in quarter} <= pids_half
    with pytest.raises(ValueError, match="data_ratio"):
        prepare_training_records(recs, data_ratio=0.0)
    with pytest.raises(ValueError, match="alignment_fraction"):
        prepare_training_records(recs, alignment_fraction=1.5)


def test_align_flags_need_positive_annotated_selected():
    t = AlignFlagsd()
    d = {"label": [1, 0, 1], "attn_available": [1, 1, 0], "in_align_subset": True}
    assert t(d)["align"].tolist() == [1, 0, 0]
    assert t({**d, "in_align_subset": False})["align"].tolist() == [0, 0, 0]
    assert t({"label": [1, -1, 1], "attn_available": [1, 1, 1]})["align"].tolist() == [0, 0, 0]  # val/test records


@pytest.mark.parametrize("area", [12, 60, 400, 1500])
def test_random_shape_area_matches(area):
    rng = np.random.RandomState(area)
    for _ in range(10):
        m = random_shape_mask((128, 128), area, rng)
        assert abs(m.sum() - area) <= 0.1 * area + 2


def test_random_attention_changes_every_call_and_keeps_area():
    mask = np.zeros((3, 64, 64), np.float32)
    mask[0, 10:20, 10:20] = 1
    mask[2, 30:50, 30:40] = 1
    d = {
        "attn_mask": torch.tensor(mask),
        "align": torch.tensor([1.0, 0.0, 0.0]),
        "letterbox": np.array([1.0, 8, 0, 48, 64], np.float32),
    }
    t = RandomAttentiond()
    t.set_random_state(0)
    outs = [t(d)["attn_mask"] for _ in range(3)]  # one call per epoch
    assert not torch.equal(outs[0][0], outs[1][0]) and not torch.equal(outs[1][0], outs[2][0])
    for o in outs:
        assert abs(float(o[0].sum()) - 100) <= 12  # same area as the human mask it replaces
        assert torch.equal(o[2], torch.tensor(mask[2]))  # pairs not aligned keep their human mask
        ys, xs = np.nonzero(o[0].numpy())
        assert 8 <= ys.mean() < 56  # centred inside the image content, not in the padding
    assert torch.equal(t.__class__(enabled=False)(d)["attn_mask"], d["attn_mask"])
