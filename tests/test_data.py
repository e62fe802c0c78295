"""The MovieLens loader on small generated CSVs, the synthetic generator, splitting and batching."""

from pathlib import Path

import common
import numpy as np
import pytest
import torch
from common import movielens_dir

from din_fused import data as D
from din_fused.data.batching import gather_jagged

MOVIES = """movieId,title,genres
10,"Heat, The (1995)",Action|Crime|Thriller
20,Toy Story (1995),Animation|Children
30,Nothing (2000),(no genres listed)
40,Unrated (2001),Drama
"""

# user 5 rates 10 at t=100, then 20 and 30 at the same second t=200, then 40 at t=300.
# user 2 rates 20 at t=50 and 10 at t=60.  Rows are deliberately not sorted.
RATINGS = """userId,movieId,rating,timestamp
5,40,2.5,300
5,10,4.0,100
2,10,3.5,60
5,20,5.0,200
5,30,1.0,200
2,20,4.5,50
"""


def write_ml(dir_: Path, ratings=RATINGS, movies=MOVIES) -> Path:
    return common.write_ml(dir_, ratings, movies)


def sample_rows(ds):
    """{(user, movie): (label, category, [history movies])} decoded from a dataset."""
    b = ds.batch(torch.arange(len(ds)))
    out = {}
    for i in range(len(ds)):
        hist = b.history[i, : b.lengths[i], 0].tolist()
        out[(int(b.user[i]), int(b.target[i, 0]))] = (float(b.label[i]), int(b.target[i, 1]), hist)
    return out


def test_movielens_protocol(tmp_path):
    log = D.read_movielens_events(write_ml(tmp_path / "ml"))
    # movies remapped in movies.csv order: 10->1, 20->2, 30->3, 40->4; first genres
    # Action->1, Animation->2, (no genres listed)->3, Drama->4.
    assert log.attr_names == ("movie", "genre")
    assert log.attr_vocab == (5, 5)
    ds = D.build_samples(log, max_len=5)
    assert len(ds) == 6
    rows = sample_rows(ds)
    # users are dense by userId: 2 -> 0, 5 -> 1
    assert rows[(0, 2)] == (1.0, 2, [])  # first rating of user 2: empty history
    assert rows[(0, 1)] == (0.0, 1, [2])  # 3.5 < 4 is negative
    assert rows[(1, 1)] == (1.0, 1, [])
    # 20 and 30 share t=200: neither sees the other, both see movie 10.
    assert rows[(1, 2)] == (1.0, 2, [1])
    assert rows[(1, 3)] == (0.0, 3, [1])
    # t=300 sees everything earlier, in time order (ties keep file order).
    assert rows[(1, 4)] == (0.0, 4, [1, 2, 3])
    # Padding beyond each length is exactly zero.
    b = ds.batch(torch.arange(len(ds)))
    pad = torch.arange(5)[None, :] >= b.lengths[:, None]
    assert torch.all(b.history[pad] == 0)


def test_movielens_keeps_latest_max_len(tmp_path):
    ratings = "userId,movieId,rating,timestamp\n" + "".join(
        f"1,{m},4.0,{t}\n" for t, m in enumerate([10, 20, 30, 40])
    )
    ds = D.build_samples(D.read_movielens_events(write_ml(tmp_path, ratings=ratings)), max_len=2)
    rows = sample_rows(ds)
    assert rows[(0, 4)][2] == [2, 3]  # the two latest of [1, 2, 3]
    assert rows[(0, 3)][2] == [1, 2]
    assert rows[(0, 2)][2] == [1]
    assert int(ds.hist_len.max()) == 2


def test_load_movielens_info(tmp_path):
    ds = D.load_movielens(write_ml(tmp_path / "x"), max_len=3)
    assert ds.info["dataset"] == "movielens" and ds.max_len == 3
    assert ds.batch(torch.arange(2)).history.shape == (2, 3, 2)


