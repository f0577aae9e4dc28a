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
* Threshold metrics, ECE and BCE are sums of per-sample quantities: weighted counts over runs of equal
  (subgroup, ECE bin, prediction) in the same sorted order, computed as small matrix products.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from .core import N_ECE_BINS, bce_terms, ece_bins, metrics_from_sums

__all__ = ["patient_index", "patient_strata", "patient_weights", "ClassPlan", "percentile_ci", "default_chunk"]


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


def patient_weights(strata: np.ndarray, n_boot: int, seed: int, stream: int, chunk: int) -> Iterator[np.ndarray]:
    """Yield (b, P) int64 draw counts, ``n_boot`` rows in all.

    Within every stratum, as many patients as the stratum holds are drawn with replacement, so subgroup sizes
    (in patients) are fixed. Replicate b uses its own generator seeded by (seed, stream, b): results do not
    depend on the chunk size.
    """
    strata = np.asarray(strata)
    n_pat = strata.size
    members = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        flat = np.empty((b, n_pat), dtype=np.int64)
        for j in range(b):
            rng = np.random.default_rng([seed, stream, start + j])
            pos = 0
            for m in members:
                flat[j, pos:pos + m.size] = m[rng.integers(0, m.size, m.size)]
                pos += m.size
        flat += (np.arange(b, dtype=np.int64) * n_pat)[:, None]
        yield np.bincount(flat.ravel(), minlength=b * n_pat).reshape(b, n_pat)


