"""python -m din_fused.predict: raw-id requests scored by a saved model, equal to the model's forward."""

import json

import common
import pytest
import torch

from din_fused import data as D
from din_fused import predict as P
from din_fused import train as T
from din_fused.model import load_checkpoint

torch.set_num_threads(1)

MOVIES = "movieId,title,genres\n" + "".join(f"{m},M{m},{g}\n" for m, g in [
    (10, "Action"), (20, "Comedy"), (30, "Action"), (40, "Drama"), (50, "Comedy|Action"), (60, "Drama")
])


def ml_ratings(users=30, per_user=14):
    lines = ["userId,movieId,rating,timestamp"]
    g = torch.Generator().manual_seed(0)
    for u in range(1, users + 1):
        for i in range(per_user):
            m = 10 * int(torch.randint(1, 7, (1,), generator=g))
            # Pairs of ratings share a second.
            lines.append(f"{u},{m},{4.5 if (m + u) % 20 == 0 else 2.0},{100 + i // 2}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def ml_model(tmp_path_factory):
    """A DIN+Dice trained for two epochs on a MovieLens-format folder whose movieIds are not the rows."""
    tmp = tmp_path_factory.mktemp("ml")
    d = common.write_ml(tmp / "ml", ml_ratings(), MOVIES)
    ckpt = tmp / "din.pt"
    argv = ["--dataset", "movielens", "--data-dir", str(d), "--epochs", "2", "--max-len", "4"]
    argv += ["--batch-size", "32", "--embedding-dim", "4", "--no-progress", "--save", str(ckpt)]
    assert T.main(argv) == 0
    return ckpt, D.load_movielens(d, max_len=4)


def write_lines(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def test_scores_equal_the_models_forward(ml_model, tmp_path, capsys):
    ckpt, ds = ml_model
    ck = load_checkpoint(ckpt)
    raw = ck.vocab.item_raw
    b = ds.batch(torch.arange(len(ds)))
    reqs = []
    for i in range(len(ds)):
        hist = [int(raw[r]) for r in b.history[i, : b.lengths[i], 0].tolist()]
        reqs.append({"user": int(b.user[i]), "history": hist, "candidates": [int(raw[b.target[i, 0]])]})
    inp = write_lines(tmp_path / "req.jsonl", reqs)
    out = tmp_path / "scores.jsonl"
    argv = ["--model", str(ckpt), "--input", str(inp), "--output", str(out), "--batch-size", "50"]
    assert P.main(argv) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["user"] for g in got] == [r["user"] for r in reqs]  # other keys copied through, in order
    scores = torch.tensor([g["scores"][0] for g in got])
    with torch.no_grad():
        want = torch.sigmoid(ck.model(b.target, b.history, b.lengths, b.context))
    torch.testing.assert_close(scores, want, rtol=1e-6, atol=1e-7)
    assert "scored" in capsys.readouterr().err


def test_one_history_many_candidates(ml_model):
    ckpt, _ = ml_model
    s = P.Scorer(load_checkpoint(ckpt))
    many = s.score([{"history": [10, 20, 30], "candidates": [10, 20, 30, 40, 50, 60]}])[0]
    one_by_one = [
        s.score([{"history": [10, 20, 30], "candidates": [c]}])[0][0] for c in (10, 20, 30, 40, 50, 60)
    ]
    assert many == pytest.approx(one_by_one, rel=1e-6, abs=1e-7)
    assert len(set(many)) > 1  # the candidates are told apart


def test_unknown_ids(ml_model):
    """Unknown history ids are dropped; an unknown candidate is the padding row (zero embedding)."""
    ckpt, _ = ml_model
    ck = load_checkpoint(ckpt)
    s = P.Scorer(ck)
    with_unknown = s.score([{"history": [10, 999, 20, 30, 40, 998], "candidates": [50, 777]}])[0]
    # Dropped before truncation to max_len=4: the latest four *known* items are 10, 20, 30, 40.
    known = s.score([{"history": [10, 20, 30, 40], "candidates": [50]}])[0]
    assert with_unknown[0] == known[0]
    assert s.unknown == {"history": 2, "candidates": 1, "context": 0}
    rows = {10: 1, 20: 2, 30: 3, 40: 4}
    hist = torch.tensor(ck.vocab.item_attrs)[[rows[m] for m in (10, 20, 30, 40)]][None]
    with torch.no_grad():
        pad = torch.sigmoid(ck.model(torch.zeros(1, 2, dtype=torch.int64), hist, torch.tensor([4])))
    assert with_unknown[1] == pytest.approx(pad.item(), rel=1e-6)


def test_context_by_name_and_padding(tmp_path):
    ds = D.make_synthetic(num_users=30, max_len=5, seed=1)
    torch.manual_seed(0)
    from din_fused.model import DIN, save

    m = DIN(ds.attr_vocab, ds.context_vocab, 4, activation="prelu").eval()
    path = tmp_path / "syn.pt"
    save(m, path, vocab=ds.vocab, max_len=5, context_names=ds.context_names, attr_names=ds.attr_names)
    s = P.Scorer(load_checkpoint(path))
    req = {"history": [1, 2, 3], "candidates": [4, 5]}
    with_slot = s.score([{**req, "context": {"slot": 3}}])[0]
    no_slot = s.score([req])[0]
    hist = torch.tensor(ds.vocab.item_attrs)[[1, 2, 3]][None].expand(2, -1, -1)
    tgt = torch.tensor(ds.vocab.item_attrs)[[4, 5]]
    with torch.no_grad():
        for ctx, got in ((3, with_slot), (0, no_slot)):
            want = torch.sigmoid(m(tgt, hist, torch.tensor([3, 3]), torch.full((2, 1), ctx)))
            assert got == pytest.approx(want.tolist(), rel=1e-6)
    with pytest.raises(P.RequestError, match="unknown context feature"):
        s.parse(json.dumps({**req, "context": {"hour": 3}}), 1)


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "line 2: not valid JSON"),
        ("[1, 2]", "line 2: expected a JSON object"),
        ('{"history": [1], "candidates": 5}', "line 2: 'candidates' must be a list of integer ids"),
        ('{"candidates": [10]}', "line 2: 'history' must be a list"),
        ('{"history": [true], "candidates": [10]}', "line 2: 'history' must be a list"),
        ('{"history": [], "candidates": [10], "scores": []}', "line 2: the request already has a 'scores'"),
    ],
)
def test_malformed_line_fails_with_its_number_and_writes_nothing(ml_model, tmp_path, capsys, line, match):
    ckpt, _ = ml_model
    inp = write_lines(tmp_path / "req.jsonl", [{"history": [10], "candidates": [20]}, line, "", line])
    out = tmp_path / "scores.jsonl"
    out.write_text("old\n")
    assert P.main(["--model", str(ckpt), "--input", str(inp), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert match in err and str(inp) in err
    assert out.read_text() == "old\n"  # untouched: nothing is written half-done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["req.jsonl", "scores.jsonl"]
    # --skip-malformed: both bad lines skipped and counted, the good one scored.
    argv = ["--model", str(ckpt), "--input", str(inp), "--output", str(out)]
    argv += ["--skip-malformed", "--no-progress"]
    assert P.main(argv) == 0
    assert "skipped 2 malformed line(s)" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 1


def test_progress_and_bad_paths(ml_model, tmp_path, capsys):
    ckpt, _ = ml_model
    inp = write_lines(tmp_path / "req.jsonl", [{"history": [10], "candidates": [20, 30]}] * 200)
    out = tmp_path / "o.jsonl"
    assert P.main(["--model", str(ckpt), "--input", str(inp), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "scoring" in err and "100%" in err and "scored 400 candidates in 200 requests" in err
    assert P.main(["--model", str(tmp_path / "none.pt"), "--input", str(inp), "--output", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert P.main(["--model", str(ckpt), "--input", str(tmp_path / "x"), "--output", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert P.main(["--model", str(ckpt), "--input", str(inp), "--output", str(tmp_path / "a" / "b")]) == 2


def test_a_line_that_is_not_utf8_is_a_malformed_line(ml_model, tmp_path, capsys):
    ckpt, _ = ml_model
    good = json.dumps({"history": [10], "candidates": [20]}).encode()
    inp = tmp_path / "req.jsonl"
    latin1 = b'{"history": [10], "candidates": [20], "note": "caf\xe9"}'
    inp.write_bytes(b"\n".join([good, latin1, good, b""]))
    out = tmp_path / "o.jsonl"
    argv = ["--model", str(ckpt), "--input", str(inp), "--output", str(out), "--no-progress"]
    assert P.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{inp}: line 2: not UTF-8 text (byte 51)" in err and str(ckpt) not in err
    assert not out.exists()
    assert P.main([*argv, "--skip-malformed"]) == 0
    assert "skipped 1 malformed line(s)" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 2


def test_damaged_checkpoints_and_bad_devices_exit_2_with_one_line(ml_model, tmp_path, capsys):
    ckpt, _ = ml_model
    inp = write_lines(tmp_path / "req.jsonl", [{"history": [10], "candidates": [20]}])
    out = tmp_path / "o.jsonl"
    blob = torch.load(ckpt, weights_only=True)
    damaged = {
        "no_config": {k: v for k, v in blob.items() if k != "config"},
        "short_state": {**blob, "state_dict": dict(list(blob["state_dict"].items())[:-1])},
        "bad_config": {**blob, "config": {**blob["config"], "embedding_dim": "four"}},
    }
    for name, b in damaged.items():
        torch.save(b, tmp_path / f"{name}.pt")
        code = P.main(["--model", str(tmp_path / f"{name}.pt"), "--input", str(inp), "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and f"--model: {tmp_path / name}.pt: a damaged din_fused checkpoint" in err, err
        assert "Traceback" not in err
    argv = ["--model", str(ckpt), "--input", str(inp), "--output", str(out), "--no-progress"]
    bad = ["tpu"] + ([] if torch.cuda.is_available() else ["cuda"]) + [f"cuda:{torch.cuda.device_count()}"]
    for dev in bad:
        with pytest.raises(SystemExit) as e:
            P.main([*argv, "--device", dev])
        assert e.value.code == 2 and "--device" in capsys.readouterr().err
    assert not out.exists()
