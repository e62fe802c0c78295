"""The sample protocol shared by every source, the sample store and the split by user.

See the package docstring for the definition of a sample.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .batching import Batch, JaggedBatch, gather_jagged, gather_padded
from .loading import DataError, EventLog, Vocab, read_movielens_events, synthetic_events

__all__ = ["SequenceDataset", "build_samples", "split_by_user", "load_movielens", "make_synthetic"]


@dataclass
class SequenceDataset:
    """N samples whose histories are windows into one shared behaviour store.

    user       [N] int64
    target     [N, A] int64
    label      [N] float32
    hist_start [N] int64   first position of the window in ``seq``
    hist_len   [N] int64   window length, 0..max_len
    context    [N, F] int64
    seq        [M, A] int64 flat behaviour store (shared between splits)
    vocab      raw ids behind the rows (saved with a model), or None
    """

    user: torch.Tensor
    target: torch.Tensor
    label: torch.Tensor
    hist_start: torch.Tensor
    hist_len: torch.Tensor
    context: torch.Tensor
    seq: torch.Tensor
    max_len: int
    attr_names: tuple[str, ...]
    attr_vocab: tuple[int, ...]
    context_names: tuple[str, ...] = ()
    context_vocab: tuple[int, ...] = ()
    info: dict = field(default_factory=dict)
    vocab: Vocab | None = None

    def __len__(self) -> int:
        return self.user.shape[0]

    @property
    def num_users(self) -> int:
        return int(torch.unique(self.user).numel())

    def subset(self, index: torch.Tensor) -> SequenceDataset:
        """Samples ``index`` ([n] int64 or [N] bool); the behaviour store is shared, not copied."""
        return dataclasses.replace(
            self,
            user=self.user[index],
            target=self.target[index],
            label=self.label[index],
            hist_start=self.hist_start[index],
            hist_len=self.hist_len[index],
            context=self.context[index],
            info=dict(self.info),
        )

    def batch(self, index: torch.Tensor, layout: str = "padded") -> Batch | JaggedBatch:
        """Gather samples ``index`` [b] into a padded :class:`Batch` (T = ``max_len``) or, with
        ``layout="jagged"``, a :class:`JaggedBatch` with no padding."""
        lengths = self.hist_len[index]
        start = self.hist_start[index]
        rest = self.user[index], self.target[index]
        if layout == "jagged":
            values, offsets = gather_jagged(self.seq, start, lengths)
            return JaggedBatch(*rest, values, offsets, self.context[index], self.label[index])
        if layout != "padded":
            raise ValueError(f"layout must be 'padded' or 'jagged', got {layout!r}")
        history = gather_padded(self.seq, start, lengths, self.max_len)  # [b, T, A]
        return Batch(*rest, history, lengths, self.context[index], self.label[index])

    def id_counts(self) -> list[torch.Tensor]:
        """Per attribute a: [attr_vocab[a]] float, the number of samples in which each id occurs.

        An id "occurs" in a sample when it is the target's attribute or any valid
        behaviour of the sample; it is counted once per sample however often it
        repeats there.  These are the n_j of mini-batch aware regularisation.
        Padding (id 0) always gets count 0.
        """
        counts = [torch.zeros(v, dtype=torch.float64) for v in self.attr_vocab]
        n = len(self)
        chunk = 1 << 16
        for lo in range(0, n, chunk):
            # Jagged, so that the work follows the behaviours, not max_len (padded batches of a
            # large --max-len made this 400x slower for the same data).
            b = self.batch(torch.arange(lo, min(n, lo + chunk)), "jagged")
            rows = torch.arange(b.target.shape[0])
            hist_rows = torch.repeat_interleave(rows, b.offsets.diff())
            for a, v in enumerate(self.attr_vocab):
                # (sample, id) pairs as one key each, so that unique counts an id once per sample.
                keys = torch.cat([rows * v + b.target[:, a], hist_rows * v + b.values[:, a]])
                ids = torch.unique(keys) % v
                counts[a] += torch.bincount(ids[ids != 0], minlength=v).to(torch.float64)
        return counts


# --------------------------------------------------------------------------- #
# Samples and split
# --------------------------------------------------------------------------- #
def build_samples(log: EventLog, max_len: int) -> SequenceDataset:
    """Turn an :class:`EventLog` into one sample per event (see the module docstring).

    Events are ordered by (user, time) with a stable sort, so equal timestamps keep
    their input order in the store; they are still excluded from each other's
    histories.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    m = log.user.shape[0]
    for name, ids, vocab in (
        ("attrs", log.attrs, log.attr_vocab),
        ("context", log.context, log.context_vocab),
    ):
        if ids.size and (ids.min() < 1 or np.any(ids.max(axis=0) >= np.asarray(vocab))):
            raise ValueError(f"EventLog.{name} ids must be in 1..vocab-1 (0 is padding), vocab sizes {vocab}")
    order = np.lexsort((log.time, log.user))  # primary key user, then time (stable)
    user = log.user[order]
    time = log.time[order]
    # Start of each user's block in the (user, time)-sorted store.
    new_user = np.r_[True, user[1:] != user[:-1]] if m else np.zeros(0, dtype=bool)
    block_start = np.maximum.accumulate(np.where(new_user, np.arange(m), 0)) if m else np.zeros(0, np.int64)
    # Index of the first event of the same user with the same timestamp: the
    # history ends (exclusive) there, so same-second events are not visible.
    new_time = new_user | np.r_[True, time[1:] != time[:-1]] if m else np.zeros(0, dtype=bool)
    end = np.maximum.accumulate(np.where(new_time, np.arange(m), 0)) if m else np.zeros(0, np.int64)
    length = np.minimum(end - block_start, max_len)
    start = end - length
    t = torch.from_numpy
    return SequenceDataset(
        user=t(user.astype(np.int64)),
        target=t(np.ascontiguousarray(log.attrs[order], dtype=np.int64)),
        label=t(log.label[order].astype(np.float32)),
        hist_start=t(start.astype(np.int64)),
        hist_len=t(length.astype(np.int64)),
        context=t(np.ascontiguousarray(log.context[order], dtype=np.int64)),
        seq=t(np.ascontiguousarray(log.attrs[order], dtype=np.int64)),
        max_len=int(max_len),
        attr_names=tuple(log.attr_names),
        attr_vocab=tuple(int(v) for v in log.attr_vocab),
        context_names=tuple(log.context_names),
        context_vocab=tuple(int(v) for v in log.context_vocab),
        vocab=log.vocab,
    )


