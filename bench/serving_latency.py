"""Serving-sized calls (issue 10), side by side in one process: eval mode, forward only, no_grad.

1. Small call: B=1, T=1, D=8, H=(80, 40), sigmoid; the best of 500 calls per provider
   (fused module, eager reference module, DeepCTR-Torch, and the fused module given the history
   as values/offsets/row_seq), interleaved in rounds; then the same
   call with Dice (eval mode, which reads its running statistics). Beside the sigmoid call,
   the floors the fused call cannot go below: the custom op through the dispatcher
   (``torch.ops.din_fused.din_fwd``, what an autograd-enabled or traced call pays), an empty
   custom op through the dispatcher, and the raw kernel call into ``_C``.
2. Inference latency: one user with T=50 behaviours scored against C=100 candidates, D=36,
   H=(80, 40), sigmoid. DeepCTR-Torch and the fused op on the history tiled C times (what a
   padded API makes the caller build, tiling included in the timed call), and the fused shared
   path (the history stored once, ``row_seq``). Median of interleaved rounds. Then the fused
   shared path and DeepCTR-Torch on the same call with ReLU, PReLU and Dice, and with
   DeepCTR-Torch's own DIN default for the attention unit (Dice, H=(64, 16)).

DeepCTR-Torch's and the eager reference's multi-MB temporaries go back to the OS when freed
(glibc's defaults), and each call faults them in again: 220k to 990k minor faults in 500
DeepCTR-Torch calls of the second case, and up to 2-3x the time. ``--keep-freed-memory`` re-runs
the script with glibc told to keep freed memory (as jemalloc or tcmalloc, common in serving,
do), so the chains of ops are timed without those faults.

    python bench/serving_latency.py [--rounds 7] [--keep-freed-memory] [--threads N]
                                    [--out bench/results/local/serving.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # bench/ (cases) and the checkout (din_fused)
import cases  # noqa: E402
import report  # noqa: E402

from din_fused import ops  # noqa: E402

SMALL = cases.Case(B=1, T=1, D=8, lengths="full")
USER = {"T": 50, "C": 100, "D": 36}


def best_of(fn, n: int) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.library.custom_op("din_fused_bench::noop", mutates_args=())
def _noop(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


@_noop.register_fake
def _(x):
    return x.new_empty(0)


def _timed_best(fns: dict, rounds: int, calls: int) -> dict:
    best = {k: float("inf") for k in fns}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in fns.items():
                best[name] = min(best[name], best_of(fn, calls))
    return best


def _module_calls(case: cases.Case) -> tuple:
    """(providers, inputs, {provider: a call of its module in eval mode on the inputs})."""
    mods = cases.ProviderSet(case)
    inp = cases.make_inputs(case)
    q, k, L = inp["query"], inp["keys"], inp["lengths"]
    fns = {}
    for name in ("fused", "reference", "deepctr"):
        mod = mods.get(name)
        if mod is not None:
            mod.eval()
            fns[name] = (lambda m: lambda: m(q, k, L))(mod)
    return mods, inp, fns


SHARED_SMALL = "fused, history as values/offsets/row_seq"
# The providers of each group, by name, for the pytest-benchmark suite (bench/test_bench.py).
SMALL_PROVIDERS = ("fused", "reference", "deepctr", SHARED_SMALL)
USER_PROVIDERS = ("fused shared (history once)", "fused padded (tiled keys)", "eager reference (tiled keys)",
                  "DeepCTR-Torch (tiled keys)")


def _small() -> tuple:
    """_module_calls(SMALL), with the fused module's same call given its one-key history as
    values [1, D], offsets and row_seq: the shared layout's route (one candidate here; the
    latency case has a hundred)."""
    mods, inp, fns = _module_calls(SMALL)
    q, k = inp["query"], inp["keys"]
    fused = mods.get("fused")
    hist, offsets, row_seq = k[0], torch.tensor([0, 1]), torch.zeros(1, dtype=torch.int64)
    fns[SHARED_SMALL] = lambda: fused(q, hist, offsets=offsets, row_seq=row_seq)
    return mods, inp, fns


def small_calls() -> dict:
    """provider -> the small call (sigmoid) of its module in eval mode (SMALL_PROVIDERS)."""
    return _small()[2]


def small_dice_call(rounds: int, calls: int) -> dict:
    """provider -> best seconds of the small call with Dice (eval: its running statistics)."""
    return _timed_best(_module_calls(replace(SMALL, activation="dice"))[2], rounds, calls)


def small_call(rounds: int, calls: int) -> dict:
    """provider -> best seconds of a B=1, T=1, D=8 forward, and of the floors under it."""
    mods, inp, fns = _small()
    q, k, L = inp["query"], inp["keys"], inp["lengths"]
    p = mods.get("fused")._params()
    args = (q[:, 0], k, L[:, 0], None, *p.op_args(), "sigmoid", "none", 1.0, False, 1e-8)
    fns["floor: din_fwd through the dispatcher"] = lambda: torch.ops.din_fused.din_fwd(*args)
    fns["floor: empty custom op through the dispatcher"] = lambda: torch.ops.din_fused_bench.noop(q)
    prep = ops._Prepared(q[:, 0], k, L[:, 0], None, *p.op_args()[:5], "sigmoid", "none", 1.0)
    out, scores = torch.empty(1, SMALL.D), torch.empty(1, 1)
    cfg = {**prep.cfg, "out": out.data_ptr(), "ldo": SMALL.D, "scores": scores.data_ptr(), "ld_scores": 1}
    fns["floor: the _C kernel call alone"] = lambda: ops._C.forward(cfg)
    return _timed_best(fns, rounds, calls)


def user_calls(activation: str = "sigmoid", hidden: tuple = (80, 40)) -> dict:
    """provider -> a call scoring C candidates against one T-long history (eval): the fused
    shared path, and the fused, eager reference and DeepCTR-Torch modules on the history
    tiled C times (tiling in the call, as a padded API makes the caller do)."""
    T, C, D = USER["T"], USER["C"], USER["D"]
    mods = cases.ProviderSet(cases.Case(B=C, T=T, D=D, lengths="full", activation=activation, hidden=hidden))
    g = torch.Generator().manual_seed(3)
    hist = torch.randn(T, D, generator=g)
    cand = torch.randn(C, 1, D, generator=g)
    offsets = torch.tensor([0, T])
    row_seq = torch.zeros(C, dtype=torch.int64)
    lengths = torch.full((C, 1), T, dtype=torch.int64)
    shared, padded, ref, deepctr = USER_PROVIDERS
    fused = mods.get("fused").eval()
    fns = {shared: lambda: fused(cand, hist, offsets=offsets, row_seq=row_seq),
           padded: lambda: fused(cand, hist.expand(C, T, D).contiguous(), lengths)}
    reference = mods.get("reference").eval()
    fns[ref] = lambda: reference(cand, hist.expand(C, T, D).contiguous(), lengths)
    theirs = mods.get("deepctr")
    if theirs is not None:
        theirs.eval()
        fns[deepctr] = lambda: theirs(cand, hist.expand(C, T, D).contiguous(), lengths)
    return fns


# The latency case's other rows: the activations besides sigmoid, and DeepCTR-Torch's DIN default.
OTHER_USER_CASES = (("relu", (80, 40)), ("prelu", (80, 40)), ("dice", (80, 40)), ("dice", (64, 16)))


def user_latency(rounds: int, calls: int, providers: tuple = USER_PROVIDERS, **case) -> dict:
    """provider -> seconds per call of user_calls(**case), one entry per interleaved round,
    for those of providers that exist."""
    every = user_calls(**case)
    fns = {k: f for k, f in every.items() if k in providers}
    times = {k: [] for k in fns}
    with torch.no_grad():
        shared = every[USER_PROVIDERS[0]]()
        for k in USER_PROVIDERS[1:]:  # the same weights (and Dice statistics) everywhere
            if k in every:
                assert torch.allclose(every[k](), shared, rtol=1e-4, atol=1e-5), f"{k} disagrees"
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[name].append((time.perf_counter() - t0) / calls)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(HERE / "results" / "local" / "serving.md"))
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc keeps freed memory (no per-call page faults for the chains of ops)")
    ap.add_argument("--threads", type=int, default=0,
                    help="intra-op threads for every provider (default: torch's; 1: one serving worker's "
                         "share)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    mode = cases.allocator_mode(a.keep_freed_memory)
    small = small_call(a.rounds, 500 // a.rounds + 1)
    dice = small_dice_call(a.rounds, 500 // a.rounds + 1)
    rounds = user_latency(a.rounds, 20)
    user = {k: statistics.median(v) for k, v in rounds.items()}
    f = small["fused"]
    n = torch.get_num_threads()
    lines = [f"### Serving-sized calls: fp32, eval, no_grad, {n} thread{'s' if n > 1 else ''}, "
             f"torch {torch.__version__}, {mode}", "",
             "#### Small call: B=1, T=1, D=8, H=(80, 40), sigmoid (best of 500 calls)", "",
             "| provider | us per call | vs fused |", "|---|---:|---:|"]
    lines += [f"| {k} | {v * 1e6:.1f} | {v / f:.2f}x |" for k, v in small.items()]
    fd = dice["fused"]
    lines += ["", "#### The same small call with Dice (eval: its running statistics)", "",
              "| provider | us per call | vs fused |", "|---|---:|---:|"]
    lines += [f"| {k} | {v * 1e6:.1f} | {v / fd:.2f}x |" for k, v in dice.items()]
    s = user["fused shared (history once)"]
    lines += ["", f"#### One user, T={USER['T']}, against C={USER['C']} candidates, D={USER['D']}, "
              f"H=(80, 40), sigmoid (median of {a.rounds} rounds of 20 calls)", "",
              "| provider | ms per call | vs fused shared |", "|---|---:|---:|"]
    lines += [f"| {k} | {v * 1e3:.3f} | {v / s:.1f}x |" for k, v in user.items()]
    dc = user.get("DeepCTR-Torch (tiled keys)")
    if dc is not None:
        T, C = USER["T"], USER["C"]
        tiled = user["fused padded (tiled keys)"]
        per_round = sorted(d / u for d, u in zip(rounds["DeepCTR-Torch (tiled keys)"],
                                                  rounds["fused shared (history once)"]))
        lines += ["", f"DeepCTR-Torch / fused: shared path {dc / s:.1f}x, padded path on tiled keys "
                  f"{dc / tiled:.1f}x (target >= 5x). Round by round, the shared path's ratio ran "
                  f"{per_round[0]:.1f}x to {per_round[-1]:.1f}x, >= 5x in {sum(r >= 5 for r in per_round)} "
                  f"of {len(per_round)} rounds.",
                  "", cases.ratio_bound(cases.Case(B=C, T=T, D=USER["D"]), C * T, 5.0, dc, s,
                                        report.fma_peak_gflops(torch.get_num_threads()))]
    shared_c, deepctr_c = USER_PROVIDERS[0], USER_PROVIDERS[3]
    if dc is not None:
        lines += ["", "#### The same call with the other activations, and with DeepCTR-Torch's own DIN "
                  f"default (Dice, H=(64, 16)); median of {a.rounds} rounds of 20 calls", "",
                  "| activation, H | fused shared, ms | DeepCTR-Torch, ms | DeepCTR-Torch / fused "
                  "| rounds >= 5x |", "|---|---:|---:|---:|---:|"]
        for act, hidden in OTHER_USER_CASES:
            r = user_latency(a.rounds, 20, (shared_c, deepctr_c), activation=act, hidden=hidden)
            ms, md = statistics.median(r[shared_c]), statistics.median(r[deepctr_c])
            hits = sum(d / u >= 5 for d, u in zip(r[deepctr_c], r[shared_c]))
            lines.append(f"| {act}, {hidden} | {ms * 1e3:.3f} | {md * 1e3:.3f} | {md / ms:.1f}x | "
                         f"{hits} of {a.rounds} |")
    text = "\n".join(lines) + "\n"
    print(text)
    cases.write_markdown(text, a.out, "serving")
    return 0


if __name__ == "__main__":
    sys.exit(main())
