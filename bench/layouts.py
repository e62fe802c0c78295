"""Jagged and shared-history layouts against padding and tiling (issue 9), side by side.

1. Skewed lengths: B=1024, lengths lognormal with mean ~50, capped at 2,000. The fused
   jagged path, the fused padded path (padded to the batch maximum) and DeepCTR-Torch
   (padded).
2. Shared history: one user with T behaviours scored against C candidates. The fused
   shared path (row_seq, the history stored once), the fused path on keys tiled C times,
   and DeepCTR-Torch on the tiled keys (left out where its [C, T, 4D] input would pass
   --deepctr-max-elems; the table says so).
3. Linearity: the jagged path on skewed batches of B = 512..4096 rows, and on the B=1024 batch
   with every length scaled by 0.5..4; time per valid position should not depend on the sum of
   lengths (within 10%). Each call reads keys that are not in the cache, as a new batch's are;
   the same input every call is shown beside.

fp32, D=36, H=(80, 40), sigmoid, forward in eval mode under no_grad; every provider has the
same weights. Time: median of interleaved rounds in one process. Peak memory: a fresh
process per provider: the bytes of its inputs plus the peak RSS above them during a call, since
the padded or tiled input is itself what those layouts cost (glibc's mmap threshold pinned so
freed buffers leave RSS, as in report.py).

DeepCTR-Torch's temporaries go back to the OS when freed (glibc's defaults) and each call faults
them in again; ``--keep-freed-memory`` times it without those faults (see serving_latency.py).

    python bench/layouts.py [--rounds 5] [--keep-freed-memory] [--out bench/results/local/layouts.md]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # bench/ (cases) and the checkout (din_fused)
import cases  # noqa: E402
import peakmem  # noqa: E402
import report  # noqa: E402

from din_fused import FusedDINAttention  # noqa: E402

D, HIDDEN = 36, (80, 40)
SKEWED = {"B": 1024, "mean": 50.0, "cap": 2000}
SHARED = [(T, C) for T in (200, 1000) for C in (100, 1000, 10000)]


def make_modules() -> dict:
    """fused (FusedDINAttention) and deepctr (DeepCTR-Torch, when installed), same weights."""
    torch.manual_seed(0)
    mods = {}
    if cases.deepctr_available():
        layer = cases._import_deepctr()(att_hidden_units=HIDDEN, att_activation="sigmoid",
                                        weight_normalization=False, embedding_dim=D)
        mods["deepctr"] = layer.eval()
        mods["fused"] = FusedDINAttention.from_deepctr(layer).eval()
    else:
        mods["fused"] = FusedDINAttention(D, HIDDEN, "sigmoid").eval()
    return mods


def skewed_lengths(batch: int = 0) -> torch.Tensor:
    """[batch or SKEWED["B"]] lognormal lengths, mean ~50, capped."""
    g = torch.Generator().manual_seed(1)
    sigma = 1.0  # lognormal mean = exp(mu + sigma^2 / 2) = SKEWED["mean"]
    mu = math.log(SKEWED["mean"]) - sigma ** 2 / 2
    n = torch.empty(batch or SKEWED["B"], dtype=torch.float64).log_normal_(mu, sigma, generator=g)
    return n.round().clamp(1, SKEWED["cap"]).to(torch.int64)


def scaled_lengths(factor: float = 1.0, batch: int = 0) -> torch.Tensor:
    return (skewed_lengths(batch).double() * factor).round().clamp_min(1).to(torch.int64)


def build_case(kind: str, provider: str, T: int = 0, C: int = 0, factor: float = 1.0, batch: int = 0,
               copies: int = 1):
    """-> (callable running one forward, description of its input, bytes of its inputs).
    copies (skewed jagged only): that many values tensors, one per call in turn."""
    mods = make_modules()
    g = torch.Generator().manual_seed(2)
    if kind == "skewed":
        lengths = scaled_lengths(factor, batch)
        B, Tmax = lengths.numel(), int(lengths.max())
        q = torch.randn(B, 1, D, generator=g)
        if provider == "jagged":
            offsets = torch.zeros(B + 1, dtype=torch.int64)
            offsets[1:] = lengths.cumsum(0)
            values = [torch.randn(int(offsets[-1]), D, generator=g) for _ in range(copies)]
            turn = itertools.count()
            return ((lambda: mods["fused"](q, values[next(turn) % copies], offsets=offsets)),
                    f"values [{values[0].shape[0]}, {D}]", _nbytes(q, values[0], offsets))
        keys = torch.randn(B, Tmax, D, generator=g)
        mod = mods["fused" if provider == "padded" else "deepctr"]
        return (lambda: mod(q, keys, lengths[:, None])), f"keys [{B}, {Tmax}, {D}]", _nbytes(q, keys, lengths)
    hist = torch.randn(T, D, generator=g)
    q = torch.randn(C, 1, D, generator=g)
    if provider == "shared":
        offsets = torch.tensor([0, T])
        row_seq = torch.zeros(C, dtype=torch.int64)
        return ((lambda: mods["fused"](q, hist, offsets=offsets, row_seq=row_seq)), f"values [{T}, {D}]",
                _nbytes(q, hist, offsets, row_seq))
    keys = hist.expand(C, T, D).contiguous()  # what a padded API forces the caller to build
    lengths = torch.full((C, 1), T, dtype=torch.int64)
    mod = mods["fused" if provider == "tiled" else "deepctr"]
    return (lambda: mod(q, keys, lengths)), f"keys [{C}, {T}, {D}]", _nbytes(q, keys, lengths)


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def child(spec: dict) -> dict:
    """In a fresh process: the bytes of the inputs plus the peak RSS above them during a
    forward (after two warm-up calls). The inputs count: a padded or tiled tensor is memory
    the layout costs."""
    fn, _, input_bytes = build_case(**spec)
    with torch.no_grad():
        fn()
        fn()
        return {"peak_bytes": peakmem.peak_rss_above(fn) + input_bytes}


def peak_memory(spec: dict) -> int | None:
    res = peakmem.run_child(__file__, spec)
    return None if res is None else res["peak_bytes"]


def timed_rounds(fns: dict, rounds: int, calls: int | dict = 3) -> dict:
    """name -> [mean seconds of `calls` calls (an int, or one per name) in each interleaved
    round], after one warm-up call each."""
    times = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
        for _ in range(rounds):
            for k, f in fns.items():
                n = calls[k] if isinstance(calls, dict) else calls
                t0 = time.perf_counter()
                for _ in range(n):
                    f()
                times[k].append((time.perf_counter() - t0) / n)
    return times


def timed(fns: dict, rounds: int, calls: int = 3) -> dict:
    """name -> median over interleaved rounds of the mean seconds of `calls` calls."""
    return {k: statistics.median(v) for k, v in timed_rounds(fns, rounds, calls).items()}


DEEPCTR_MAX_ELEMS = 1.2e8  # DeepCTR-Torch left out where its [C, T, 4D] input would pass this


def specs_of(kind: str, T: int = 0, C: int = 0, deepctr_max_elems: float = DEEPCTR_MAX_ELEMS) -> dict:
    """provider -> build_case spec of one case: jagged, padded and DeepCTR-Torch on the skewed
    batch; shared, tiled and DeepCTR-Torch (within deepctr_max_elems) on one user's history."""
    names = ("jagged", "padded", "deepctr") if kind == "skewed" else ("shared", "tiled", "deepctr")
    keep_deepctr = cases.deepctr_available() and (kind == "skewed" or C * T * 4 * D <= deepctr_max_elems)
    extra = {} if kind == "skewed" else {"T": T, "C": C}
    return {p: {"kind": kind, "provider": p, **extra} for p in names if p != "deepctr" or keep_deepctr}