class ClassPlan:
    """Precomputed sort and run structure of one class under one grouping.

    y, s: labels (0/1) and scores of the class's known-label samples; codes: their group codes (0..G-1);
    cols: the column (patient or sample index) each sample reads its weight from.
    """

    def __init__(self, y: np.ndarray, s: np.ndarray, codes: np.ndarray, n_groups: int, cols: np.ndarray,
                 threshold: float):
        y = np.asarray(y, dtype=float)
        s = np.asarray(s, dtype=float)
        codes = np.asarray(codes, dtype=np.int64)
        self.G = n_groups
        order = np.lexsort((s, codes))
        pos = y[order] == 1
        self.neg_order, self.pos_order = order[~pos], order[pos]
        self.neg_cols, self.pos_cols = cols[self.neg_order], cols[self.pos_order]
        sn, sp = s[self.neg_order], s[self.pos_order]
        gn, gp = codes[self.neg_order], codes[self.pos_order]
        gr = np.arange(n_groups + 1)
        self.neg_bounds = np.searchsorted(gn, gr)  # group g occupies [bounds[g], bounds[g+1])
        self.pos_bounds = np.searchsorted(gp, gr)
        lo = np.empty(sp.size, dtype=np.int64)
        hi = np.empty(sp.size, dtype=np.int64)
        for g in range(n_groups):
            a, b = self.pos_bounds[g], self.pos_bounds[g + 1]
            na, nb = self.neg_bounds[g], self.neg_bounds[g + 1]
            lo[a:b] = na + np.searchsorted(sn[na:nb], sp[a:b], side="left")
            hi[a:b] = na + np.searchsorted(sn[na:nb], sp[a:b], side="right")
        self.lo, self.hi = lo, hi
        self.ties = bool(np.any(lo != hi))
        # runs of equal (group, ECE bin, prediction): contiguous in the sorted order
        self.runs = [self._runs(g_, s_, threshold, lab) for g_, s_, lab in ((gn, sn, 0.0), (gp, sp, 1.0))]

    def _runs(self, g, s, threshold, label):
        yhat = (s >= threshold).astype(np.int64)
        b = ece_bins(s)
        key = (g * N_ECE_BINS + b) * 2 + yhat
        starts = np.flatnonzero(np.diff(key)) + 1 if key.size else np.zeros(0, np.int64)
        starts = np.concatenate([[0], starts]).astype(np.int64) if key.size else starts
        ends = np.append(starts[1:], key.size)
        # per-sample values summed per run: count, score (for ECE), cross-entropy
        vals = np.stack([np.ones_like(s), s, bce_terms(np.full(s.shape, label), s)], axis=1)
        return starts, ends, g[starts], b[starts], yhat[starts], vals

    def sums(self, W: np.ndarray) -> dict[str, np.ndarray]:
        """Weighted sufficient statistics per group for a (B, P) integer weight matrix -> float arrays (G, B)."""
        B, G = W.shape[0], self.G
        # int32 gathers and cumulative sums are exact (total weight << 2**31) and twice as fast as float64
        W = np.asarray(W, dtype=np.int32)
        Wn = np.take(W, self.neg_cols, axis=1)
        Wp = np.take(W, self.pos_cols, axis=1)
        C = np.zeros((B, Wn.shape[1] + 1), dtype=np.int32)
        np.cumsum(Wn, axis=1, dtype=np.int32, out=C[:, 1:])
        X = np.take(C, self.lo, axis=1)
        if self.ties:
            X += np.take(C, self.hi, axis=1)
        else:
            X *= 2
        Wnf, Wpf, Xf = Wn.astype(np.float64), Wp.astype(np.float64), X.astype(np.float64)  # float sums exact < 2**53
        del X
        C0 = C[:, self.neg_bounds].astype(np.float64)  # cumulative negatives at each group boundary
        out = {k: np.zeros((G, B)) for k in ("npos", "nneg", "tp", "fp", "u2", "ece_abs", "bce")}
        for g in range(G):
            a, b = self.pos_bounds[g], self.pos_bounds[g + 1]
            npos = Wpf[:, a:b].sum(axis=1)
            out["npos"][g] = npos
            out["nneg"][g] = C0[:, g + 1] - C0[:, g]
            # 2U relative to the group: subtract the negatives of earlier groups counted in C
            out["u2"][g] = np.einsum("bi,bi->b", Wpf[:, a:b], Xf[:, a:b]) - 2 * C0[:, g] * npos
        ece_signed = np.zeros((G, N_ECE_BINS, B))
        for label, (Wx, (starts, ends, rg, rb, ry, vals)) in enumerate(zip((Wnf, Wpf), self.runs)):
            for i in range(starts.size):
                a, b = starts[i], ends[i]
                cnt, ssum, bsum = (Wx[:, a:b] @ vals[a:b]).T
                g = rg[i]
                if ry[i]:
                    out["tp" if label else "fp"][g] += cnt
                ece_signed[g, rb[i]] += label * cnt - ssum
                out["bce"][g] += bsum
        out["ece_abs"] = np.abs(ece_signed).sum(axis=1)
        return out

    def auc(self, W: np.ndarray) -> np.ndarray:
        """Only the AUC (G, B) for a (B, P) integer weight matrix (used by the permutation test)."""
        W = np.asarray(W, dtype=np.int32)
        Wn = np.take(W, self.neg_cols, axis=1)
        Wp = np.take(W, self.pos_cols, axis=1)
        C = np.zeros((W.shape[0], Wn.shape[1] + 1), dtype=np.int32)
        np.cumsum(Wn, axis=1, dtype=np.int32, out=C[:, 1:])
        X = np.take(C, self.lo, axis=1)
        if self.ties:
            X += np.take(C, self.hi, axis=1)
        else:
            X *= 2
        Wpf, Xf = Wp.astype(np.float64), X.astype(np.float64)
        C0 = C[:, self.neg_bounds].astype(np.float64)
        npos = np.stack([Wpf[:, a:b].sum(axis=1) for a, b in zip(self.pos_bounds[:-1], self.pos_bounds[1:])])
        u2 = np.stack([np.einsum("bi,bi->b", Wpf[:, a:b], Xf[:, a:b]) for a, b in
                       zip(self.pos_bounds[:-1], self.pos_bounds[1:])]) - 2 * C0[:, :-1].T * npos
        nneg = np.diff(C0, axis=1).T
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where((npos > 0) & (nneg > 0), u2 / (2 * npos * nneg), np.nan)

    def metrics(self, W: np.ndarray) -> dict[str, np.ndarray]:
        """Metrics (G, B) for a (B, P) weight matrix (undefined values NaN)."""
        t = self.sums(W)
        return metrics_from_sums(t["npos"], t["nneg"], t["tp"], t["fp"], t["u2"], t["ece_abs"], t["bce"])


def percentile_ci(samples: np.ndarray, ci: float, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval ignoring NaN replicates (all NaN -> NaN)."""
    q = [50 * (1 - ci), 50 * (1 + ci)]
    samples = np.asarray(samples, dtype=float)
    finite = np.isfinite(samples).any(axis=axis, keepdims=True)
    safe = np.where(finite, samples, 0.0)  # all-NaN slices -> dummy values (masked below), no warnings
    lo, hi = np.nanpercentile(safe, q, axis=axis)
    mask = np.squeeze(finite, axis=axis)
    return np.where(mask, lo, np.nan), np.where(mask, hi, np.nan)
