"""The training CLI: flags, a short run whose loss falls, bad input, MovieLens, and a 2-process DDP run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import common
import pytest
import torch
from common import movielens_dir

import din_fused
from din_fused import data as data_mod
from din_fused import metrics as M
from din_fused import train as T
from din_fused.model import load_checkpoint

MOVIES = """movieId,title,genres
10,"Heat, The (1995)",Action|Crime|Thriller
20,Toy Story (1995),Animation|Children
30,Nothing (2000),(no genres listed)
40,Unrated (2001),Drama
"""


def write_ml(dir_: Path, ratings: str, movies: str = MOVIES) -> Path:
    return common.write_ml(dir_, ratings, movies)


torch.set_num_threads(1)

REQUIRED_KEYS = {
    "test_auc",
    "test_gauc",
    "test_gauc_unweighted",
    "train_seconds",
    "samples_per_second",
    "world_size",
}
# Small and fast: ~8k synthetic training samples, one attention unit per attribute.
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--synthetic-users", "250", "--embedding-dim", "8", "--no-progress"]


def run_main(argv, capsys):
    code = T.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_flags_match_the_issue():
    p = T.build_parser()
    args = p.parse_args([])
    assert (args.dataset, args.model, args.activation, args.attention, args.attention_impl) == (
        "synthetic",
        "din",
        "dice",
        "separate",
        "fused",
    )
    choices = {a.dest: a.choices for a in p._actions}
    assert choices["dataset"] == ("synthetic", "movielens")
    assert choices["model"] == ("din", "base")
    assert choices["activation"] == ("dice", "prelu")
    assert choices["attention"] == ("separate", "concat")
    assert choices["attention_impl"] == ("fused", "reference")
    for flag in ["--data-dir", "--epochs", "--batch-size", "--max-len", "--lr", "--mba-lambda", "--seed"]:
        assert flag in p._option_string_actions
    assert {"--device", "--metrics-out", "--val-frac", "--test-frac", "--patience", "--save"} <= set(
        p._option_string_actions
    )
    assert (args.val_frac, args.test_frac) == (0.1, 0.1)


def test_help_shows_every_default_once(capsys):
    with pytest.raises(SystemExit):
        T.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert text.count("(default:") == text.count("(default: ") and "--epochs N most epochs" in text
    epochs = text[text.index("--epochs N") : text.index("--patience N ")]
    assert "(default: 3)" in epochs
    data_dir = text[text.index("--data-dir DIR ") : text.index("--model {din,base} ")]
    assert "$DIN_FUSED_DATA" in data_dir and "beside the checkout" not in data_dir
    fmt = T.HelpFormatter("prog")
    for action in T.build_parser()._actions:
        if action.default not in (None, False, "==SUPPRESS=="):
            assert "(default: %(default)s)" in fmt._get_help_string(action), action.dest


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--dataset", "criteo"], "invalid choice: 'criteo'"),
        (["--activation", "relu"], "invalid choice: 'relu'"),
        (["--attention-impl", "cuda"], "invalid choice: 'cuda'"),
        (["--epochs", "0"], "expected a positive integer"),
        (["--lr", "-1"], "expected a number > 0.0"),
        (["--mba-lambda", "nan"], "expected a number >= 0.0"),
        (["--frobnicate"], "unrecognized arguments"),
        (["--val-frac", "1.5"], "expected a fraction in [0, 1)"),
        (["--seed", "-1"], "expected an integer in [0, 2**32)"),
        (["--seed", str(2**32)], "expected an integer in [0, 2**32)"),  # overflowed the shuffle's seed
    ],
)
def test_bad_flags(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        T.main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_short_training_run_loss_falls(tmp_path, capsys):
    out_file = tmp_path / "m.json"
    code, out, err = run_main([*SMALL, "--epochs", "3", "--metrics-out", str(out_file)], capsys)
    assert code == 0, err
    m = json.loads(out_file.read_text())
    assert REQUIRED_KEYS <= m.keys()
    losses = m["train_loss_per_epoch"]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2], losses
    assert losses[-1] < 0.66
    # ~200 training users are few for 2000 item embeddings, but well above chance (0.5 +- ~0.015 here).
    assert m["test_auc"] > 0.55 and m["test_gauc"] > 0.55, (m["test_auc"], m["test_gauc"])
    assert m["world_size"] == 1 and m["samples_per_second"] > 0 and m["train_seconds"] > 0
    assert m["name"] == "DIN+Dice" and m["attention_impl"] == "fused"
    assert m["n_test"] + m["n_val"] + m["n_train"] > 8000
    # The results table is printed at the end.
    assert "test AUC" in out and f"{m['test_auc']:.4f}" in out and "samples / second" in out
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_din_beats_base_on_synthetic(tmp_path, capsys):
    """The synthetic data's hidden interests are what attention is for."""
    res = {}
    for model in ("din", "base"):
        f = tmp_path / f"{model}.json"
        argv = [*SMALL, "--synthetic-users", "400", "--epochs", "2", "--activation", "prelu"]
        assert T.main([*argv, "--model", model, "--metrics-out", str(f)]) == 0
        res[model] = json.loads(f.read_text())
    capsys.readouterr()
    assert res["din"]["test_auc"] > res["base"]["test_auc"] + 0.02, (
        res["din"]["test_auc"],
        res["base"]["test_auc"],
    )
    assert res["base"]["attention_impl"] is None and res["base"]["name"] == "BaseModel+PReLU"


