"""Vectorised, patient-clustered, subgroup-stratified bootstrap of every group metric.

Why hand-written: scikit-learn / fairlearn evaluate one resampled data set at a time (about 0.7 s per replicate
and attribute at 134,547 samples, an hour for 1000 replicates x 3 classes x 2 attributes). Here a replicate is
a vector of integer weights, one per patient (how often the patient was drawn; all their images carry that
weight), and a chunk of replicates is a (B, n) weight matrix processed with a few array passes:

* AUC = weighted Mann-Whitney U. Samples of one class are sorted once by (subgroup, score). For every positive i
  the weighted number of negatives of its subgroup with a lower score plus half those with an equal score is
  ``(C[lo_i] + C[hi_i]) / 2``, where C is the cumulative negative weight and lo/hi are the positions of the
  score's tie block among the negatives (precomputed once with searchsorted). With weights 1 this is exactly
  sklearn's roc_auc_score (ties count one half).
* Confusion counts come from the same cumulative sums at the group and threshold positions.
* ECE and BCE are sums of per-sample quantities: a sparse (class x group x bin, patient) matrix times the
  weights of all replicates of a chunk at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .core import N_ECE_BINS, bce_terms, ece_bins, metrics_from_sums

__all__ = [
    "patient_index",
    "patient_strata",
    "patient_weights",
    "ClassPlan",
    "GroupedBootstrap",
    "percentile_ci",
    "default_chunk",
    "default_jobs",
    "for_each_chunk",
]


def patient_index(patient_id, n: int) -> tuple[np.ndarray, int]:
    """Integer patient index per sample (0..P-1, in order of first appearance) and P.

    ``None`` -> every sample is its own patient (ordinary bootstrap). Missing ids (None, NaN, "") are their own
    patients as well.
    """
    if patient_id is None:
        return np.arange(n, dtype=np.int64), n
    ids = np.asarray(patient_id.tolist() if isinstance(patient_id, np.ndarray) else list(patient_id), dtype=object)
    if ids.shape != (n,):
        raise ValueError(f"patient_id has {ids.size} values but y_true has {n} rows; give one id per sample")
    codes, uniques = pd.factorize(ids)  # codes in order of first appearance; None/NaN -> -1
    codes = codes.astype(np.int64)
    missing = (codes < 0) | np.asarray([isinstance(p, str) and p == "" for p in ids])
    n_pat = len(uniques)
    if missing.any():
        codes[missing] = n_pat + np.arange(int(missing.sum()))  # a sample without an id is its own patient
        n_pat += int(missing.sum())
        # "" was factorised as a patient of its own; re-index so codes stay 0..P-1 without gaps
        codes = pd.factorize(codes)[0].astype(np.int64)
        n_pat = int(codes.max()) + 1
    return codes, n_pat


def patient_strata(pidx: np.ndarray, codes: np.ndarray, n_patients: int) -> np.ndarray:
    """Stratum of each patient: the subgroup code of the patient's first image (in input order)."""
    first = np.full(n_patients, -1, dtype=np.int64)
    # reversed assignment: the earliest image of each patient is written last and wins
    first[pidx[::-1]] = np.asarray(codes)[::-1]
    return first