@pytest.mark.parametrize(
    "ratings, movies, match",
    [
        ("userId,movieId,rating,timestamp\n1,10,4.0\n", MOVIES, r"ratings.csv: line 2: expected 4 fields"),
        ("userId,movieId,rating,timestamp\n1,10,4.0,5\n1,xx,4.0,5\n", MOVIES, r"line 3: non-numeric"),
        ("userId,movieId,rating,timestamp\n1,10,9.0,5\n", MOVIES, r"line 2: rating '9.0' outside"),
        ("userId,movieId,rating,timestamp\n1,99,4.0,5\n", MOVIES, r"line 2: movieId 99 is not in movies.csv"),
        ("user,movie,rating,ts\n1,10,4.0,5\n", MOVIES, r"ratings.csv: line 1: expected header"),
        ("userId,movieId,rating,timestamp\n", MOVIES, r"no ratings"),
        ("userId,movieId,rating,timestamp\n1,10,4.0,5\n" + "9" * 20 + ",10,4.0,5\n", MOVIES,
         r"ratings.csv: line 3: userId 9+ does not fit in int64"),
        ("userId,movieId,rating,timestamp\n1,10,4.0," + "9" * 20 + "\n", MOVIES,
         r"line 2: timestamp 9+ does not fit in int64"),
        (RATINGS, "movieId,title,genres\n" + "9" * 20 + ",A,Drama\n",
         r"movies.csv: line 2: movieId 9+ does not fit"),
        (
            RATINGS,
            "movieId,title,genres\n10,A,Drama\n10,B,Drama\n",
            r"movies.csv: line 3: duplicate movieId 10",
        ),
        (
            RATINGS,
            "movieId,title,genres\n10,Heat, The (1995),Action\n",
            r"movies.csv: line 2: expected 3 fields",
        ),
    ],
)
def test_movielens_malformed(tmp_path, ratings, movies, match):
    with pytest.raises(D.DataError, match=match):
        D.read_movielens_events(write_ml(tmp_path, ratings=ratings, movies=movies))


def test_movielens_missing_dir_and_files(tmp_path):
    with pytest.raises(D.DataError, match="data directory not found"):
        D.load_movielens(tmp_path / "nope")
    (tmp_path / "movies.csv").write_text(MOVIES)
    with pytest.raises(D.DataError, match="missing data file: .*ratings.csv"):
        D.load_movielens(tmp_path)
    assert issubclass(D.DataError, ValueError)


def test_split_by_user(tmp_path):
    ds = D.make_synthetic(num_users=50, seed=3, max_len=10)
    tr, va, te = D.split_by_user(ds, 0.1, 0.2, seed=7)
    assert len(tr) + len(va) + len(te) == len(ds)
    tr_users, va_users, te_users = (set(x.user.tolist()) for x in (tr, va, te))
    assert not tr_users & te_users and not tr_users & va_users and not va_users & te_users
    assert (len(tr_users), len(va_users), len(te_users)) == (35, 5, 10)
    tr2, va2, te2 = D.split_by_user(ds, 0.1, 0.2, seed=7)
    assert torch.equal(te.user, te2.user) and torch.equal(va.target, va2.target)
    _, _, te3 = D.split_by_user(ds, 0.1, 0.2, seed=8)
    assert set(te3.user.tolist()) != te_users
    # Without validation, validation is empty and the test users are the same draw.
    tr0, va0, te0 = D.split_by_user(ds, 0.0, 0.2, seed=7)
    assert len(va0) == 0 and set(te0.user.tolist()) == te_users and len(tr0) + len(te0) == len(ds)
    # Subsets share the behaviour store and still decode the same histories.
    idx = torch.nonzero(torch.isin(ds.user, te.user)).squeeze(1)
    assert torch.equal(ds.batch(idx).history, te.batch(torch.arange(len(te))).history)
    assert te.vocab is ds.vocab
    with pytest.raises(ValueError, match="test_frac"):
        D.split_by_user(ds, 0.1, 1.0, seed=0)
    with pytest.raises(ValueError, match="val_frac"):
        D.split_by_user(ds, 0.5, 0.5, seed=0)
    tiny = ds.subset(ds.user < 2)
    with pytest.raises(D.DataError, match="2 users cannot be split"):
        D.split_by_user(tiny, 0.1, 0.1, seed=0)


def test_vocab_maps_raw_ids_to_rows(tmp_path):
    log = D.read_movielens_events(write_ml(tmp_path / "ml"))
    v = log.vocab
    assert v.item_rows() == {10: 1, 20: 2, 30: 3, 40: 4}
    # Each item row's attributes are the rows the events use (movie, first genre).
    assert v.item_attrs.tolist() == [[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]]
    for row in log.attrs.tolist():
        assert v.item_attrs[row[0]].tolist() == row
    syn = D.synthetic_events(num_users=30, num_items=50, num_categories=7, seed=2)
    for row in syn.attrs.tolist():
        assert syn.vocab.item_attrs[row[0]].tolist() == row
    assert syn.vocab.context_rows() == [{i: i for i in range(1, syn.context_vocab[0])}]
    back = D.Vocab.from_state_dict(syn.vocab.state_dict())
    assert np.array_equal(back.item_attrs, syn.vocab.item_attrs)


def test_package_keeps_flat_imports():
    """``din_fused.data`` is a package split by concern; every public name stays importable from it."""
    import din_fused.data.batching
    import din_fused.data.loading
    import din_fused.data.protocol

    for name in D.__all__:
        assert getattr(D, name) is not None
    assert D.Batch is din_fused.data.batching.Batch
    assert D.read_movielens_events is din_fused.data.loading.read_movielens_events
    assert D.split_by_user is din_fused.data.protocol.split_by_user