def test_mba_lambda_changes_training(tmp_path, capsys):
    res = []
    for lam in ("0", "0.05"):
        f = tmp_path / f"{lam}.json"
        argv = [*SMALL, "--synthetic-users", "60", "--epochs", "1", "--activation", "prelu"]
        assert T.main([*argv, "--mba-lambda", lam, "--metrics-out", str(f)]) == 0
        res.append(json.loads(f.read_text()))
    capsys.readouterr()
    assert res[0]["test_auc"] != res[1]["test_auc"]
    assert res[1]["config"]["mba_lambda"] == 0.05


def test_reference_and_fused_train_identically(tmp_path, capsys):
    res = {}
    for impl in ("fused", "reference"):
        f = tmp_path / f"{impl}.json"
        argv = [*SMALL, "--synthetic-users", "60", "--epochs", "1", "--activation", "prelu"]
        assert T.main([*argv, "--attention-impl", impl, "--metrics-out", str(f)]) == 0
        res[impl] = json.loads(f.read_text())
    capsys.readouterr()
    assert res["fused"]["test_auc"] == pytest.approx(res["reference"]["test_auc"], abs=2e-3)


def ml_rows(users=12, per_user=25):
    """A MovieLens-format ratings.csv: each user likes movies 10/20 (positive) and dislikes 30/40."""
    lines = ["userId,movieId,rating,timestamp"]
    movies = [10, 20, 30, 40]
    for u in range(1, users + 1):
        for i in range(per_user):
            m = movies[(u + i) % 4]
            lines.append(f"{u},{m},{4.5 if m in (10, 20) else 2.0},{1000 + i}")
    return "\n".join(lines) + "\n"


def test_movielens_cli_on_generated_csv(tmp_path, capsys):
    d = write_ml(tmp_path / "ml", ratings=ml_rows())
    f = tmp_path / "ml.json"
    argv = [
        "--dataset",
        "movielens",
        "--data-dir",
        str(d),
        "--epochs",
        "2",
        "--max-len",
        "5",
        "--no-progress",
    ]
    code, out, err = run_main([*argv, "--batch-size", "32", "--metrics-out", str(f)], capsys)
    assert code == 0, err
    m = json.loads(f.read_text())
    assert m["dataset"] == "movielens" and m["n_train"] + m["n_val"] + m["n_test"] == 12 * 25
    assert m["n_test_users"] == 1 and m["n_val_users"] == 1
    assert "movielens" in out


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: None, "data directory not found"),
        (lambda d: (d.mkdir(), (d / "movies.csv").write_text(MOVIES)), "missing data file: .*ratings.csv"),
        (
            lambda d: write_ml(d, ratings="userId,movieId,rating,timestamp\n1,10,4.0,5\n1,20\n"),
            "line 3: expected 4",
        ),
    ],
)
def test_bad_data_gives_a_clear_error_and_writes_nothing(tmp_path, capsys, setup, match):
    d = tmp_path / "data"
    setup(d)
    f = tmp_path / "out.json"
    f.write_text('{"old": true}\n')  # a previous result must survive a failed run untouched
    code, out, err = run_main(
        ["--dataset", "movielens", "--data-dir", str(d), "--metrics-out", str(f)], capsys
    )
    assert code == 2
    assert err.startswith("python -m din_fused.train: error:")
    assert re.search(match, err), err
    assert f.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out.json"] + (["data"] if d.exists() else [])
    )


