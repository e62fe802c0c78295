"""Very long sequences: B in {1, 4}, T in {10k, 100k}, on 1 and 2 threads.

With fewer rows than threads the CPU kernel cuts each row into parts and merges
the online-softmax partials, so one user with a 100k history uses every thread.
Thread counts are timed interleaved, round by round, in one process
(torch.set_num_threads is passed to the kernel on every call).  Target (issue 9):
B=1, T=100k, 2 threads >= 1.7x faster than 1 thread.

In the same rounds, the machine's own ceiling for that speed-up: the same work as two
independent one-thread calls on half rows (B, T/2), started together on two Python threads
(the kernels release the GIL). Their wall time is what two cores give when both are busy (a
VM's second vCPU, a lower all-core clock); the split can at best match it.
(The guest's own CPU accounting cannot show this: on a Firecracker VM the 2-thread call held
1.93 CPUs by process time in a round where it ran 1.05x faster than one thread.)

    python bench/long_seq.py [--rounds 5] [--norm softmax]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # bench/ (cases) and the checkout (din_fused)
from dataclasses import replace  # noqa: E402

import cases  # noqa: E402

SHAPES = [(1, 10_000), (1, 100_000), (4, 10_000), (4, 100_000)]
THREADS = (1, 2)


def run_together(pool: ThreadPoolExecutor, fns) -> float:
    """Seconds from the first of ``fns`` starting to the last returning, all started at once on
    the pool's threads, one torch thread each. Each worker reads its own clock, so the calling
    thread's wait for the GIL cannot stretch or shrink the interval."""
    start = threading.Barrier(len(fns))

    def work(fn):
        torch.set_num_threads(1)  # per thread: OpenMP keeps a thread count for each thread
        start.wait()
        t0 = time.perf_counter()
        fn()
        return t0, time.perf_counter()

    spans = [f.result() for f in [pool.submit(work, fn) for fn in fns]]
    return max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)


def halves(case, mode: str) -> list:
    """Two calls, each on its own module and inputs, that together do ``case``'s work."""
    half = replace(case, T=case.T // 2)
    call = cases.call_for(mode)
    return [call(cases.ProviderSet(half).get("fused"), cases.make_inputs(half)) for _ in range(2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--norm", default="softmax", choices=("none", "softmax"))
    ap.add_argument("--shape", action="append", metavar="B,T", help="only these shapes (repeatable)")
    a = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in a.shape] if a.shape else SHAPES
    before = torch.get_num_threads()
    print(f"fp32, D=36, H=(80, 40), sigmoid, {a.norm}, full rows; median of {a.rounds} interleaved rounds "
          f"(best in brackets); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| B | T | mode | 1 thread ms | 2 threads ms | speed-up "
          "| two 1-thread halves at once ms | machine ceiling | speed-up / ceiling |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    pool = ThreadPoolExecutor(2)  # persistent workers, so that no thread start is timed
    try:
        for B, T in shapes:
            case = replace(cases.HEADLINE, B=B, T=T, lengths="full", normalization=a.norm, compile=False)
            inputs = cases.make_inputs(case)
            module = cases.ProviderSet(case).get("fused")
            for mode in ("fwd", "fwdbwd"):
                fn = cases.call_for(mode)(module, inputs)
                pair = halves(case, mode)
                times = {name: [] for name in (*THREADS, "halves")}
                for _ in range(1 + a.rounds):  # the first round warms up
                    for n in THREADS:
                        torch.set_num_threads(n)
                        t0 = time.perf_counter()
                        fn()
                        times[n].append(1e3 * (time.perf_counter() - t0))
                    times["halves"].append(1e3 * run_together(pool, pair))
                med = {n: statistics.median(v[1:]) for n, v in times.items()}
                best = {n: min(v[1:]) for n, v in times.items()}
                up, ceiling = med[1] / med[2], med[1] / med["halves"]
                print(f"| {B} | {T:,} | {mode} | {med[1]:.1f} ({best[1]:.1f}) | {med[2]:.1f} ({best[2]:.1f}) "
                      f"| {up:.2f}x | {med['halves']:.1f} ({best['halves']:.1f}) | {ceiling:.2f}x "
                      f"| {up / ceiling:.2f} |", flush=True)
    finally:
        pool.shutdown()
        torch.set_num_threads(before)


if __name__ == "__main__":
    main()
