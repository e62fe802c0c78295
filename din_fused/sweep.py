"""The paper's three rows over several seeds, settings chosen on validation only.

``python -m din_fused.sweep [--seeds 0 1 2 3 4] [--grid KEY=V1,V2 ...] [--out DIR] [train flags]``

For each row (BaseModel+PReLU, DIN+PReLU, DIN+Dice):

1. every point of the declared grid is trained on the first seed, with early
   stopping on validation AUC (``python -m din_fused.train``'s protocol);
2. the point with the best validation AUC is chosen (test metrics of the other
   points are dropped unread);
3. the chosen settings are trained on every seed (the first seed's run is
   reused) and evaluated on test once, with the best validation epoch's weights.

It then prints mean ± std of test AUC and GAUC over seeds, RelaImpr against the
BaseModel, and a paired comparison of each DIN row against the BaseModel on the
same seeds (same split, data and initial embeddings): wins out of seeds, mean
difference, paired t-test and exact two-sided sign test p-values.

Flags not listed below are passed to every training run unchanged (for example
``--dataset movielens --data-dir DIR --epochs 4 --patience 1``), except
``--model``, ``--activation``, ``--seed``, ``--metrics-out`` and ``--save``,
which the sweep sets.  Each run's metrics go to ``DIR/<row>__<point>__seed<S>.json``;
a run whose file already exists is read back instead of trained again, so an
interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import metrics as M
from . import train as T

__all__ = ["ROWS", "DEFAULT_GRID", "main", "parse_grid", "summarize"]

PROG = "python -m din_fused.sweep"

# (row name, --model, --activation): the paper's Table 3 rows.
ROWS = (("BaseModel+PReLU", "base", "prelu"), ("DIN+PReLU", "din", "prelu"), ("DIN+Dice", "din", "dice"))
# The declared grid: mini-batch aware L2 off or at the strength the paper's MovieLens runs favoured.
DEFAULT_GRID = {"mba-lambda": ["0", "3"]}
_OWNED = ("--model", "--activation", "--seed", "--metrics-out", "--save")


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["mba-lambda=0,3", "max-len=50"]`` -> ``{"mba-lambda": ["0", "3"], "max-len": ["50"]}``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().lstrip("-")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise ValueError(f"--grid: expected KEY=V1,V2,... (a train flag without --), got {item!r}")
        if f"--{key}" in _OWNED:
            raise ValueError(f"--grid: --{key} is set by the sweep itself")
        grid[key] = vals
    return grid


def _points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = sorted(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _point_name(point: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items()) or "default"


def _train_args(out: Path, row, point, seed, train_args) -> argparse.Namespace:
    """The training run of one row, grid point and seed, as train's parser reads it. Its errors are
    ValueErrors of one line; abbreviations are off, so that no flag reaches a setting the sweep owns
    (--sav would have been --save)."""
    name, model, act = row
    f = out / f"{name}__{_point_name(point)}__seed{seed}.json".replace("/", "_")
    argv = [*train_args, "--model", model, "--activation", act, "--seed", str(seed), "--no-progress"]
    for k, v in point.items():
        argv += [f"--{k}", v]
    argv += ["--metrics-out", str(f)]
    parser = T.build_parser()
    parser.allow_abbrev = False

    def error(message: str):
        raise ValueError(message)

    parser.error = error
    args = parser.parse_args(argv)
    T.check_config(args)  # what train's main checks beyond the parser (a ConfigError is a ValueError)
    if args.engine != "native":
        raise ValueError(f"--engine {args.engine}: the sweep trains with the default engine only")
    if args.val_frac == 0:
        raise ValueError("--val-frac 0: the sweep chooses each row's settings on validation AUC, so it "
                         "needs a validation set")
    return args


def _config(args: argparse.Namespace) -> dict:
    """What a run's metrics record of its flags, less those that do not change the run (the
    metrics file's path follows --out, however it is spelled)."""
    return {k: v for k, v in vars(args).items() if k not in ("no_progress", "metrics_out")}