COLD_BYTES = 96 * 2**20  # keys cycled per linearity variant: 3x a 32 MB last-level cache
# Samples of tens of ms, 14 of them a round: a median of 5 rounds still moved by ~10%.
LINEARITY_MIN_ROUNDS = 11
SAME = "same input "  # prefix of the variants timed on one input every call


def linearity(rounds: int, lines: list) -> None:
    """Jagged forward time against the sum of lengths, two ways: more rows of the same
    length distribution (B = 512..4096), and every length of the B=1024 batch scaled by
    0.5..4 (which also moves the per-row share of the work: the fold of the query into
    the first layer and the last, partial tile of each row).

    Each call reads keys that are not in the cache, as a new batch's are: a variant cycles
    through copies of its values, COLD_BYTES in all.  Re-reading one input every call, as
    the other sections do, leaves the keys of batches up to ~1,000 rows in the last-level
    cache and not those of larger ones; that column is shown beside."""
    variants = {f"B={b}": (1.0, b) for b in (512, 1024, 2048, 4096)}
    variants.update({f"lengths x{f:g}": (f, 0) for f in (0.5, 2.0, 4.0)})
    sums = {k: int(scaled_lengths(f, b).sum()) for k, (f, b) in variants.items()}
    rounds = max(rounds, LINEARITY_MIN_ROUNDS)
    built, n = {}, {}  # timed call and its positions, keys not cached (k) and the same input (SAME + k)
    for k, (f, b) in variants.items():
        copies = -(-COLD_BYTES // (sums[k] * D * 4))
        built[k] = build_case("skewed", "jagged", factor=f, batch=b, copies=copies)[0]
        built[SAME + k] = build_case("skewed", "jagged", factor=f, batch=b)[0]
        n[k] = n[SAME + k] = sums[k]
    # The same number of positions per sample for every variant, and each variant judged
    # against B=1024 timed in the same round: this machine's speed drifts by ~10% within
    # seconds, which a ratio of medians taken at different moments would count as non-linearity.
    tr = timed_rounds(built, rounds, {k: max(3, round(3 * max(sums.values()) / n[k])) for k in built})

    def rel(k: str, base: str) -> float:
        return statistics.median(a / n[k] / (b / n[base]) for a, b in zip(tr[k], tr[base]))

    t = {k: statistics.median(v) for k, v in tr.items()}
    cold = {k: rel(k, "B=1024") for k in variants}
    warm = {k: rel(SAME + k, SAME + "B=1024") for k in variants}
    lines += ["#### Linearity: jagged forward against the sum of lengths", "",
              "| batch | sum of lengths | forward ms | ns per position | vs B=1024 (median of rounds) "
              "| the same input every call: vs B=1024 |", "|---|---:|---:|---:|---:|---:|"]
    for k in variants:
        lines.append(f"| {k} | {sums[k]} | {t[k] * 1e3:.2f} | {t[k] / sums[k] * 1e9:.1f} | {cold[k]:.2f} "
                     f"| {warm[k]:.2f} |")

    def worst(r: dict, batches_only: bool) -> float:
        return 100 * max(abs(v - 1) for k, v in r.items() if k.startswith("B=") or not batches_only)

    lines += ["", "Largest deviation of time per position from B=1024 (per round, median of "
              f"{rounds} rounds), keys not in the cache: {worst(cold, True):.1f}% over batch sizes, "
              f"{worst(cold, False):.1f}% including scaled lengths (target: within 10%). The same input "
              "every call: "
              f"{worst(warm, True):.1f}% and {worst(warm, False):.1f}%.", ""]
    print("\n".join(lines[-len(variants) - 7:]), flush=True)


def section(title: str, base: str, specs: dict, rounds: int, lines: list, memory: bool = True) -> dict:
    """Times and peak memory (unless not memory: n/a) of each provider of ``specs`` as a table;
    returns the times."""
    built = {k: build_case(**s) for k, s in specs.items()}
    t = timed({k: b[0] for k, b in built.items()}, rounds)
    mem = {k: peak_memory(s) if memory else None for k, s in specs.items()}
    lines += [f"#### {title}", "",
              "| provider | input | forward ms | vs fused | peak memory MB (inputs included) | vs fused |",
              "|---|---|---:|---:|---:|---:|"]
    for k, (_, desc, _) in built.items():
        m = mem[k]
        mt = "n/a" if m is None else f"{m / 2**20:.1f}"
        mr = "n/a" if m is None or not mem[base] else f"{m / mem[base]:.1f}x"
        lines.append(f"| {k} | {desc} | {t[k] * 1e3:.2f} | {t[k] / t[base]:.1f}x | {mt} | {mr} |")
    lines.append("")
    print("\n".join(lines[-len(built) - 5:]), flush=True)
    return t


def bench_specs(full: bool) -> list:
    """(group, provider, build_case spec) of the pytest-benchmark suite's layout groups: the
    skewed batch, and the shared history at T=200 with C=100 and 1000 (full: every SHARED
    case, DeepCTR-Torch where its [C, T, 4D] input stays under 1.2e8 elements)."""
    out = [("skewed B=1024", p, s) for p, s in specs_of("skewed").items()]
    for T, C in SHARED if full else [(200, 100), (200, 1000)]:
        out += [(f"shared T={T} C={C}", p, s) for p, s in specs_of("shared", T, C).items()]
    return out


def run(rounds: int, only: str | None = None, deepctr_max_elems: float = DEEPCTR_MAX_ELEMS,
        shared=tuple(SHARED), mode: str = "", memory: bool = True) -> list:
    """The markdown lines of the sections (all, or only one), timed and measured now; mode:
    the allocator mode, for the header; memory=False: no peak-memory child processes."""
    deepctr = cases.deepctr_available()
    lin = f" (linearity: {max(rounds, LINEARITY_MIN_ROUNDS)})" if only in (None, "linear") else ""
    lines = [f"### Layouts: fp32, D={D}, H={HIDDEN}, sigmoid, forward (eval, no_grad), "
             f"{torch.get_num_threads()} threads, median of {rounds} interleaved rounds{lin}"
             + (f", {mode}" if mode else ""), ""]
    if only in (None, "skewed"):
        lens = skewed_lengths()
        section(f"Skewed lengths: B={SKEWED['B']}, lognormal mean {float(lens.double().mean()):.1f}, "
                f"max {int(lens.max())} (cap {SKEWED['cap']}), sum {int(lens.sum())}", "jagged",
                specs_of("skewed"), rounds, lines, memory)
    if only in (None, "linear"):
        linearity(rounds, lines)
    if only in (None, "shared"):
        peak = None
        for T, C in shared:
            specs = specs_of("shared", T, C, deepctr_max_elems)
            t = section(f"Shared history: T={T}, C={C}" + ("" if "deepctr" in specs or not deepctr else
                        " (DeepCTR-Torch left out: its [C, T, 4D] input passes --deepctr-max-elems)"),
                        "shared", specs, rounds, lines, memory)
            if "deepctr" in t:  # issue 9's target: T=200, C=1000 forward >= 15x DeepCTR-Torch
                peak = peak or report.fma_peak_gflops(torch.get_num_threads())
                lines += [cases.ratio_bound(cases.Case(B=C, T=T, D=D, hidden=HIDDEN), C * T, 15.0,
                                            t["deepctr"], t["shared"], peak), ""]
                print(lines[-2], flush=True)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--deepctr-max-elems", type=float, default=DEEPCTR_MAX_ELEMS,
                    help="skip DeepCTR-Torch where C*T*4D exceeds this (its input alone is 4 bytes each)")
    ap.add_argument("--only", choices=("skewed", "shared", "linear"))
    ap.add_argument("--out", default=str(HERE / "results" / "local" / "layouts.md"))
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc keeps freed memory (no per-call page faults for DeepCTR-Torch's temporaries)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    mode = cases.allocator_mode(a.keep_freed_memory)
    lines = run(a.rounds, a.only, a.deepctr_max_elems, mode=mode)
    cases.write_markdown("\n".join(lines) + "\n", a.out, "layouts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
