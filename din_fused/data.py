"""Data for the DIN model: the MovieLens protocol of the paper and a synthetic generator.

Both sources produce an :class:`EventLog` (time-ordered interactions of users
with items, each with a label) and go through the same :func:`build_samples`,
so they share one definition of "a sample":

    every event is a sample; its target is the event's item (with the item's
    attributes, e.g. its category), its label is the event's label, and its
    behaviour sequence is the same user's *strictly earlier* events in time
    order, the latest ``max_len`` of them.

"Strictly earlier": events with the same timestamp are not in each other's
history.  MovieLens users often rate dozens of movies in the same second;
their relative order carries no information, so neither may see the other.

Samples do not copy their histories.  A :class:`SequenceDataset` keeps one flat
behaviour store [M, A] (every event's attribute ids, grouped by user, in time
order) and each sample only records where its window starts and how long it
is; :meth:`SequenceDataset.batch` gathers the padded [b, T, A] tensor for a
batch of sample indices.  That keeps 100k MovieLens samples with T=50 at a few
MB instead of 2 x 100k x 50 int64.

Id conventions: every attribute id and context id is >= 1; 0 is padding, and
padded positions of a history are filled with 0.  Valid positions are always
the first ``length`` ones (left-aligned), which is what ``FusedDINAttention``
expects from ``keys_length``.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "DataError",
    "EventLog",
    "SequenceDataset",
    "Batch",
    "build_samples",
    "split_by_user",
    "load_movielens",
    "read_movielens_events",
    "make_synthetic",
    "synthetic_events",
    "default_movielens_dir",
    "iterate_batches",
]


class DataError(ValueError):
    """Malformed or missing input data; the message names the file, line and problem."""


# --------------------------------------------------------------------------- #
# Containers
# --------------------------------------------------------------------------- #
@dataclass
class EventLog:
    """Time-stamped interactions, in any order.

    user   [M] int64, dense user index 0..num_users-1
    attrs  [M, A] int64, attribute ids of the event's item (column 0 is the item,
           then e.g. its category), each >= 1
    label  [M] float32 in {0, 1}
    time   [M] int64, timestamps (only their order matters)
    context [M, F] int64 ids >= 1 of optional per-event context features (F may be 0)
    attr_vocab[a]: table size of attribute a (max id + 1, row 0 is padding)
    context_vocab[f]: table size of context feature f
    """

    user: np.ndarray
    attrs: np.ndarray
    label: np.ndarray
    time: np.ndarray
    attr_names: tuple[str, ...]
    attr_vocab: tuple[int, ...]
    context: np.ndarray | None = None
    context_names: tuple[str, ...] = ()
    context_vocab: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        m = self.user.shape[0]
        if self.context is None:
            self.context = np.zeros((m, 0), dtype=np.int64)
        columns = {"attrs": self.attrs, "label": self.label, "time": self.time, "context": self.context}
        for name, arr in columns.items():
            if arr.shape[0] != m:
                raise ValueError(f"EventLog.{name} has {arr.shape[0]} rows, user has {m}")
        a = len(self.attr_names)
        if self.attrs.ndim != 2 or self.attrs.shape[1] != a or len(self.attr_vocab) != a:
            raise ValueError("EventLog.attrs must be [M, A] with one name and one vocab size per column")
        f = len(self.context_names)
        if self.context.ndim != 2 or self.context.shape[1] != f or len(self.context_vocab) != f:
            raise ValueError("EventLog.context must be [M, F] with one name and one vocab size per column")


class Batch(NamedTuple):
    """One mini-batch, all tensors on the same device.

    user     [b] int64    user index (for GAUC only; never a model input)
    target   [b, A] int64 candidate attribute ids
    history  [b, T, A] int64 behaviour attribute ids, 0 beyond ``lengths``
    lengths  [b] int64    valid behaviours per row, 0..T
    context  [b, F] int64 context feature ids (F may be 0)
    label    [b] float32
    """

    user: torch.Tensor
    target: torch.Tensor
    history: torch.Tensor
    lengths: torch.Tensor
    context: torch.Tensor
    label: torch.Tensor

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self))


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

    def __len__(self) -> int:
        return self.user.shape[0]

    @property
    def num_users(self) -> int:
        return int(torch.unique(self.user).numel())

    def subset(self, index: torch.Tensor) -> SequenceDataset:
        """Samples ``index`` ([n] int64 or [N] bool); the behaviour store is shared, not copied."""
        return SequenceDataset(
            self.user[index],
            self.target[index],
            self.label[index],
            self.hist_start[index],
            self.hist_len[index],
            self.context[index],
            self.seq,
            self.max_len,
            self.attr_names,
            self.attr_vocab,
            self.context_names,
            self.context_vocab,
            dict(self.info),
        )

    def batch(self, index: torch.Tensor) -> Batch:
        """Gather samples ``index`` [b] into a padded :class:`Batch` with T = ``max_len``."""
        lengths = self.hist_len[index]
        start = self.hist_start[index]
        steps = torch.arange(self.max_len, dtype=torch.int64)
        valid = steps.unsqueeze(0) < lengths.unsqueeze(1)  # [b, T]
        # Clamp padded positions to a real row (0) and zero them afterwards, so
        # the gather never reads out of bounds and padding is exactly 0.
        pos = torch.where(valid, start.unsqueeze(1) + steps.unsqueeze(0), torch.zeros((), dtype=torch.int64))
        history = self.seq[pos] * valid.unsqueeze(-1)  # [b, T, A]
        return Batch(
            self.user[index], self.target[index], history, lengths, self.context[index], self.label[index]
        )

    def id_counts(self) -> list[torch.Tensor]:
        """Per attribute a: [attr_vocab[a]] float, the number of samples in which each id occurs.

        An id "occurs" in a sample when it is the target's attribute or any valid
        behaviour of the sample; it is counted once per sample however often it
        repeats there.  These are the n_j of mini-batch aware regularisation.
        Padding (id 0) always gets count 0.
        """
        counts = [torch.zeros(v, dtype=torch.float64) for v in self.attr_vocab]
        n = len(self)
        chunk = max(1, 1 << 20 >> max(1, (self.max_len + 1).bit_length()))  # ~1M ids per chunk
        for lo in range(0, n, chunk):
            idx = torch.arange(lo, min(n, lo + chunk))
            b = self.batch(idx)
            for a in range(len(self.attr_vocab)):
                ids = torch.cat([b.target[:, a : a + 1], b.history[:, :, a]], dim=1)  # [c, T+1]
                ids, _ = torch.sort(ids, dim=1)
                # After sorting, an id's first copy in its row is where it differs from its left neighbour.
                first = torch.ones_like(ids, dtype=torch.bool)
                first[:, 1:] = ids[:, 1:] != ids[:, :-1]
                ids = ids[first & (ids != 0)]
                counts[a] += torch.bincount(ids, minlength=self.attr_vocab[a]).to(torch.float64)
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
    )


def split_by_user(
    ds: SequenceDataset, test_frac: float, seed: int
) -> tuple[SequenceDataset, SequenceDataset]:
    """Split samples by user: a seeded random ``test_frac`` of users go to test.

    All of a user's samples land on one side, so test users are unseen in
    training.  The permutation depends only on ``seed`` and the sorted user ids.
    """
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    users = torch.unique(ds.user)  # sorted
    if users.numel() < 2:
        raise DataError(f"need at least 2 users to split by user, got {users.numel()}")
    g = torch.Generator().manual_seed(int(seed))
    perm = users[torch.randperm(users.numel(), generator=g)]
    n_test = min(users.numel() - 1, max(1, round(test_frac * users.numel())))
    is_test_user = torch.zeros(int(users.max()) + 1, dtype=torch.bool)
    is_test_user[perm[:n_test]] = True
    test = is_test_user[ds.user]
    return ds.subset(~test), ds.subset(test)


# --------------------------------------------------------------------------- #
# Batching (single process or DDP shards)
# --------------------------------------------------------------------------- #
def iterate_batches(
    ds: SequenceDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
):
    """Yield this rank's :class:`Batch` es for one pass over ``ds``.

    ``batch_size`` is per rank.  Training (``shuffle=True``): every rank draws the
    same permutation from ``seed``; step i uses the global slice
    ``perm[i*B*W:(i+1)*B*W]`` and rank r takes every W-th sample of it from r.
    DDP's gradient average over ranks then equals the gradient of that whole
    global batch, and every rank runs the same number of steps (DDP requires
    it).  The last global batch is cut to a multiple of W, dropping at most W-1
    samples per epoch (none when W=1).

    Evaluation (``shuffle=False``): rank r takes samples r, r+W, ... in order, so
    the shards cover every sample exactly once; ranks may differ by one batch.
    """
    n = len(ds)
    if shuffle:
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(n, generator=g)
        step = batch_size * world_size
        for lo in range(0, n, step):
            glob = perm[lo : lo + step]
            usable = glob.numel() - glob.numel() % world_size
            if usable == 0:
                break
            yield ds.batch(glob[:usable][rank::world_size])
    else:
        mine = torch.arange(rank, n, world_size)
        for lo in range(0, mine.numel(), batch_size):
            yield ds.batch(mine[lo : lo + batch_size])


def num_train_steps(n: int, batch_size: int, world_size: int) -> int:
    """Number of batches :func:`iterate_batches` yields per rank with ``shuffle=True``."""
    step = batch_size * world_size
    full, rem = divmod(n, step)
    return full + (1 if rem >= world_size else 0)


# --------------------------------------------------------------------------- #
# MovieLens
# --------------------------------------------------------------------------- #
def default_movielens_dir() -> Path | None:
    """Where to find ml-latest-small when no directory is given, or None.

    ``$DIN_FUSED_DATA`` may name the ml-latest-small directory itself or a
    directory that contains it.  Otherwise ``../shared/data/ml-latest-small``
    beside the repository checkout is tried (the development layout).
    """
    candidates = []
    env = os.environ.get("DIN_FUSED_DATA")
    if env:
        candidates += [Path(env), Path(env) / "ml-latest-small"]
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small")
    for c in candidates:
        if (c / "ratings.csv").is_file() and (c / "movies.csv").is_file():
            return c
    return None


def _open_csv(path: Path, header: Sequence[str]):
    if not path.is_file():
        raise DataError(
            f"missing data file: {path} (expected a MovieLens {path.name} with columns {','.join(header)})"
        )
    fh = open(path, newline="", encoding="utf-8")
    reader = csv.reader(fh)
    first = next(reader, None)
    if first is None or [c.strip() for c in first] != list(header):
        fh.close()
        raise DataError(f"{path}: line 1: expected header {','.join(header)}, got {','.join(first or [])!r}")
    return fh, reader


def read_movielens_events(data_dir: str | os.PathLike) -> EventLog:
    """Read ``ratings.csv`` and ``movies.csv`` of a MovieLens "latest" directory.

    Attributes: ``movie`` (ids remapped densely to 1..n in order of first
    appearance in movies.csv) and ``genre`` (the movie's *first* listed genre,
    remapped to 1..g in order of first appearance; "(no genres listed)" is a
    genre of its own).  Label: rating >= 4.  No context features.

    Raises :class:`DataError` for a missing directory or file, a wrong header, a
    row with the wrong number of fields, a non-numeric value, a rating outside
    0.5..5, a duplicate movieId, or a rating of a movie absent from movies.csv.
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory not found: {d}")
    movies_path = d / "movies.csv"
    ratings_path = d / "ratings.csv"

    movie_index: dict[int, int] = {}
    genre_index: dict[str, int] = {}
    movie_genre: list[int] = [0]  # row 0: padding
    fh, reader = _open_csv(movies_path, ("movieId", "title", "genres"))
    with fh:
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != 3:
                raise DataError(
                    f"{movies_path}: line {line}: expected 3 fields movieId,title,genres, "
                    f"got {len(row)}: {row!r}"
                )
            try:
                mid = int(row[0])
            except ValueError:
                raise DataError(f"{movies_path}: line {line}: movieId {row[0]!r} is not an integer") from None
            if mid in movie_index:
                raise DataError(f"{movies_path}: line {line}: duplicate movieId {mid}")
            genre = row[2].split("|")[0].strip() or "(no genres listed)"
            movie_index[mid] = len(movie_index) + 1
            movie_genre.append(genre_index.setdefault(genre, len(genre_index) + 1))
    if not movie_index:
        raise DataError(f"{movies_path}: no movies")

    users: list[int] = []
    movies: list[int] = []
    labels: list[float] = []
    times: list[int] = []
    fh, reader = _open_csv(ratings_path, ("userId", "movieId", "rating", "timestamp"))
    with fh:
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != 4:
                raise DataError(
                    f"{ratings_path}: line {line}: expected 4 fields userId,movieId,rating,timestamp, "
                    f"got {len(row)}: {row!r}"
                )
            try:
                uid, mid, rating, ts = int(row[0]), int(row[1]), float(row[2]), int(row[3])
            except ValueError:
                raise DataError(f"{ratings_path}: line {line}: non-numeric value in {row!r}") from None
            if not (math.isfinite(rating) and 0.0 <= rating <= 5.0):
                raise DataError(f"{ratings_path}: line {line}: rating {row[2]!r} outside 0..5")
            midx = movie_index.get(mid)
            if midx is None:
                raise DataError(f"{ratings_path}: line {line}: movieId {mid} is not in {movies_path.name}")
            users.append(uid)
            movies.append(midx)
            labels.append(1.0 if rating >= 4.0 else 0.0)
            times.append(ts)
    if not users:
        raise DataError(f"{ratings_path}: no ratings")

    uid_arr = np.asarray(users, dtype=np.int64)
    _, user_dense = np.unique(uid_arr, return_inverse=True)  # dense 0..U-1, ordered by userId
    movie_arr = np.asarray(movies, dtype=np.int64)
    genre_of = np.asarray(movie_genre, dtype=np.int64)
    attrs = np.stack([movie_arr, genre_of[movie_arr]], axis=1)
    return EventLog(
        user=user_dense.astype(np.int64),
        attrs=attrs,
        label=np.asarray(labels, dtype=np.float32),
        time=np.asarray(times, dtype=np.int64),
        attr_names=("movie", "genre"),
        attr_vocab=(len(movie_index) + 1, len(genre_index) + 1),
    )


