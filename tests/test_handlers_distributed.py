"""The evaluation metrics under torch.distributed (2 gloo processes) give the same report as one process.

Uneven shards (as monai.data.DistributedSampler(even_divisible=False) makes them) and a duplicated
sample (as a padding sampler would add) must leave every sample counted exactly once.
"""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

N, C = 47, 3


def _data():
    rng = np.random.default_rng(0)
    label = (rng.random((N, C)) < 0.4).astype(np.float32)
    label[3, 1] = -1  # an unknown label
    pred = np.clip(0.35 * label + rng.random((N, C)) * 0.65, 0, 1).astype(np.float32)
    attn = rng.random((N, C, 4, 4)).astype(np.float32)
    attn /= attn.sum((-2, -1), keepdims=True)
    mask = np.zeros((N, C, 16, 16), np.float32)
    mask[::2, :, 4:10, 4:10] = 1
    records = [{"sex": "MF"[i % 2], "age": 20 + (i * 7) % 70, "patient_id": f"p{i // 2}"} for i in range(N)]
    return records, label, pred, attn, mask


def _batches(indices):
    _, label, pred, attn, mask = _data()
    for start in range(0, len(indices), 8):
        idx = np.asarray(indices[start : start + 8])
        yield {
            "index": torch.as_tensor(idx),
            "pred": torch.as_tensor(pred[idx]),
            "label": torch.as_tensor(label[idx]),
            "attn": torch.as_tensor(attn[idx]),
            "attn_mask": torch.as_tensor(mask[idx]),
            "attn_available": torch.ones(len(idx), C),
        }


def _compute(indices):
    from bundle.handlers import AlignmentFairnessMetric, MeanAUC

    records = _data()[0]
    metric = AlignmentFairnessMetric(records, classes=["a", "b", "c"], min_count=2)
    auc = MeanAUC()
    metric.reset()
    auc.reset()
    for b in _batches(indices):
        metric.update(b)
        auc.update(b)
    out = metric.compute()
    out["mean_auc"] = auc.compute()
    out["n"] = int(len(metric.last["index"]))
    return out


def _worker(rank, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # rank 0: 0, 2, 4, ...; rank 1: 1, 3, ... plus a padding duplicate of sample 0 -> uneven, overlapping shards
    shard = list(range(rank, N, 2)) + ([0] if rank == 1 else [])
    out = _compute(shard)
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two gloo processes started with torch.multiprocessing (about a minute on 2 shared cores)
def test_distributed_report_equals_single_process(tmp_path):
    single = _compute(list(range(N)))
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["n"] == N  # every sample exactly once on every rank
        assert got.keys() == single.keys()
        for k, v in single.items():
            if isinstance(v, float) and np.isnan(v):
                assert got[k] is None or np.isnan(got[k]), k
            else:
                assert got[k] == pytest.approx(v, abs=1e-9), k
    assert 0.0 < single["val_hit_rate"] < 1.0 and single["mean_auc"] > 0.6