def split_by_user(
    ds: SequenceDataset, val_frac: float, test_frac: float, seed: int
) -> tuple[SequenceDataset, SequenceDataset, SequenceDataset]:
    """Split samples by user into (train, validation, test).

    A seeded permutation of the sorted user ids gives the first
    ``round(test_frac * U)`` users (at least 1) to test, the next
    ``round(val_frac * U)`` (at least 1 unless ``val_frac == 0``, then
    validation is empty) to validation, and the rest to train, which must keep
    at least one user.  All of a user's samples land in one part, so
    validation and test users are unseen in training.  The split depends only on
    ``seed`` and the user ids.
    """
    if not 0.0 < test_frac < 1.0:
        raise DataError(f"test_frac must be in (0, 1), got {test_frac}")
    if not 0.0 <= val_frac < 1.0 or val_frac + test_frac >= 1.0:
        raise DataError(
            f"val_frac must be in [0, 1) with val_frac + test_frac < 1, got {val_frac}, {test_frac}"
        )
    users = torch.unique(ds.user)  # sorted
    n = users.numel()
    n_test = max(1, round(test_frac * n))
    n_val = max(1, round(val_frac * n)) if val_frac > 0 else 0
    if n_test + n_val >= n:
        raise DataError(
            f"{n} users cannot be split into train, {n_val} validation and {n_test} test users "
            f"(val_frac={val_frac}, test_frac={test_frac})"
        )
    g = torch.Generator().manual_seed(int(seed))
    perm = users[torch.randperm(n, generator=g)]
    part = torch.zeros(int(users.max()) + 1, dtype=torch.int64)  # 0 train, 1 validation, 2 test
    part[perm[:n_test]] = 2
    part[perm[n_test : n_test + n_val]] = 1
    p = part[ds.user]
    return ds.subset(p == 0), ds.subset(p == 1), ds.subset(p == 2)


def load_movielens(data_dir: str | os.PathLike, max_len: int = 50) -> SequenceDataset:
    """:func:`read_movielens_events` followed by :func:`build_samples`."""
    ds = build_samples(read_movielens_events(data_dir), max_len)
    ds.info.update(dataset="movielens", data_dir=str(Path(data_dir).resolve()))
    return ds

def make_synthetic(num_users: int = 3000, max_len: int = 50, seed: int = 0, **kwargs) -> SequenceDataset:
    """:func:`synthetic_events` followed by :func:`build_samples`."""
    ds = build_samples(synthetic_events(num_users=num_users, seed=seed, **kwargs), max_len)
    ds.info.update(dataset="synthetic", num_users=num_users, seed=seed)
    return ds
