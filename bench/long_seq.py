"""Very long sequences: B in {1, 4}, T in {10k, 100k}, on 1 and 2 threads.

With fewer rows than threads the CPU kernel cuts each row into parts and merges
the online-softmax partials, so one user with a 100k history uses every thread.
Thread counts are timed interleaved, round by round, in one process
(torch.set_num_threads is passed to the kernel on every call).  Target (issue 9):
B=1, T=100k, 2 threads >= 1.7x faster than 1 thread.

    python bench/long_seq.py [--rounds 5] [--norm softmax]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # bench/ (cases) and the checkout (din_fused)
from dataclasses import replace  # noqa: E402

import cases  # noqa: E402

SHAPES = [(1, 10_000), (1, 100_000), (4, 10_000), (4, 100_000)]
THREADS = (1, 2)


def case(B: int, T: int, norm: str = "softmax") -> cases.Case:
    """The headline's layer on B full rows of T keys."""
    return replace(cases.HEADLINE, B=B, T=T, lengths="full", normalization=norm, compile=False)


def table(shapes, rounds: int, norm: str = "softmax") -> list:
    """Markdown lines: each shape's forward and forward+backward on 1 and 2 threads, timed
    interleaved, round by round; the caller's thread count is restored."""
    before = torch.get_num_threads()
    lines = [f"fp32, D=36, H=(80, 40), sigmoid, {norm}, full rows; median of {rounds} interleaved rounds "
             f"(best in brackets); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", "",
             "| B | T | mode | 1 thread ms | 2 threads ms | speed-up |", "|---:|---:|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    try:
        for B, T in shapes:
            c = case(B, T, norm)
            inputs = cases.make_inputs(c)
            module = cases.ProviderSet(c).get("fused")
            for mode in ("fwd", "fwdbwd"):
                fn = cases.call_for(mode)(module, inputs)
                times = {n: [] for n in THREADS}
                for n in THREADS:
                    torch.set_num_threads(n)
                    fn()  # warm-up
                for _ in range(rounds):
                    for n in THREADS:
                        torch.set_num_threads(n)
                        t0 = time.perf_counter()
                        fn()
                        times[n].append(1e3 * (time.perf_counter() - t0))
                med = {n: statistics.median(v) for n, v in times.items()}
                best = {n: min(v) for n, v in times.items()}
                lines.append(f"| {B} | {T:,} | {mode} | {med[1]:.1f} ({best[1]:.1f}) | "
                             f"{med[2]:.1f} ({best[2]:.1f}) | {med[1] / med[2]:.2f}x |")
                print(lines[-1], flush=True)
    finally:
        torch.set_num_threads(before)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--norm", default="softmax", choices=("none", "softmax"))
    ap.add_argument("--shape", action="append", metavar="B,T", help="only these shapes (repeatable)")
    a = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in a.shape] if a.shape else SHAPES
    table(shapes, a.rounds, a.norm)


if __name__ == "__main__":
    main()