def _run(out: Path, row, point, seed, train_args, log) -> dict:
    name = row[0]
    args = _train_args(out, row, point, seed, train_args)
    f = Path(args.metrics_out)
    if f.is_file():
        r = json.loads(f.read_text())
        if _config(argparse.Namespace(**r.get("config", {}))) != _config(args):
            raise ValueError(f"{f} was written with other training flags; use another --out")
        log(f"{name} {_point_name(point)} seed {seed}: read back from {f}")
        return r
    t0 = time.perf_counter()
    r = T.run(args)
    log(
        f"{name} {_point_name(point)} seed {seed}: validation AUC {_val_key(r):.4f} "
        f"(best epoch {r['best_epoch']}/{r['epochs_run']}), {time.perf_counter() - t0:.0f} s"
    )
    return r


def _sign_test_p(wins: int, n: int) -> float:
    """Exact two-sided binomial p of ``wins`` out of ``n`` under p = 1/2 (ties already removed)."""
    if n == 0:
        return float("nan")
    k = min(wins, n - wins)
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n)


def _paired_t_p(diff: np.ndarray) -> float:
    """Two-sided paired t-test p of mean(diff) == 0 (NaN with fewer than 2 seeds or zero spread)."""
    from scipy import stats  # a dependency of scikit-learn

    if diff.size < 2 or np.all(diff == diff[0]):
        return float("nan")
    return float(stats.ttest_1samp(diff, 0.0).pvalue)


def _relaimpr(model: float, base: float) -> float:
    """RelaImpr of the means; NaN when the baseline is not above chance (it is undefined there)."""
    return M.relaimpr(model, base) if base > 0.5 else float("nan")


def summarize(results: dict[str, list[dict]], chosen: dict[str, dict]) -> dict:
    """Per row: mean/std of test AUC and GAUC over seeds, RelaImpr, and the paired comparison with row 0."""
    names = list(results)
    base = names[0]
    b_auc = np.array([r["test_auc"] for r in results[base]], dtype=float)
    b_gauc = np.array([r["test_gauc"] for r in results[base]], dtype=float)
    out = {}
    for name in names:
        auc = np.array([r["test_auc"] for r in results[name]], dtype=float)
        gauc = np.array([r["test_gauc"] for r in results[name]], dtype=float)
        row = {
            "chosen": chosen[name],
            "seeds": [r["config"]["seed"] for r in results[name]],
            "test_auc": auc.tolist(),
            "test_gauc": gauc.tolist(),
            "auc_mean": float(auc.mean()),
            "auc_std": float(auc.std(ddof=1)) if auc.size > 1 else float("nan"),
            "gauc_mean": float(gauc.mean()),
            "gauc_std": float(gauc.std(ddof=1)) if gauc.size > 1 else float("nan"),
            "relaimpr_auc": _relaimpr(float(auc.mean()), float(b_auc.mean())),
            "relaimpr_gauc": _relaimpr(float(gauc.mean()), float(b_gauc.mean())),
            "best_epochs": [r["best_epoch"] for r in results[name]],
        }
        if name != base:
            for key, mine, theirs in (("auc", auc, b_auc), ("gauc", gauc, b_gauc)):
                d = mine - theirs
                wins, losses = int((d > 0).sum()), int((d < 0).sum())
                row[f"paired_{key}"] = {
                    "wins": wins,
                    "losses": losses,
                    "mean_diff": float(d.mean()),
                    "std_diff": float(d.std(ddof=1)) if d.size > 1 else float("nan"),
                    "t_test_p": _paired_t_p(d),
                    "sign_test_p": _sign_test_p(wins, wins + losses),
                }
        out[name] = row
    return out


