"""GPU timings for issue 3: the fused op against the eager reference and torch.compile of it.

    python bench/gpu_bench.py [--out-md FILE] [--out-json FILE] [--budget SECONDS] [--quick]

For each shape (lengths uniform in 1..T, sigmoid, no normalisation, the DeepCTR
defaults) it times, with CUDA events, the forward and the forward+backward of

- ``fused``:    din_fused.din_attention (the CUDA kernels),
- ``eager``:    din_fused.reference.din_attention_ref (the pure-PyTorch oracle),
- ``compiled``: torch.compile of that same reference function,

all with the same weights, and reports the speed-ups, the backward/forward
ratio, achieved GB/s and TFLOP/s of the fused forward, and its distance to the
memory floor: the bytes of the valid keys read once at the measured
device-to-device copy bandwidth.  Also checks the fused output against the
eager one (max relative error) so a fast-but-wrong kernel cannot hide here.

The markdown table is printed last.  --budget stops starting new providers once
that many seconds have passed (the compiled reference is the slow one to set
up) and marks the skipped cells.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

SHAPES = [
    # name, B, T, D, hidden, dtype
    ("B8192 T200 D64 bf16", 8192, 200, 64, (80, 40), torch.bfloat16),
    # fp16 runs the same tensor-core kernels; its fragment loads were ldmatrix all along, the
    # bf16 ones only since session 11, so the two rows side by side show what that changed.
    ("B8192 T200 D64 fp16", 8192, 200, 64, (80, 40), torch.float16),
    ("B8192 T200 D64 fp32", 8192, 200, 64, (80, 40), torch.float32),
    ("B512 T2000 D64 bf16", 512, 2000, 64, (80, 40), torch.bfloat16),
    ("B4096 T10 D36 bf16 (HugeCTR-like)", 4096, 10, 36, (80, 40), torch.bfloat16),
]
QUICK_SHAPES = [("B256 T50 D16 bf16", 256, 50, 16, (16, 8), torch.bfloat16),
                ("B256 T50 D16 fp32", 256, 50, 16, (16, 8), torch.float32)]


DEVICE = "cuda"  # --device cpu: a dry run of this script's logic on a machine without a GPU


class _Timer:
    """CUDA events on the GPU; perf_counter for the CPU dry run."""

    def __init__(self):
        self.cuda = DEVICE == "cuda"
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self):
        if self.cuda:
            self.a.record()
        else:
            self.t = time.perf_counter()

    def stop_ms(self):
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            return self.a.elapsed_time(self.b)
        return (time.perf_counter() - self.t) * 1e3


def cuda_time_ms(fn, min_ms=150.0, reps=3, max_iters=500):
    """Mean time per call (ms), best of `reps` batches timed with CUDA events."""
    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    timer = _Timer()
    timer.start()
    fn()
    one = max(timer.stop_ms(), 1e-3)
    n = int(min(max_iters, max(3, math.ceil(min_ms / one))))
    best = math.inf
    for _ in range(reps):
        timer.start()
        for _ in range(n):
            fn()
        best = min(best, timer.stop_ms() / n)
    return best


def copy_bandwidth_gbs(nbytes=1 << 30):
    """Device-to-device copy: (read + write bytes) / time, in GB/s."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), min_ms=100.0)
    src = dst = None
    empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def make_inputs(B, T, D, hidden, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=gen).to(DEVICE, dtype)
    k = torch.randn(B, T, D, generator=gen).to(DEVICE, dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=gen).to(DEVICE)
    dims = [4 * D, *hidden, 1]
    weights = [(torch.randn(dims[i + 1], dims[i], generator=gen) * dims[i] ** -0.5).to(DEVICE, dtype)
               for i in range(len(dims) - 1)]
    biases = [(torch.randn(dims[i + 1], generator=gen) * 0.1).to(DEVICE, dtype) for i in range(len(dims) - 1)]
    g = torch.randn(B, D, generator=gen).to(DEVICE, dtype)
    return q, k, lengths, weights, biases, g