def default_chunk(n_samples: int) -> int:
    """Replicates per chunk: keeps each (chunk, n) int64 array near 16 MB."""
    return int(np.clip(2_000_000 // max(n_samples, 1), 4, 128))


def patient_weights(
    strata: np.ndarray, n_boot: int, seed: int, stream: int, chunk: int, start: int = 0
) -> Iterator[np.ndarray]:
    """Yield (b, P) integer draw counts (uint8, or int32 if a count exceeds 255), replicates start..n_boot-1.

    Within every stratum, as many patients as the stratum holds are drawn with replacement, so subgroup sizes
    (in patients) are fixed. Replicate b uses its own generator seeded by (seed, stream, b): results do not
    depend on the chunk size, on ``start`` or on how replicates are split between threads.
    """
    strata = np.asarray(strata)
    n_pat = strata.size
    order = np.argsort(strata, kind="stable")  # patients grouped by stratum
    _, first, size = np.unique(strata[order], return_index=True, return_counts=True)
    base = np.repeat(first, size).astype(np.float64)  # for every draw: its stratum's first position ...
    span = np.repeat(size, size).astype(np.float64)  # ... and size
    for lo in range(start, n_boot, chunk):
        b = min(chunk, n_boot - lo)
        flat = np.empty((b, n_pat), dtype=np.int64)
        for j in range(b):
            u = np.random.default_rng([seed, stream, lo + j]).random(n_pat)
            # uniform position inside the stratum (floor(u * size); bias <= size / 2**53, negligible)
            np.floor(base + u * span, out=u)
            flat[j] = u
        flat += (np.arange(b, dtype=np.int64) * n_pat)[:, None]
        counts = np.bincount(flat.ravel(), minlength=b * n_pat).reshape(b, n_pat)
        counts = counts[:, np.argsort(order)]  # positions back to patient indices
        # uint8 when possible: the kernels' gathers are memory bound
        yield counts.astype(np.uint8 if counts.max(initial=0) <= 255 else np.int32)


def default_jobs() -> int:
    """Threads for the bootstrap: up to 2 (numpy releases the GIL in the gathers, cumsums and sparse products)."""
    return max(1, min(2, os.cpu_count() or 1))


def for_each_chunk(
    fn, strata: np.ndarray, n_boot: int, seed: int, stream: int, chunk: int, n_jobs: int | None = None
) -> None:
    """Call ``fn(W, start)`` for every chunk of replicate weights; replicates are split into ``n_jobs`` contiguous
    ranges processed by threads. Results are identical for any n_jobs / chunk (per-replicate seeds)."""
    n_jobs = default_jobs() if n_jobs is None else max(1, int(n_jobs))
    n_jobs = min(n_jobs, max(1, -(-n_boot // max(chunk, 1))))  # no more threads than chunks

    def work(lo: int, hi: int) -> None:
        pos = lo
        for wts in patient_weights(strata, hi, seed, stream, chunk, start=lo):
            fn(wts, pos)
            pos += wts.shape[0]

    bounds = np.linspace(0, n_boot, n_jobs + 1).astype(int)
    if n_jobs == 1:
        work(0, n_boot)
        return
    with ThreadPoolExecutor(max_workers=n_jobs) as ex:
        for f in [ex.submit(work, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=False)]:
            f.result()


class ClassPlan:
    """Precomputed sort structure of one class under one grouping: AUC and confusion counts per group.

    y, s: labels (0/1) and scores of the class's known-label samples; codes: their group codes (0..G-1);
    cols: the column (patient or sample index) each sample reads its weight from.
    """

    def __init__(
        self, y: np.ndarray, s: np.ndarray, codes: np.ndarray, n_groups: int, cols: np.ndarray, threshold: float = 0.5
    ):
        y = np.asarray(y, dtype=float)
        s = np.asarray(s, dtype=float)
        codes = np.asarray(codes, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        self.G = n_groups
        order = np.lexsort((s, codes))
        pos = y[order] == 1
        neg_order, pos_order = order[~pos], order[pos]
        self.neg_cols, self.pos_cols = cols[neg_order], cols[pos_order]
        sn, sp = s[neg_order], s[pos_order]
        gr = np.arange(n_groups + 1)
        self.neg_bounds = np.searchsorted(codes[neg_order], gr)  # group g occupies [bounds[g], bounds[g+1])
        self.pos_bounds = np.searchsorted(codes[pos_order], gr)
        lo = np.empty(sp.size, dtype=np.int64)
        hi = np.empty(sp.size, dtype=np.int64)
        self.neg_thr = np.empty(n_groups, dtype=np.int64)  # first negative of the group predicted positive
        self.pos_thr = np.empty(n_groups, dtype=np.int64)
        for g in range(n_groups):
            a, b = self.pos_bounds[g], self.pos_bounds[g + 1]
            na, nb = self.neg_bounds[g], self.neg_bounds[g + 1]
            lo[a:b] = na + np.searchsorted(sn[na:nb], sp[a:b], side="left")
            hi[a:b] = na + np.searchsorted(sn[na:nb], sp[a:b], side="right")
            self.neg_thr[g] = na + np.searchsorted(sn[na:nb], threshold, side="left")  # yhat = s >= threshold
            self.pos_thr[g] = a + np.searchsorted(sp[a:b], threshold, side="left")
        self.lo, self.hi = lo, hi
        self.ties = bool(np.any(lo != hi))

    def counts(self, wts: np.ndarray) -> dict[str, np.ndarray]:
        """npos, nneg, tp, fp and u2 (twice the Mann-Whitney U) per group, float arrays (G, B)."""
        # small-integer gathers and int32 cumulative sums are exact (total weight << 2**31) and several times
        # faster than float64 ones
        if wts.dtype not in (np.uint8, np.int32):
            wts = wts.astype(np.uint8 if wts.size and 0 <= wts.min() and wts.max() <= 255 else np.int32)
        n_rep = wts.shape[0]
        wts_neg = np.take(wts, self.neg_cols, axis=1)
        wts_pos = np.take(wts, self.pos_cols, axis=1)
        cum_neg = np.zeros((n_rep, wts_neg.shape[1] + 1), dtype=np.int32)
        np.cumsum(wts_neg, axis=1, dtype=np.int32, out=cum_neg[:, 1:])
        cum_pos = np.zeros((n_rep, wts_pos.shape[1] + 1), dtype=np.int32)
        np.cumsum(wts_pos, axis=1, dtype=np.int32, out=cum_pos[:, 1:])
        below2 = np.take(cum_neg, self.lo, axis=1)  # negatives below (2x) ...
        if self.ties:
            below2 += np.take(cum_neg, self.hi, axis=1)  # ... ties counted once
        else:
            below2 *= 2
        below2_f, wts_pos_f = below2.astype(np.float64), wts_pos.astype(
            np.float64
        )  # float sums below stay exact (< 2**53)
        cum_neg_b = cum_neg[:, self.neg_bounds].T.astype(np.float64)  # (G + 1, B)
        cum_pos_b = cum_pos[:, self.pos_bounds].T.astype(np.float64)
        npos = cum_pos_b[1:] - cum_pos_b[:-1]
        u2 = (
            np.stack(
                [
                    np.einsum("bi,bi->b", wts_pos_f[:, a:b], below2_f[:, a:b])
                    for a, b in zip(self.pos_bounds[:-1], self.pos_bounds[1:], strict=False)
                ]
            )
            if self.G
            else np.zeros((0, n_rep))
        )
        return {
            "npos": npos,
            "nneg": cum_neg_b[1:] - cum_neg_b[:-1],
            "tp": cum_pos_b[1:] - cum_pos[:, self.pos_thr].T,
            "fp": cum_neg_b[1:] - cum_neg[:, self.neg_thr].T,
            # 2U relative to the group: C also counts the negatives of earlier groups
            "u2": u2 - 2 * cum_neg_b[:-1] * npos,
        }

    def auc(self, wts: np.ndarray) -> np.ndarray:
        """Only the AUC (G, B) for a (B, P) integer weight matrix (used by the permutation test)."""
        t = self.counts(wts)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where((t["npos"] > 0) & (t["nneg"] > 0), t["u2"] / (2 * t["npos"] * t["nneg"]), np.nan)


class GroupedBootstrap:
    """All classes under one grouping: per replicate weights (B, P) -> every metric as (C, G, B).

    AUC and confusion counts come from one ClassPlan per class; ECE and BCE are linear in the weights, so their
    per-(class, group, bin) sums over patients form a sparse (K, P) matrix applied to all replicates at once.
    """

    def __init__(
        self,
        y: np.ndarray,
        s: np.ndarray,
        known: np.ndarray,
        codes: np.ndarray,
        n_groups: int,
        cols: np.ndarray,
        n_cols: int,
        thresholds,
    ):
        y, s = np.asarray(y, dtype=float), np.asarray(s, dtype=float)
        n_cls = y.shape[1]
        self.C, self.G = n_cls, n_groups
        codes = np.asarray(codes, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        self.plans = [
            ClassPlan(
                y[known[:, c], c],
                s[known[:, c], c],
                codes[known[:, c]],
                n_groups,
                cols[known[:, c]],
                float(thresholds[c]),
            )
            for c in range(n_cls)
        ]
        rows, vals, pcols = [], [], []
        nb = N_ECE_BINS + 1  # 10 ECE bins (sum of y - s) and the BCE sum, per class and group
        for c in range(n_cls):
            k = known[:, c]
            yc, sc, gc = y[k, c], s[k, c], codes[k]
            base = (c * n_groups + gc) * nb
            rows += [base + ece_bins(sc), base + N_ECE_BINS]
            vals += [yc - sc, bce_terms(yc, sc)]
            pcols += [cols[k], cols[k]]
        rows_a = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.F = sp.csr_matrix(
            (
                np.concatenate(vals) if vals else np.zeros(0),
                (rows_a, np.concatenate(pcols) if pcols else np.zeros(0, np.int64)),
            ),
            shape=(n_cls * n_groups * nb, n_cols),
        )

    def metrics(self, wts: np.ndarray) -> dict[str, np.ndarray]:
        n_rep = wts.shape[0]
        lin = (self.F @ np.ascontiguousarray(wts.T, dtype=np.float64)).reshape(self.C, self.G, N_ECE_BINS + 1, n_rep)
        ece_abs = np.abs(lin[:, :, :N_ECE_BINS]).sum(axis=2)
        bce = lin[:, :, N_ECE_BINS]
        cnt = [p.counts(wts) for p in self.plans]
        st = {
            k: np.stack([t[k] for t in cnt]) if cnt else np.zeros((0, self.G, n_rep))
            for k in ("npos", "nneg", "tp", "fp", "u2")
        }
        return metrics_from_sums(st["npos"], st["nneg"], st["tp"], st["fp"], st["u2"], ece_abs, bce)


def percentile_ci(samples: np.ndarray, ci: float, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval ignoring NaN replicates (all NaN -> NaN)."""
    q = [50 * (1 - ci), 50 * (1 + ci)]
    samples = np.asarray(samples, dtype=float)
    finite = np.isfinite(samples).any(axis=axis, keepdims=True)
    safe = np.where(finite, samples, 0.0)  # all-NaN slices -> dummy values (masked below), no warnings
    lo, hi = np.nanpercentile(safe, q, axis=axis)
    mask = np.squeeze(finite, axis=axis)
    return np.where(mask, lo, np.nan), np.where(mask, hi, np.nan)