@pytest.mark.parametrize("argv, match", [
    (["--val-frac", "0.95"], "val_frac + test_frac < 1"),
    (["--synthetic-users", "1"], "num_users >= 2"),
    (["--batch-size", "1"], "Dice's BatchNorm needs at least 2 samples a batch"),
])
def test_impossible_settings_exit_2_with_one_line(argv, match, capsys):
    code, _, err = run_main([*SMALL, *argv], capsys)
    assert code == 2 and err.startswith("python -m din_fused.train: error:") and match in err, err
    assert "Traceback" not in err


def test_a_last_batch_of_one_sample_is_dropped_so_dice_trains():
    """BatchNorm cannot train on one sample: a training epoch whose last batch would hold one per
    rank drops it (num_train_steps agrees), and a batch size of 1 keeps every batch."""
    ds = data_mod.make_synthetic(num_users=5, seed=0, max_len=4)
    n = len(ds)
    for bs, world in ((n - 1, 1), (3, 1), (1, 1), ((n - 2) // 2, 2)):
        sizes = [b.target.shape[0] for b in data_mod.iterate_batches(ds, bs, shuffle=True, world_size=world)]
        assert len(sizes) == data_mod.num_train_steps(n, bs, world) > 0
        assert min(sizes) >= min(2, bs)
    assert data_mod.num_train_steps(n, n - 1, 1) == 1  # the one-sample remainder is dropped
    assert data_mod.num_train_steps(n, n - 2, 1) == 2  # a two-sample one is kept


def test_torchrec_engine_flag_errors_exit_2_under_python_m():
    """Run as python -m din_fused.train, the file is also __main__: errors raised in the modules it
    imports (torchrec_din's ConfigError) must still exit 2 with one line, not a traceback."""
    pytest.importorskip("torchrec")  # (without it, the import error is the one line)
    argv = [sys.executable, "-m", "din_fused.train", "--engine", "torchrec", "--model", "base"]
    res = subprocess.run(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1] == \
        "python -m din_fused.train: error: --engine torchrec trains --model din only"


def test_unwritable_metrics_out_fails_before_training(tmp_path, capsys):
    code, _, err = run_main([*SMALL, "--metrics-out", str(tmp_path / "no" / "such" / "m.json")], capsys)
    assert code == 2 and "does not exist" in err


def test_output_paths_are_checked_before_training(tmp_path, capsys):
    """Refused with one line, before any training: the same file for metrics and checkpoint (the
    checkpoint overwrote the JSON), a name the file system refuses (was a traceback), and a
    directory where writing fails although os.access allows it (root and /proc: the write
    failed after training)."""
    same = str(tmp_path / "out")
    for argv, match in (
        (["--metrics-out", same, "--save", same], "name the same file"),
        (["--metrics-out", str(tmp_path / ("m" * 300))], "cannot be written"),
        (["--save", "/proc/din_fused_check.pt"], "--save: /proc/din_fused_check.pt cannot be written"),
    ):
        code, _, err = run_main([*SMALL, *argv], capsys)
        assert code == 2 and match in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    f = tmp_path / "m.json"
    T.write_json_atomic(f, {"a": 1})
    assert json.loads(f.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        T.write_json_atomic(f, {"a": object()})  # not serialisable: fails half-way through json.dump
    assert json.loads(f.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def _strict_json(text):
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_write_json_atomic_writes_non_finite_floats_as_null(tmp_path):
    f = tmp_path / "m.json"
    T.write_json_atomic(f, {"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf"), "e": 2}})
    assert _strict_json(f.read_text()) == {"a": None, "b": [1.5, None], "c": {"d": None, "e": 2}}


def test_no_validation_set_writes_null_validation_metrics(tmp_path, capsys):
    f = tmp_path / "m.json"
    code, out, err = run_main([*SMALL, "--synthetic-users", "60", "--epochs", "2", "--val-frac", "0",
                               "--metrics-out", str(f)], capsys)
    assert code == 0, err
    m = _strict_json(f.read_text())
    assert m["n_val"] == 0 and m["val_auc"] is None and m["val_gauc"] is None and m["val_auc_per_epoch"] == []
    assert m["best_epoch"] == m["epochs_run"] == 2  # no early stopping without validation: the last epoch
    assert 0.0 < m["test_auc"] < 1.0
    assert "validation AUC" not in out and "test AUC" in out


@pytest.mark.parametrize("argv, match", [
    (["--engine", "torchrec"], "default engine only"),
    (["--grid", "engine=native,torchrec"], "default engine only"),
    (["--val-frac", "0"], "needs a validation set"),
    (["--grid", "val-frac=0.1,0"], "needs a validation set"),
    (["--grid", "embedding-dim=4,x"], "embedding-dim"),
    (["--seeds", "0", "-1"], "--seeds: expected an integer in [0, 2**32)"),
    (["--seed", "3"], "--seed: set by the sweep itself"),
    (["--sav", "x.pt"], "unrecognized arguments: --sav"),  # no abbreviation reaches an owned flag
    (["--batch-size", "1"], "--batch-size 1 with --activation dice"),  # the DIN+Dice row
])
def test_sweep_refuses_bad_settings_before_training(tmp_path, capsys, argv, match):
    from din_fused import sweep as S

    with pytest.raises(SystemExit) as e:
        S.main([*argv, "--out", str(tmp_path / "sw"), *SMALL])
    assert e.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        S.main(["--out", str(tmp_path / "file"), *SMALL])
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.skipif(movielens_dir() is None, reason="ml-latest-small not found (set DIN_FUSED_DATA)")
def test_real_movielens_base_one_epoch(tmp_path, capsys):
    f = tmp_path / "ml.json"
    argv = ["--dataset", "movielens", "--data-dir", str(movielens_dir()), "--model", "base", "--epochs", "1"]
    # Mean pooling learns the movie prior within one epoch (about 0.69 AUC); sum pooling needs more.
    argv += ["--pooling", "mean", "--activation", "prelu", "--no-progress"]
    code, _, err = run_main([*argv, "--metrics-out", str(f)], capsys)
    assert code == 0, err
    m = json.loads(f.read_text())
    assert m["n_train"] + m["n_val"] + m["n_test"] == 100836 and m["n_test_users"] == 61
    assert m["test_auc"] > 0.65, m["test_auc"]


def test_ddp_two_processes_matches_one_process_with_double_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo): rank 0 reports metrics for the whole test set, and
    because each global batch is split across ranks and DDP averages gradients, it trains the
    same model as one process with twice the per-process batch."""
    # --mba-lambda: every rank penalises the rows of the whole global batch (a row used on one
    # rank of two got half its penalty, 4e-3 of test AUC here).
    common = [*SMALL, "--synthetic-users", "200", "--epochs", "1", "--activation", "prelu"]
    common += ["--mba-lambda", "3"]
    ddp_json, one_json = tmp_path / "ddp.json", tmp_path / "one.json"
    p = _torchrun([*common, "--batch-size", "64", "--metrics-out", str(ddp_json)], tmp_path)
    assert p.stdout.count("test AUC") == 1  # only rank 0 prints the table
    cmd = [
        sys.executable,
        "-m",
        "din_fused.train",
        *common,
        "--batch-size",
        "128",
        "--metrics-out",
        str(one_json),
    ]
    p = subprocess.run(cmd, env=_worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    ddp, one = json.loads(ddp_json.read_text()), json.loads(one_json.read_text())
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    assert ddp["n_test"] == one["n_test"]  # gathered from both ranks
    assert ddp["n_train"] == one["n_train"]
    assert ddp["test_auc"] == pytest.approx(one["test_auc"], abs=3e-5)
    assert ddp["test_gauc"] == pytest.approx(one["test_gauc"], abs=3e-5)
    assert ddp["train_loss_per_epoch"][0] == pytest.approx(one["train_loss_per_epoch"][0], abs=3e-5)


def test_ddp_reported_metrics_are_the_saved_models(tmp_path):
    """With Dice, each rank's last training forward leaves its own running statistics. Every rank
    now scores its shard with rank 0's, so the metrics torchrun reports are those of the model it
    saves (rank 1's shard was scored by another model: 1.5e-4 of test AUC here)."""
    ckpt = tmp_path / "ddp.pt"
    argv = [*SMALL, "--synthetic-users", "200", "--epochs", "2", "--activation", "dice", "--batch-size", "32"]
    _torchrun([*argv, "--save", str(ckpt)], tmp_path)
    ck = load_checkpoint(ckpt)
    args = T.build_parser().parse_args(argv)
    _, val, test = data_mod.split_by_user(T.load_dataset(args), args.val_frac, args.test_frac, args.seed)
    for split, key in ((test, "test_auc"), (val, "val_auc")):
        probs, labels, _ = T.predict(ck.model, split, 1024, torch.device("cpu"), 0, 1)
        assert M.auc(labels, probs) == pytest.approx(ck.metrics[key], abs=1e-9), key


def _worker_env() -> dict:
    # The workers must import the same din_fused as this process (the installed
    # package in CI, the in-place build in development), never a source tree without _C.
    pkg_root = str(Path(din_fused.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": pkg_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(train_argv: list, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    """python -m din_fused.train under torchrun with 2 CPU processes (gloo); asserts success if ok."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "din_fused.train", *train_argv]
    p = subprocess.run(cmd, env=_worker_env(), cwd=cwd, capture_output=True, text=True, timeout=180)
    assert (p.returncode == 0) == ok, p.stdout + p.stderr
    return p


def test_ddp_divergence_stops_every_rank_with_one_line(tmp_path):
    """With the progress bar (rank 0 only), rank 0 alone raised mid-epoch and rank 1 died in a
    collective with a gloo traceback. Every rank now stops at the epoch's end, on the all-reduced
    loss, with the one-line message."""
    p = _torchrun([*SMALL[:-1], "--synthetic-users", "200", "--epochs", "2", "--lr", "1e30",
                   "--batch-size", "32"], tmp_path, ok=False)
    assert p.stderr.count("error: the training loss became") == 2, p.stderr
    # (torchrun prints its own launcher traceback for failed workers; no worker's frames appear)
    assert "din_fused/train.py" not in p.stderr and "Connection reset" not in p.stderr


def test_dice_batch_with_one_behaviour_and_out_of_memory_are_one_line_errors(capsys):
    argv = [*SMALL, "--synthetic-users", "100", "--max-len", "1", "--batch-size", "2"]
    code, _, err = run_main(argv, capsys)
    assert code == 1 and "holds one behaviour in all, and Dice's batch statistics need 2" in err, err
    code, _, err = run_main([*SMALL, "--synthetic-users", "100", "--embedding-dim", "100000000"], capsys)
    assert code == 1 and "error: out of memory" in err, err


def test_early_stopping_keeps_the_best_epoch():
    model = torch.nn.Linear(2, 1)
    stopper = T.EarlyStopping(patience=2)
    aucs = [0.60, 0.70, 0.65, 0.72, 0.71, 0.70, 0.99]
    stops = []
    for epoch, a in enumerate(aucs, start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)  # the weights remember their epoch
        stops.append(stopper.step(a, model))
        if stops[-1]:
            break
    assert stops == [False, False, False, False, False, True]  # two epochs after the best (4th)
    assert stopper.restore_best(model) == 4 and model.weight.flatten().tolist() == [4.0, 4.0]
    # NaN (one-class validation) never beats a real AUC, but a first NaN epoch is still kept.
    s2 = T.EarlyStopping(patience=1)
    assert not s2.step(float("nan"), model) and s2.best_epoch == 1
    assert not s2.step(0.6, model) and s2.best_epoch == 2
    assert s2.step(float("nan"), model) and s2.best_epoch == 2
    with pytest.raises(ValueError, match="patience"):
        T.EarlyStopping(0)


def test_training_evaluates_the_best_validation_epoch(tmp_path, capsys):
    """A learning rate high enough to overfit: validation AUC peaks early, training stops after
    --patience worse epochs, and the reported/saved weights are the best epoch's."""
    f, ckpt = tmp_path / "m.json", tmp_path / "m.pt"
    argv = [*SMALL, "--synthetic-users", "150", "--epochs", "6", "--patience", "1", "--lr", "0.02"]
    argv += ["--activation", "prelu", "--metrics-out", str(f), "--save", str(ckpt)]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    m = json.loads(f.read_text())
    aucs = m["val_auc_per_epoch"]
    assert len(aucs) == m["epochs_run"] and m["epochs_run"] < 6, aucs  # it did stop early
    assert m["best_epoch"] == 1 + max(range(len(aucs)), key=aucs.__getitem__)
    assert m["epochs_run"] == m["best_epoch"] + 1  # patience 1
    # The saved (and tested) weights reproduce the best epoch's validation AUC exactly.
    from din_fused import data as D
    from din_fused import metrics as M
    from din_fused.model import load

    ds = T.load_dataset(T.build_parser().parse_args(argv))
    _, val, _ = D.split_by_user(ds, 0.1, 0.1, seed=0)
    p, y, _ = T.predict(load(ckpt), val, 1024, torch.device("cpu"), 0, 1)
    assert M.auc(y, p) == aucs[m["best_epoch"] - 1] == m["val_auc"]


def test_sweep_chooses_on_validation_and_pairs_seeds(tmp_path, capsys):
    from din_fused import sweep as S

    out = tmp_path / "sw"
    argv = ["--seeds", "0", "1", "--grid", "embedding-dim=4,8", "--out", str(out)]
    argv += ["--synthetic-users", "40", "--epochs", "1", "--max-len", "8"]
    assert S.main(argv) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert sorted(rows) == sorted(r[0] for r in S.ROWS)
    for name, r in rows.items():
        trials = summary["grid_runs"][name]
        best = max(trials, key=lambda t: t["val_auc"])
        assert r["chosen"] == best["point"]
        # Only the chosen point's test metrics are kept.
        assert all(("test_auc" in t) == (t is best) for t in trials)
        assert r["seeds"] == [0, 1] and len(r["test_auc"]) == 2
        assert r["auc_mean"] == pytest.approx(sum(r["test_auc"]) / 2)
    base = rows["BaseModel+PReLU"]["test_auc"]
    for name in ("DIN+PReLU", "DIN+Dice"):
        paired = rows[name]["paired_auc"]
        diffs = [a - b for a, b in zip(rows[name]["test_auc"], base)]
        assert paired["wins"] == sum(d > 0 for d in diffs)
        assert paired["mean_diff"] == pytest.approx(sum(diffs) / 2)
    assert "DIN+Dice" in text and "±" in text
    # Resuming reads the runs back, however --out is spelled; other training flags against the
    # same --out are refused.
    assert S.main(argv) == 0
    assert "read back" in capsys.readouterr().err
    assert S.main([*argv[:6], str(out.resolve()) + "/", *argv[7:]]) == 0
    assert capsys.readouterr().err.count("read back") == len(S.ROWS) * 3
    assert S.main([*argv[:-6], "--synthetic-users", "41", "--epochs", "1", "--max-len", "8"]) == 2
    assert "other training flags" in capsys.readouterr().err


def test_sweep_statistics():
    from din_fused import sweep as S

    assert S._sign_test_p(5, 5) == pytest.approx(2 / 32)
    assert S._sign_test_p(4, 5) == pytest.approx(12 / 32)
    assert S._sign_test_p(0, 0) != S._sign_test_p(0, 0)  # NaN without untied seeds
    assert S.parse_grid(["mba-lambda=0,3", "--max-len=50"]) == {"mba-lambda": ["0", "3"], "max-len": ["50"]}
    for bad in ("mba-lambda", "seed=1,2", "x="):
        with pytest.raises(ValueError):
            S.parse_grid([bad])


@pytest.mark.parametrize("model", ["din", "base"])
def test_jagged_and_padded_layouts_train_the_same(tmp_path, capsys, model):
    """Same seed, same model: unpadded (default) and padded batches give the same metrics up to
    float rounding."""
    res = {}
    for layout in ("jagged", "padded"):
        f = tmp_path / f"{layout}.json"
        argv = [*SMALL, "--synthetic-users", "80", "--epochs", "2", "--model", model, "--max-len", "20"]
        assert T.main([*argv, "--layout", layout, "--metrics-out", str(f)]) == 0
        res[layout] = json.loads(f.read_text())
    capsys.readouterr()
    assert T.build_parser().parse_args([]).layout == "jagged"
    j, p = res["jagged"], res["padded"]
    assert j["train_loss_per_epoch"] == pytest.approx(p["train_loss_per_epoch"], abs=1e-5)
    for key in ("val_auc", "test_auc", "test_gauc", "test_logloss"):
        assert j[key] == pytest.approx(p[key], abs=1e-4), key