def test_default_movielens_dir_only_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("DIN_FUSED_DATA", raising=False)
    assert D.default_movielens_dir() is None
    d = write_ml(tmp_path / "ml-latest-small")
    monkeypatch.setenv("DIN_FUSED_DATA", str(tmp_path))
    assert D.default_movielens_dir() == d


def test_synthetic_deterministic_and_in_range():
    a = D.synthetic_events(num_users=40, num_items=100, num_categories=10, seed=11)
    b = D.synthetic_events(num_users=40, num_items=100, num_categories=10, seed=11)
    c = D.synthetic_events(num_users=40, num_items=100, num_categories=10, seed=12)
    for f in ("user", "attrs", "label", "time", "context"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.attrs, c.attrs)
    assert a.attrs[:, 0].min() >= 1 and a.attrs[:, 0].max() <= 100
    assert a.attrs[:, 1].min() >= 1 and a.attrs[:, 1].max() <= 10
    assert a.context.min() >= 1 and a.context.max() < a.context_vocab[0]
    assert set(np.unique(a.label).tolist()) <= {0.0, 1.0}
    # An item's category is fixed.
    cat_of = {}
    for item, cat in a.attrs.tolist():
        assert cat_of.setdefault(item, cat) == cat


def test_synthetic_labels_follow_history_interest():
    """Clicks are likelier when the candidate's category already appears in the history.

    That is the hidden-interest structure attention is meant to find.
    """
    ds = D.make_synthetic(num_users=400, seed=0, max_len=50)
    b = ds.batch(torch.arange(len(ds)))
    valid = torch.arange(50)[None, :] < b.lengths[:, None]
    seen = ((b.history[:, :, 1] == b.target[:, 1:2]) & valid).sum(1)
    has = b.lengths >= 10
    hi = b.label[has & (seen >= 3)].mean().item()
    lo = b.label[has & (seen == 0)].mean().item()
    assert hi > lo + 0.2, (hi, lo)


