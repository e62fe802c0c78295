"""Evaluation metrics of the DIN paper: AUC, GAUC, per-user mean AUC and RelaImpr.

All functions take flat 1-D arrays (NumPy arrays, tensors or lists) of equal
length N and return plain Python floats, so results can go straight into JSON.

* ``auc(labels, scores)``: the ordinary ROC AUC over all N samples.
* ``gauc(labels, scores, users)``: the paper's *group AUC* (Zhou et al. 2018,
  eq. 5): the AUC of every user separately, averaged with each user's number of
  impressions as the weight.  A user whose labels are all one class has no
  AUC, so that user is skipped (it is left out of both the numerator and the
  denominator), exactly as the paper does.
* ``gauc(..., weighted=False)``: the same per-user AUCs, plain mean.
* ``relaimpr(auc_model, auc_base)``: the paper's RelaImpr, in percent.

Per-user AUCs use scikit-learn's ``roc_auc_score`` so that ties are handled the
standard way (a tied positive/negative pair counts one half).

Run ``python -m din_fused.metrics base.json din.json ...`` to turn metrics files
written by ``python -m din_fused.train --metrics-out`` into a Table-3-style
table (the first file is the baseline of RelaImpr).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = ["GroupAUC", "auc", "gauc", "group_auc", "log_loss", "relaimpr", "format_table"]


def _as_1d(name: str, x, dtype) -> np.ndarray:
    """Any array-like (including a CPU or CUDA tensor) -> contiguous 1-D NumPy array (dtype None:
    as it is)."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim == 2 and arr.shape[1] == 1:  # model outputs are often [N, 1]
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _check(labels, scores, users=None):
    y = _as_1d("labels", labels, np.float64)
    s = _as_1d("scores", scores, np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same length, got {y.shape[0]} and {s.shape[0]}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or Inf")
    if users is None:
        return y, s
    u = _as_1d("users", users, None)
    if u.dtype.kind == "f":  # whole numbers only: 1.2 and 1.7 are not one user
        # Past 2**63 (and at +-inf) the cast to int64 would make every such id the same one.
        bad = (u != np.round(u)) | ~(np.abs(u) < 2.0**63)
        if bad.any():
            raise ValueError(f"users must be integer ids within int64, got {u[bad][0]}")
        u = u.astype(np.int64)
    elif u.dtype.kind not in "iubUS":
        raise ValueError(f"users must be integer (or string) ids, got dtype {u.dtype}")
    if u.shape != y.shape:
        raise ValueError(f"users must have the same length as labels, got {u.shape[0]} and {y.shape[0]}")
    return y, s, u


def auc(labels, scores) -> float:
    """ROC AUC of ``scores`` [N] against binary ``labels`` [N].

    Returns NaN (rather than raising) when all labels are one class, because an
    evaluation shard can legitimately be that small; callers print it as such.
    """
    y, s = _check(labels, scores)
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, s))


@dataclass(frozen=True)
class GroupAUC:
    """Per-user AUC summary.

    weighted:   the paper's GAUC, sum_u n_u * AUC_u / sum_u n_u over scored users.
    unweighted: the mean of AUC_u over scored users.
    users:      users that were scored (both classes present).
    skipped:    users left out because all their labels are one class.
    impressions: sum of n_u over scored users (the GAUC denominator).
    """

    weighted: float
    unweighted: float
    users: int
    skipped: int
    impressions: int


def group_auc(labels, scores, users) -> GroupAUC:
    """Per-user AUCs of ``scores`` [N] against ``labels`` [N], grouped by ``users`` [N].

    Users whose labels are all positive or all negative have no AUC and are
    skipped; if no user can be scored both averages are NaN.
    """
    y, s, u = _check(labels, scores, users)
    if y.size == 0:
        return GroupAUC(float("nan"), float("nan"), 0, 0, 0)
    # One stable sort groups every user's samples contiguously, so each user is
    # a slice instead of a boolean mask over all N samples (O(N log N), not O(N * U)).
    order = np.argsort(u, kind="stable")
    u_sorted = u[order]
    starts = np.flatnonzero(np.r_[True, u_sorted[1:] != u_sorted[:-1]])
    ends = np.r_[starts[1:], u_sorted.size]
    num = 0.0
    den = 0
    aucs = []
    skipped = 0
    for a, b in zip(starts, ends):
        idx = order[a:b]
        yu = y[idx]
        pos = yu.sum()
        if pos == 0 or pos == yu.size:
            skipped += 1
            continue
        au = float(roc_auc_score(yu, s[idx]))
        aucs.append(au)
        num += yu.size * au
        den += yu.size
    if not aucs:
        return GroupAUC(float("nan"), float("nan"), 0, skipped, 0)
    return GroupAUC(num / den, float(np.mean(aucs)), len(aucs), skipped, den)


def gauc(labels, scores, users, weighted: bool = True) -> float:
    """The paper's GAUC (``weighted=True``) or the plain per-user mean AUC.

    labels [N] in {0, 1}, scores [N] any real, users [N] integer ids (or strings, or floats
    holding whole numbers).
    """
    g = group_auc(labels, scores, users)
    return g.weighted if weighted else g.unweighted


def log_loss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` [N] in [0, 1] (clipped to [eps, 1-eps]).
    Values outside [0, 1] are refused: logits passed by mistake would clip to a near-zero loss."""
    y, p = _check(labels, probs)
    if y.size and not (p.min() >= 0.0 and p.max() <= 1.0):
        raise ValueError(f"probs must be probabilities in [0, 1] (pass sigmoid(logits)), got values in "
                         f"[{p.min()}, {p.max()}]")
    if y.size == 0:
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def relaimpr(auc_model: float, auc_base: float) -> float:
    """RelaImpr of the paper, in percent: ((AUC_model - 0.5) / (AUC_base - 0.5) - 1) * 100.

    0.5 is subtracted because a random guesser scores 0.5, so the ratio compares
    how far above chance the two models are.
    """
    if not auc_base > 0.5:
        raise ValueError(f"RelaImpr needs a baseline AUC above 0.5, got {auc_base}")
    return ((auc_model - 0.5) / (auc_base - 0.5) - 1.0) * 100.0


def format_table(rows: Sequence[dict], base: dict | None = None) -> str:
    """Markdown table in the form of the paper's Table 3.

    rows: metrics dicts as written by ``din_fused.train`` (``name``, ``test_auc``,
    ``test_gauc``, ...).  RelaImpr of AUC and of GAUC is taken against ``base``
    (default: the first row).
    """
    if not rows:
        raise ValueError("format_table needs at least one row")
    base = rows[0] if base is None else base
    out = [
        "| Model | AUC | RelaImpr (AUC) | GAUC | RelaImpr (GAUC) | GAUC unweighted | samples/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ra = relaimpr(r["test_auc"], base["test_auc"])
        rg = relaimpr(r["test_gauc"], base["test_gauc"])
        out.append(
            f"| {r.get('name', '?')} | {r['test_auc']:.4f} | {ra:+.2f}% | {r['test_gauc']:.4f} | {rg:+.2f}% "
            f"| {r['test_gauc_unweighted']:.4f} | {r.get('samples_per_second', math.nan):,.0f} |"
        )
    return "\n".join(out)


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m din_fused.metrics",
        description="Print a Table-3-style comparison of metrics JSON files (the first is the baseline).",
    )
    p.add_argument(
        "files", nargs="+", help="metrics JSON files written by python -m din_fused.train --metrics-out"
    )
    args = p.parse_args(argv)
    rows = []
    for f in args.files:
        try:
            with open(f) as fh:
                rows.append(json.load(fh))
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"cannot read {f}: {e}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