def load_movielens(data_dir: str | os.PathLike, max_len: int = 50) -> SequenceDataset:
    """:func:`read_movielens_events` followed by :func:`build_samples`."""
    ds = build_samples(read_movielens_events(data_dir), max_len)
    ds.info.update(dataset="movielens", data_dir=str(Path(data_dir).resolve()))
    return ds


# --------------------------------------------------------------------------- #
# Synthetic data
# --------------------------------------------------------------------------- #
def synthetic_events(
    num_users: int = 3000,
    num_items: int = 2000,
    num_categories: int = 50,
    events_per_user: tuple[int, int] = (20, 60),
    interests_per_user: tuple[int, int] = (2, 4),
    p_interest: float = 0.6,
    num_slots: int = 8,
    seed: int = 0,
) -> EventLog:
    """A click log with hidden per-user category interests; deterministic given ``seed``.

    Every item has a fixed category and a quality q_i ~ N(0, 0.5).  Every user
    has a few hidden interest categories.  A user's impressions are drawn from
    the interest categories with probability ``p_interest``, otherwise from all
    items, and each impression happens in one of ``num_slots`` context slots
    (a context feature with its own click bias).  The click probability is

        sigmoid(-1.5 + 2.5 * [category is one of the user's interests] + q_i + slot_bias)

    so the label depends on how the candidate's category relates to *this*
    user's interests, which the model can only read off the behaviour sequence.
    Because users have several interests and many categories, a mean or sum of
    the history dilutes the one that matters for the candidate; an attention
    that looks at behaviours of the candidate's category does not.  That is why
    attention measurably helps here.  All randomness comes from one NumPy
    ``Generator(PCG64(seed))``, so the log is identical on every platform.

    Attributes: ``item`` 1..num_items, ``category`` 1..num_categories.
    Context: ``slot`` 1..num_slots.
    """
    if num_users < 2 or num_items < 1 or num_categories < 1:
        raise ValueError("synthetic data needs num_users >= 2, num_items >= 1, num_categories >= 1")
    lo_k, hi_k = interests_per_user
    if not 1 <= lo_k <= hi_k <= num_categories:
        raise ValueError(
            f"interests_per_user must satisfy 1 <= lo <= hi <= num_categories, got {interests_per_user}"
        )
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    item_cate = rng.integers(1, num_categories + 1, size=num_items + 1)
    item_cate[0] = 0  # padding row
    quality = rng.normal(0.0, 0.5, size=num_items + 1)
    slot_bias = rng.normal(0.0, 0.5, size=num_slots + 1)
    # Items grouped by category (CSR layout) to draw "an item of category c" for many events at once.
    by_cate = np.argsort(item_cate[1:], kind="stable") + 1
    cate_size = np.bincount(item_cate[1:], minlength=num_categories + 1)
    cate_offset = np.r_[0, np.cumsum(cate_size)[:-1]]
    nonempty = np.flatnonzero(cate_size[1:]) + 1
    # Hidden interests: k_u distinct non-empty categories per user, padded into [U, hi_k].
    k = np.minimum(rng.integers(lo_k, hi_k + 1, size=num_users), nonempty.size)
    interests = np.zeros((num_users, hi_k), dtype=np.int64)
    likes = np.zeros((num_users, num_categories + 1), dtype=bool)  # likes[u, c]: c is one of u's interests
    for u in range(num_users):
        cats = rng.choice(nonempty, size=k[u], replace=False)
        interests[u, : k[u]] = cats
        likes[u, cats] = True
    counts = rng.integers(events_per_user[0], events_per_user[1] + 1, size=num_users)
    m = int(counts.sum())
    user = np.repeat(np.arange(num_users, dtype=np.int64), counts)
    random_item = rng.integers(1, num_items + 1, size=m)
    which = (rng.random(m) * k[user]).astype(np.int64)  # which of the user's interests
    cat = interests[user, which]
    interest_item = by_cate[cate_offset[cat] + (rng.random(m) * cate_size[cat]).astype(np.int64)]
    items = np.where(rng.random(m) < p_interest, interest_item, random_item)
    interested = likes[user, item_cate[items]]
    slot = rng.integers(1, num_slots + 1, size=m)
    logit = -1.5 + 2.5 * interested + quality[items] + slot_bias[slot]
    label = (rng.random(m) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    # Time: position within the user's stream, so every event has a distinct time.
    time = np.arange(m, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return EventLog(
        user=user,
        attrs=np.stack([items, item_cate[items]], axis=1).astype(np.int64),
        label=label,
        time=time,
        attr_names=("item", "category"),
        attr_vocab=(num_items + 1, num_categories + 1),
        context=slot.reshape(-1, 1).astype(np.int64),
        context_names=("slot",),
        context_vocab=(num_slots + 1,),
    )


def make_synthetic(num_users: int = 3000, max_len: int = 50, seed: int = 0, **kwargs) -> SequenceDataset:
    """:func:`synthetic_events` followed by :func:`build_samples`."""
    ds = build_samples(synthetic_events(num_users=num_users, seed=seed, **kwargs), max_len)
    ds.info.update(dataset="synthetic", num_users=num_users, seed=seed)
    return ds