def test_iterate_batches_shards():
    ds = D.make_synthetic(num_users=30, seed=1, max_len=8)
    n = len(ds)
    # Evaluation: every sample exactly once across ranks.
    seen = []
    for r in range(3):
        for b in D.iterate_batches(ds, 7, shuffle=False, rank=r, world_size=3):
            seen.append(b)
    targets = torch.cat([b.target for b in seen])
    assert targets.shape[0] == n
    assert sorted(map(tuple, targets.tolist())) == sorted(map(tuple, ds.target.tolist()))
    # Training: ranks' step-i batches partition the single-process step-i batch.
    single = list(D.iterate_batches(ds, 10, shuffle=True, seed=5))
    ranks = [list(D.iterate_batches(ds, 5, shuffle=True, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == D.num_train_steps(n, 5, 2)
    assert len(single) == D.num_train_steps(n, 10, 1)
    for i in range(len(ranks[0]) - 1):
        merged = torch.cat([ranks[0][i].target, ranks[1][i].target])
        assert sorted(map(tuple, merged.tolist())) == sorted(map(tuple, single[i].target.tolist()))
    assert sum(b.label.numel() for rk in ranks for b in rk) >= n - 1


@pytest.mark.parametrize("kw, match", [
    ({"rank": 2, "world_size": 2}, r"rank must be in \[0, world_size\) = \[0, 2\), got 2"),
    ({"rank": -1, "world_size": 2}, "rank must be an int >= 0"),
    ({"world_size": 0}, "world_size must be an int >= 1"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"batch_size": -4}, "batch_size must be an int >= 1"),
    ({"batch_size": 2.0}, "batch_size must be an int"),
])
def test_iterate_batches_refuses_bad_arguments_when_called(kw, match):
    """A rank outside [0, world_size) read another rank's shard (or, negative, wrapped to the end);
    a batch_size below 1 yielded nothing. Refused at the call, before any batch."""
    ds = D.make_synthetic(num_users=10, seed=1, max_len=4)
    args = {"batch_size": 4, **kw}
    for shuffle in (False, True):
        with pytest.raises(ValueError, match=match):
            D.iterate_batches(ds, shuffle=shuffle, **args)
    assert len(list(D.iterate_batches(ds, np.int64(4), shuffle=False))) == -(-len(ds) // 4)


def test_id_counts_count_samples_containing_the_id(tmp_path):
    # One user: movies 10, 20, 10 (again), 30 -> ids 1, 2, 1, 3.  Samples and the ids they contain:
    #   target 1, history []      -> {1}
    #   target 2, history [1]     -> {1, 2}
    #   target 1, history [1, 2]  -> {1, 2}      (1 twice, counted once)
    #   target 3, history [1,2,1] -> {1, 2, 3}
    ratings = "userId,movieId,rating,timestamp\n1,10,4,1\n1,20,4,2\n1,10,4,3\n1,30,4,4\n"
    ds = D.build_samples(D.read_movielens_events(write_ml(tmp_path, ratings=ratings)), max_len=10)
    movie, genre = ds.id_counts()
    assert movie.tolist() == [0, 4, 3, 1, 0]
    assert genre.tolist() == [0, 4, 3, 1, 0]  # genres Action, Animation, (none) follow the movies


@pytest.mark.skipif(movielens_dir() is None, reason="ml-latest-small not found (set DIN_FUSED_DATA)")
def test_real_movielens_small():
    ds = D.load_movielens(movielens_dir(), max_len=50)
    assert len(ds) == 100836
    assert ds.num_users == 610
    assert ds.attr_vocab == (9743, 20)  # 9742 movies, 19 distinct first genres, + padding rows
    assert 0.45 < ds.label.mean().item() < 0.51
    tr, va, te = D.split_by_user(ds, 0.1, 0.1, seed=0)
    assert te.num_users == 61 and va.num_users == 61 and len(tr) + len(va) + len(te) == len(ds)


def test_gather_jagged_windows():
    seq = torch.arange(20).reshape(10, 2)
    values, offsets = gather_jagged(seq, torch.tensor([3, 0, 9, 5]), torch.tensor([2, 0, 1, 4]))
    assert offsets.tolist() == [0, 2, 2, 3, 7]
    assert values.tolist() == [[6, 7], [8, 9], [18, 19], [10, 11], [12, 13], [14, 15], [16, 17]]
    # A negative length or a window past the store: a ValueError, not an abort in repeat_interleave
    for start, lengths in (([0, 1], [-1, 2]), ([9, 0], [2, 1]), ([-1, 0], [1, 1])):
        with pytest.raises(ValueError, match="lengths must be >= 0 and every window"):
            gather_jagged(seq, torch.tensor(start), torch.tensor(lengths))


@pytest.mark.parametrize("shuffle", [False, True])
def test_jagged_batches_hold_the_padded_batches_without_padding(shuffle):
    """iterate_batches(layout="jagged") yields the same samples, in the same order, as the padded
    layout, each row's valid behaviours back to back and nothing else."""
    ds = D.make_synthetic(num_users=30, seed=2, max_len=9)
    padded = list(D.iterate_batches(ds, 7, shuffle=shuffle, seed=4))
    jagged = list(D.iterate_batches(ds, 7, shuffle=shuffle, seed=4, layout="jagged"))
    assert len(padded) == len(jagged) > 1
    for p, j in zip(padded, jagged):
        assert isinstance(j, D.JaggedBatch)
        for f in ("user", "target", "context", "label"):
            assert torch.equal(getattr(p, f), getattr(j, f)), f
        assert torch.equal(j.lengths, p.lengths) and j.offsets[0] == 0
        valid = torch.arange(p.history.shape[1])[None, :] < p.lengths[:, None]
        assert j.values.shape[0] == int(p.lengths.sum())
        assert torch.equal(j.values, p.history[valid])
    assert any(bool((p.lengths < p.history.shape[1]).any()) for p in padded)  # some rows were padded


def test_event_log_refuses_labels_and_ids_it_would_misread():
    """Labels outside {0, 1} (a 2 or a NaN would train as a click) and float ids (1.5 would
    become user 1) are refused by name."""
    ok = dict(user=np.array([1, 2]), attrs=np.array([[1, 1], [2, 1]]), label=np.array([0.0, 1.0], np.float32),
              time=np.array([0, 1]), attr_names=("item", "cat"), attr_vocab=(3, 2))
    D.EventLog(**ok)
    bad = [(dict(label=np.array([0.0, 2.0], np.float32)), "label must hold 0 or 1, got 2"),
           (dict(label=np.array([np.nan, 1.0], np.float32)), "label must hold 0 or 1, got nan"),
           (dict(user=np.array([1.5, 2.0])), "user must hold integer ids"),
           # A -1 user was split with the largest id's part; ids outside a table read other rows.
           (dict(user=np.array([-1, 2])), "user must hold ids >= 0, got -1"),
           (dict(attrs=np.array([[1, 1], [3, 1]])),
            r"attrs\[:, 0\] \(item\) must hold ids in \[1, 3\), got \[1, 3\]"),
           (dict(attrs=np.array([[1, 0], [2, 1]])), r"attrs\[:, 1\] \(cat\) must hold ids in \[1, 2\)"),
           (dict(context=np.array([[1], [5]]), context_names=("slot",), context_vocab=(5,)),
            r"context\[:, 0\] \(slot\) must hold ids in \[1, 5\)")]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            D.EventLog(**{**ok, **change})