def fused_flops(n_valid, B, D, hidden):
    """Useful forward FLOPs with the folded first layer (2 per multiply-add)."""
    per_key = D * hidden[0] + sum(a * b for a, b in zip(hidden[:-1], hidden[1:])) + hidden[-1] + D
    return 2.0 * n_valid * per_key + 2.0 * B * D * hidden[0]


def run_shape(name, B, T, D, hidden, dtype, bw_gbs, deadline, log):
    import din_fused
    from din_fused.reference import din_attention_ref

    q, k, lengths, weights, biases, g = make_inputs(B, T, D, hidden, dtype)
    es = k.element_size()
    n_valid = int(lengths.sum())
    row = {"shape": name, "B": B, "T": T, "D": D, "hidden": list(hidden),
           "dtype": str(dtype).replace("torch.", ""), "valid_keys": n_valid}
    params = [w.requires_grad_() for w in weights] + [b.requires_grad_() for b in biases]
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()

    def fused(qq, kk):
        return din_fused.din_attention(qq, kk, lengths, weights=weights, biases=biases)

    def eager(qq, kk):
        return din_attention_ref(qq, kk, lengths, weights=weights, biases=biases)

    compiled_ref = torch.compile(din_attention_ref)

    def compiled(qq, kk):
        return compiled_ref(qq, kk, lengths, weights=weights, biases=biases)

    providers = {"fused": fused, "eager": eager, "compiled": compiled}
    outs = {}
    for pname, f in providers.items():
        if time.monotonic() > deadline:
            row[f"{pname}_fwd_ms"] = row[f"{pname}_fwdbwd_ms"] = None
            row[f"{pname}_note"] = "skipped (time budget)"
            continue
        try:
            with torch.no_grad():
                outs[pname] = f(q, k).float()
                row[f"{pname}_fwd_ms"] = cuda_time_ms(lambda f=f: f(q, k))

            def step(f=f):
                out = f(qg, kg)
                torch.autograd.grad(out, [qg, kg, *params], g)

            row[f"{pname}_fwdbwd_ms"] = cuda_time_ms(step)
        except Exception as e:  # noqa: BLE001 - a failing provider is a table cell, not a crash
            row[f"{pname}_note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            log(f"[{name}] {pname} failed:\n{traceback.format_exc()}")
        empty_cache()
    if "fused" in outs and "eager" in outs:
        ref = outs["eager"]
        row["max_rel_err_vs_eager"] = float((outs["fused"] - ref).abs().max() / ref.abs().max().clamp_min(1))
    f_ms = row.get("fused_fwd_ms")
    if f_ms:
        key_bytes = n_valid * D * es
        total_bytes = key_bytes + 2 * B * D * es + B * T * 4 + B * 8
        row["fused_fwd_GBps"] = total_bytes / (f_ms * 1e-3) / 1e9
        row["fused_fwd_TFLOPs"] = fused_flops(n_valid, B, D, hidden) / (f_ms * 1e-3) / 1e12
        row["floor_ms"] = key_bytes / (bw_gbs * 1e9) * 1e3
        row["fwd_over_floor"] = f_ms / row["floor_ms"]
        for base in ("eager", "compiled"):
            if row.get(f"{base}_fwd_ms"):
                row[f"speedup_fwd_vs_{base}"] = row[f"{base}_fwd_ms"] / f_ms
            if row.get(f"{base}_fwdbwd_ms") and row.get("fused_fwdbwd_ms"):
                row[f"speedup_fwdbwd_vs_{base}"] = row[f"{base}_fwdbwd_ms"] / row["fused_fwdbwd_ms"]
        if row.get("fused_fwdbwd_ms"):
            row["bwd_over_fwd"] = (row["fused_fwdbwd_ms"] - f_ms) / f_ms
    return row


def fmt(v, spec=".3f", suffix=""):
    return "—" if v is None else f"{v:{spec}}{suffix}"


COLUMNS = [  # header, formatter(row)
    ("shape", lambda r: r["shape"]),
    ("valid keys", lambda r: str(r.get("valid_keys", "—"))),
    ("fused fwd ms", lambda r: fmt(r.get("fused_fwd_ms"))),
    ("fused fwd+bwd ms", lambda r: fmt(r.get("fused_fwdbwd_ms"))),
    ("eager fwd / fwd+bwd ms", lambda r: f"{fmt(r.get('eager_fwd_ms'))} / {fmt(r.get('eager_fwdbwd_ms'))}"),
    ("compiled fwd / fwd+bwd ms",
     lambda r: f"{fmt(r.get('compiled_fwd_ms'))} / {fmt(r.get('compiled_fwdbwd_ms'))}"),
    ("fwd speed-up vs eager / compiled",
     lambda r: f"{fmt(r.get('speedup_fwd_vs_eager'), '.1f', 'x')} / "
               f"{fmt(r.get('speedup_fwd_vs_compiled'), '.1f', 'x')}"),
    ("fwd+bwd speed-up vs eager / compiled",
     lambda r: f"{fmt(r.get('speedup_fwdbwd_vs_eager'), '.1f', 'x')} / "
               f"{fmt(r.get('speedup_fwdbwd_vs_compiled'), '.1f', 'x')}"),
    ("bwd / fwd", lambda r: fmt(r.get("bwd_over_fwd"), ".2f")),
    ("fwd / memory floor", lambda r: fmt(r.get("fwd_over_floor"), ".1f", "x")),
    ("fused fwd GB/s", lambda r: fmt(r.get("fused_fwd_GBps"), ".0f")),
    ("fused fwd TFLOP/s", lambda r: fmt(r.get("fused_fwd_TFLOPs"), ".1f")),
    ("max rel err vs eager", lambda r: fmt(r.get("max_rel_err_vs_eager"), ".1e")),
]


def markdown(rows, bw_gbs, gpu):
    lines = [f"GPU: {gpu}; device-to-device copy bandwidth {bw_gbs:.0f} GB/s", "",
             "| " + " | ".join(h for h, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(f(r) for _, f in COLUMNS) + " |")
    notes = [f"- {r['shape']}: {p}: {r[p + '_note']}" for r in rows for p in ("fused", "eager", "compiled")
             if r.get(p + "_note")]
    if notes:
        lines += ["", "Notes:", *notes]
    lines += ["", "Targets (issue 3, H200, first shape): fwd >= 10x eager and >= 3x compiled; bwd <= 3x fwd; "
              "fwd within 2x of the memory floor."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-md")
    ap.add_argument("--out-json")
    ap.add_argument("--log")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds before providers are skipped")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: dry run of the script's logic (with --quick), not a benchmark")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 2
    logf = open(args.log, "a") if args.log else sys.stderr  # noqa: SIM115

    def log(msg):
        print(msg, file=logf, flush=True)

    t0 = time.monotonic()
    deadline = t0 + args.budget
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    bw = copy_bandwidth_gbs(1 << 30 if DEVICE == "cuda" else 1 << 24)
    log(f"copy bandwidth {bw:.0f} GB/s")
    rows = []
    for shape in (QUICK_SHAPES if args.quick else SHAPES):
        try:
            rows.append(run_shape(*shape, bw, deadline, log))
        except Exception as e:  # noqa: BLE001
            log(f"[{shape[0]}] failed:\n{traceback.format_exc()}")
            rows.append({"shape": shape[0], "fused_note": f"failed: {type(e).__name__}: {e}"})
        log(f"[{shape[0]}] done at {time.monotonic() - t0:.0f} s")
        empty_cache()
    md = markdown(rows, bw, gpu)
    if args.out_md:
        Path(args.out_md).write_text(md + "\n")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"gpu": gpu, "copy_GBps": bw, "rows": rows}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