def format_summary(summary: dict, n_seeds: int) -> str:
    """Markdown table of :func:`summarize`'s result."""
    lines = [
        f"| Model (settings chosen on validation) | test AUC, mean ± std over {n_seeds} seeds | RelaImpr "
        "| test GAUC, mean ± std | RelaImpr (GAUC) | vs BaseModel, AUC: wins, mean diff, t-test p, sign p |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in summary.items():
        chosen = _point_name(r["chosen"])
        paired = "-"
        if "paired_auc" in r:
            p = r["paired_auc"]
            paired = (
                f"{p['wins']}/{n_seeds}, {p['mean_diff']:+.4f}, p={p['t_test_p']:.3f}, "
                f"p={p['sign_test_p']:.3f}"
            )
        lines.append(
            f"| {name} ({chosen}) | {r['auc_mean']:.4f} ± {r['auc_std']:.4f} | {r['relaimpr_auc']:+.2f} % "
            f"| {r['gauc_mean']:.4f} ± {r['gauc_std']:.4f} | {r['relaimpr_gauc']:+.2f} % | {paired} |"
        )
    return "\n".join(lines)


def _strip_test(r: dict) -> dict:
    """A grid point that was not chosen keeps only what selection may look at."""
    return {k: v for k, v in r.items() if not k.startswith(("test_", "gauc_users"))}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="BaseModel, DIN+PReLU and DIN+Dice over seeds; settings chosen on validation, "
        "test reported once. Other flags go to every training run.",
        formatter_class=T.HelpFormatter,
        allow_abbrev=False,  # --seed (train's, owned here) must not be read as --seeds
    )
    p.add_argument("--seeds", type=T.seed_type, nargs="+", default=[0, 1, 2, 3, 4], metavar="S", help="seeds")
    p.add_argument(
        "--grid",
        action="append",
        default=None,
        metavar="KEY=V1,V2",
        help="a train flag (without --) and its values; repeatable (default grid: "
        + " ".join(f"{k}={','.join(v)}" for k, v in DEFAULT_GRID.items())
        + "); --grid none for no grid",
    )
    p.add_argument("--out", default="sweep-results", metavar="DIR", help="per-run metrics and summary.json")
    args, train_args = p.parse_known_args(argv)
    bad = [a for a in train_args if a.split("=")[0] in _OWNED]
    if bad:
        p.error(f"{', '.join(bad)}: set by the sweep itself")
    try:
        if args.grid == ["none"]:
            grid = {}
        else:
            grid = parse_grid(args.grid) if args.grid else dict(DEFAULT_GRID)
        # Every run the sweep will make, checked now, not after the first hours of training.
        out = Path(args.out)
        for row in ROWS:
            for point in _points(grid):
                for seed in args.seeds:
                    _train_args(out, row, point, seed, train_args)
    except ValueError as e:
        p.error(str(e))
    if out.exists() and not out.is_dir():
        p.error(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[sweep] {msg}", file=sys.stderr, flush=True)

    points = _points(grid)
    seeds = list(dict.fromkeys(args.seeds))
    log(f"grid {grid or '{}'}: {len(points)} point(s) x {len(ROWS)} rows on seed {seeds[0]}, then "
        f"{len(seeds) - 1} more seed(s) per row: {len(ROWS) * (len(points) + len(seeds) - 1)} training runs")
    results: dict[str, list[dict]] = {}
    chosen: dict[str, dict] = {}
    grid_log: dict[str, list[dict]] = {}
    try:
        for row in ROWS:
            name = row[0]
            trials = [(pt, _run(out, row, pt, seeds[0], train_args, log)) for pt in points]
            best_i = max(range(len(trials)), key=lambda i: _val_key(trials[i][1]))
            chosen[name] = trials[best_i][0]
            grid_log[name] = [
                {"point": pt, **(r if i == best_i else _strip_test(r))} for i, (pt, r) in enumerate(trials)
            ]
            log(f"{name}: chose {_point_name(chosen[name])} on validation")
            results[name] = [trials[best_i][1]] + [
                _run(out, row, chosen[name], s, train_args, log) for s in seeds[1:]
            ]
    except (T.ConfigError, ValueError) as e:  # DataError is a ValueError
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    summary = summarize(results, chosen)
    table = format_summary(summary, len(seeds))
    T.write_json_atomic(
        out / "summary.json",
        {"grid": grid, "seeds": seeds, "train_args": train_args, "rows": summary, "grid_runs": grid_log},
    )
    print(table)
    print(f"summary written to {out / 'summary.json'}")
    return 0


def _val_key(r: dict) -> float:
    """Selection key: validation AUC, NaN (null once written) ranked last."""
    v = r["val_auc"]
    return -math.inf if v is None or math.isnan(v) else v


if __name__ == "__main__":
    sys.exit(main())
