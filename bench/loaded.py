"""Threading on a loaded machine: the op and the main job with busy neighbours.

Starts ``--load`` busy processes (``yes > /dev/null``), then runs every
configuration in a fresh subprocess (OpenMP reads ``OMP_WAIT_POLICY`` at start-up),
interleaved round by round:

- the headline op alone (bench/cases.py HEADLINE): fused forward, fused
  forward+backward and the eager reference forward;
- the main job (``python -m din_fused.train``, shortened with ``--epochs`` and
  ``--synthetic-users``) with ``--attention-impl fused`` and ``reference``;

each once with the default environment and once with ``OMP_WAIT_POLICY=passive``.
It reports medians and, per configuration, default / passive (the loss caused by
spinning waits).  The bounds of issue 8: the fused forward loses <= 1.5x against
its own passive run, and the main job with the fused op loses no more than with
the reference op.

    python bench/loaded.py                    # 2 busy processes, 3 rounds (~5 min on 2 cores)
    python bench/loaded.py --load 0           # the same on an otherwise quiet machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
POLICIES = ("default", "passive")
OPS = (("fused", "fwd"), ("fused", "fwdbwd"), ("reference", "fwd"))
IMPLS = ("fused", "reference")


# --------------------------------------------------------------------------------------
# Children (one configuration per process)
# --------------------------------------------------------------------------------------
def child_op(provider: str, mode: str, iters: int) -> dict:
    sys.path.insert(0, HERE)
    import cases
    import torch

    case = cases.HEADLINE
    inputs = cases.make_inputs(case)
    module = cases.ProviderSet(case).get(provider)
    fn = cases.call_for(mode)(module, inputs)
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(times), "threads": torch.get_num_threads()}


def child_train(impl: str, epochs: int, users: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.json")
        # main() directly: `python -m din_fused.train` re-runs itself with OMP_WAIT_POLICY=passive
        # when the variable is unset, and this measures both policies.
        call_main = "import sys; from din_fused.train import main; sys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-c", call_main, "--attention-impl", impl, "--epochs", str(epochs),
               "--synthetic-users", str(users), "--no-progress", "--metrics-out", path]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        with open(path) as f:
            m = json.load(f)
    return {"samples_per_second": m["samples_per_second"], "train_seconds": m["train_seconds"],
            "test_auc": m["test_auc"]}


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------
def run_child(args: list, policy: str) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "passive"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], env=env, cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", type=int, default=2, help="busy processes (yes > /dev/null) to start")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=30, help="timed op calls per child")
    ap.add_argument("--epochs", type=int, default=1, help="main job epochs")
    ap.add_argument("--users", type=int, default=1000, help="main job --synthetic-users")
    ap.add_argument("--skip-train", action="store_true", help="only the op")
    ap.add_argument("--out", default=None, help="also write the raw results as JSON here")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "op":
            res = child_op(rest[0], rest[1], int(rest[2]))
        else:
            res = child_train(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(res))
        return

    configs = [(f"op {p} {m}", ["op", p, m, str(a.iters)], "ms") for p, m in OPS]
    if not a.skip_train:
        configs += [(f"train {i}", ["train", i, str(a.epochs), str(a.users)], "samples_per_second")
                    for i in IMPLS]
    busy = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(a.load)]
    results: dict = {(name, pol): [] for name, _, _ in configs for pol in POLICIES}
    try:
        for r in range(a.rounds):
            for name, args, key in configs:
                # Alternate which policy goes first, so a drift in background load hits both.
                for pol in (POLICIES if r % 2 == 0 else POLICIES[::-1]):
                    results[(name, pol)].append(run_child(args, pol)[key])
                    print(f"round {r + 1}: {name:<22} {pol:<8} {results[(name, pol)][-1]:10.2f}",
                          file=sys.stderr, flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()

    load = os.getloadavg()[0]
    print(f"\n{a.load} busy processes, {os.cpu_count()} CPUs, load average at the end {load:.1f}; "
          f"median of {a.rounds} interleaved rounds\n")
    print("| configuration | default | OMP_WAIT_POLICY=passive | loss (default / passive) |")
    print("|---|---:|---:|---:|")
    summary = {}
    for name, _, key in configs:
        d, p = (statistics.median(results[(name, pol)]) for pol in POLICIES)
        # Time: loss = default / passive.  Throughput: loss = passive / default.
        loss = d / p if key == "ms" else p / d
        unit = "ms" if key == "ms" else "samples/s"
        summary[name] = {"default": d, "passive": p, "loss": loss, "unit": unit}
        print(f"| {name} | {d:,.2f} {unit} | {p:,.2f} {unit} | {loss:.2f}x |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"load": a.load, "rounds": a.rounds, "summary": summary,
                       "raw": {f"{k[0]} | {k[1]}": v for k, v in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
