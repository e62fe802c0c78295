"""Reading interaction logs: MovieLens CSVs and the synthetic generator, into an :class:`EventLog`.

Also the :class:`Vocab` (raw ids -> embedding rows) that a checkpoint keeps so
that ``din_fused.predict`` can score requests written in raw ids.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DataError",
    "EventLog",
    "Vocab",
    "read_movielens_events",
    "synthetic_events",
    "default_movielens_dir",
]


class DataError(ValueError):
    """Malformed or missing input data; the message names the file, line and problem."""


@dataclass
class Vocab:
    """Raw ids behind the embedding rows; what scoring raw-id requests needs.

    item_raw     [V0] int64: raw id (e.g. MovieLens movieId) of each row of
                 attribute 0 (the item); entry 0 (padding) is -1
    item_attrs   [V0, A] int64: the rows of every attribute of each item row
                 (column 0 is the row itself, then e.g. its category); row 0 is 0
    context_raw  per context feature f, [V_f] int64 raw id of each row (entry 0: -1)

    Attributes other than the item (e.g. the genre) are looked up from the item,
    so a request only names items.
    """

    item_raw: np.ndarray
    item_attrs: np.ndarray
    context_raw: tuple[np.ndarray, ...] = ()

    def __post_init__(self) -> None:
        v = self.item_raw.shape[0]
        if self.item_raw.ndim != 1 or self.item_attrs.ndim != 2 or self.item_attrs.shape[0] != v:
            raise ValueError("Vocab: item_raw must be [V] and item_attrs [V, A]")

    def item_rows(self) -> dict[int, int]:
        """raw item id -> item row (padding excluded)."""
        return {int(r): i for i, r in enumerate(self.item_raw.tolist()) if i > 0}

    def context_rows(self) -> list[dict[int, int]]:
        """Per context feature: raw id -> row (padding excluded)."""
        return [{int(r): i for i, r in enumerate(c.tolist()) if i > 0} for c in self.context_raw]

    def state_dict(self) -> dict:
        """Tensors only, so ``torch.load(weights_only=True)`` can read a checkpoint back."""
        return {
            "item_raw": torch.from_numpy(np.ascontiguousarray(self.item_raw, dtype=np.int64)),
            "item_attrs": torch.from_numpy(np.ascontiguousarray(self.item_attrs, dtype=np.int64)),
            "context_raw": [
                torch.from_numpy(np.ascontiguousarray(c, dtype=np.int64)) for c in self.context_raw
            ],
        }

    @classmethod
    def from_state_dict(cls, d: dict) -> Vocab:
        return cls(
            d["item_raw"].numpy(), d["item_attrs"].numpy(), tuple(c.numpy() for c in d["context_raw"])
        )


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
    vocab  the raw ids behind the rows (see :class:`Vocab`), or None
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
    vocab: Vocab | None = None

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
        if m and not np.all((self.label == 0) | (self.label == 1)):
            bad = self.label[~((self.label == 0) | (self.label == 1))][0]
            raise ValueError(f"EventLog.label must hold 0 or 1, got {bad}")
        for name, ids in (("user", self.user), ("attrs", self.attrs), ("context", self.context)):
            if ids.size and not np.issubdtype(np.asarray(ids).dtype, np.integer):
                raise ValueError(f"EventLog.{name} must hold integer ids, got dtype {np.asarray(ids).dtype}")
        # Out-of-range ids would index other users' parts in split_by_user (a -1 is the largest id)
        # or other rows of the tables.
        if m and self.user.min() < 0:
            raise ValueError(f"EventLog.user must hold ids >= 0, got {self.user.min()}")
        for name, ids, sizes, names in (("attrs", self.attrs, self.attr_vocab, self.attr_names),
                                        ("context", self.context, self.context_vocab, self.context_names)):
            for c in range(ids.shape[1] if m else 0):
                lo, hi = ids[:, c].min(), ids[:, c].max()
                if lo < 1 or hi >= sizes[c]:
                    raise ValueError(f"EventLog.{name}[:, {c}] ({names[c]}) must hold ids in "
                                     f"[1, {sizes[c]}), got [{lo}, {hi}]")


# --------------------------------------------------------------------------- #
# MovieLens
# --------------------------------------------------------------------------- #
def _check_int64(v: int, name: str, path: Path, line: int) -> None:
    """The ids and times end in int64 arrays, where a larger int raises a bare OverflowError."""
    if not -(2**63) <= v < 2**63:
        raise DataError(f"{path}: line {line}: {name} {v} does not fit in int64")


def default_movielens_dir() -> Path | None:
    """Where to find ml-latest-small when no directory is given, or None.

    Only ``$DIN_FUSED_DATA``, naming the ml-latest-small directory itself or a
    directory that contains it.  (No path relative to the package: an
    installed package has no checkout beside it.)
    """
    env = os.environ.get("DIN_FUSED_DATA")
    candidates = [Path(env), Path(env) / "ml-latest-small"] if env else []
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
    0..5 (MovieLens rates 0.5..5 in half stars; 0 is let through), a duplicate
    movieId, or a rating of a movie absent from movies.csv.
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
            _check_int64(mid, "movieId", movies_path, line)
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
            for name, v in (("userId", uid), ("timestamp", ts)):  # a movieId is matched against movies.csv
                _check_int64(v, name, ratings_path, line)
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
    item_rows = np.arange(len(movie_genre), dtype=np.int64)
    vocab = Vocab(
        item_raw=np.asarray([-1, *movie_index.keys()], dtype=np.int64),  # dicts keep insertion order
        item_attrs=np.stack([item_rows, genre_of], axis=1),
    )
    return EventLog(
        user=user_dense.astype(np.int64),
        attrs=attrs,
        label=np.asarray(labels, dtype=np.float32),
        time=np.asarray(times, dtype=np.int64),
        attr_names=("movie", "genre"),
        attr_vocab=(len(movie_index) + 1, len(genre_index) + 1),
        vocab=vocab,
    )


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
        raise DataError("synthetic data needs num_users >= 2, num_items >= 1, num_categories >= 1")
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
        # Synthetic raw ids are the rows themselves.
        vocab=Vocab(
            item_raw=np.r_[-1, np.arange(1, num_items + 1)].astype(np.int64),
            item_attrs=np.stack([np.arange(num_items + 1), item_cate], axis=1).astype(np.int64),
            context_raw=(np.r_[-1, np.arange(1, num_slots + 1)].astype(np.int64),),
        ),
    )
