"""One side-by-side benchmark session -> markdown table + PNG plot.

    python bench/report.py                 # CPU, writes bench/results/local/report_cpu.md and perf_cpu.png
    python bench/report.py --device cuda   # the same on CUDA (report_cuda.md, perf_cuda.png)
    python bench/report.py --quick         # smaller sweeps, fewer rounds (a smoke run)

What it measures (all providers share the weights, see cases.py):
1. the headline shape (fp32, B=1024, T=100, D=36, H=(80,40), sigmoid, lengths
   uniform in 1..T): time per call of every provider, forward and
   forward+backward, interleaved round by round so that background load hits
   every provider alike; the fused kernel's speed-up against each baseline;
   the peak memory of one forward+backward per provider (CPU: a fresh
   subprocess per provider, peak RSS above the inputs with glibc's mmap
   threshold pinned so freed buffers leave RSS; CUDA: max_memory_allocated);
   the fused forward's achieved GFLOP/s against the machine's peak.
2. a few more shapes (Dice, softmax, long-tail and full lengths, larger T).
3. a T sweep (lengths uniform in 1..T, up to T=5000): speed-up against T.
4. linearity in sum(L): every row at length L for L doubling up to 5000, with T = L
   (tight) and T = 5000 (padded); the time should double with L and padding
   should cost nothing.
5. (CPU) the whole DIN training step of train_step.py, Dice and sigmoid attention.
6. (CPU) issue 12's targets in one table, each against this run's own numbers: the
   value reached, and for each target not met, what bounds it (for a ratio, the GFLOP/s
   it would need against the measured FMA peak; for the small case, the call's kernels
   against the rest of the call).
7. (CPU) issue 9's layouts: layouts.py's skewed, linearity and shared-history tables (time and
   peak memory; --quick: the shared history at T=200, C=1000 only) and long_seq.py's long rows
   on 1 and 2 threads (--quick: B=1, T=100k).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import cases  # noqa: E402
import torch  # noqa: E402

# Issue 12's ratio targets against DeepCTR-Torch eager: the report says what fraction of the
# measured peak each would need.  A forward+backward recomputes the activations (a rule of the
# design), so it does ~4x the forward's FLOPs: the forward, then the backward's forward, dX and dW.
TARGET_FWD, TARGET_FWDBWD, FWDBWD_FLOPS = 25.0, 14.0, 4.0
TARGET_PEAK, TARGET_BWD = 0.50, 2.0            # forward >= 50% of the peak; backward <= 2x the forward
TARGET_DICE_REF, TARGET_DICE_DEEPCTR = 5.0, 15.0
TARGET_SMALL_FWD, TARGET_SMALL_FWDBWD = 5.0, 4.0  # B=128, T=10
TARGET_STEP = 10.0
DICE = replace(cases.HEADLINE, activation="dice", compile=False, tags=())
SMALL = replace(cases.HEADLINE, B=128, T=10, compile=False, tags=())
FIXED = replace(cases.HEADLINE, B=1, T=1, compile=False, tags=())  # nothing to compute: the call's cost

LABELS = {
    "fused": "fused (din_fused)",
    "reference": "eager reference",
    "compiled_ref": "torch.compile(reference)",
    "deepctr": "DeepCTR-Torch eager",
    "compiled_deepctr": "torch.compile(DeepCTR-Torch)",
}


# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------
def time_interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """name -> list of seconds; providers take turns each round (rotating order)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def med(ts):
    return statistics.median(ts)


def session(case: cases.Case, device: str, providers, rounds: int, modes=("fwd", "fwdbwd")) -> dict:
    """{mode: {provider: [seconds]}} for one case."""
    ps = cases.ProviderSet(case, device)
    inputs = cases.make_inputs(case, device)
    mods = {p: ps.get(p) for p in providers}
    mods = {p: m for p, m in mods.items() if m is not None}
    out = {}
    for mode in modes:
        fns = {p: cases.call_for(mode)(m, inputs, device) for p, m in mods.items()}
        warm = 2 if any(p.startswith("compiled") for p in fns) else 1
        out[mode] = time_interleaved(fns, rounds, warmup=warm)
        for f in fns.values():
            getattr(f, "clear", lambda: None)()
    out["sum_lengths"] = cases.sum_lengths(inputs)
    return out


class BackgroundLoad:
    """CPU time used by *other* processes while a section ran, as a fraction of the
    machine (all CPUs): /proc/stat busy time minus this process and its children."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        ncpu = os.cpu_count() or 1
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        self.fraction = max(0.0, other / (wall * ncpu)) if wall > 0 else 0.0
        return False

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return 0.0
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        import resource

        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def load_note(load: BackgroundLoad) -> str:
    return (f"Other processes used {100 * load.fraction:.0f}% of the machine's CPU time while this ran "
            "(0% = a quiet machine; timings on a shared machine are only as good as this).")


# ----------------------------------------------------------------------------------------
# Peak memory of one forward+backward
# ----------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def mem_worker(case: cases.Case, provider: str, device: str) -> dict:
    """Runs in a fresh process (CPU) or in-process (CUDA): peak bytes above the
    inputs and parameters during one forward+backward, after two warm-up calls."""
    cases.quiet_compile_logs()
    inputs = cases.make_inputs(case, device)
    module = cases.ProviderSet(case, device).get(provider)
    if module is None:
        return {"peak_bytes": None}
    fn = cases.fwdbwd_call(module, inputs, device)
    fn()
    fn()
    fn.clear()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base, "method": "max_memory_allocated"}
    import gc

    gc.collect()
    base = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
        method = "VmHWM-VmRSS"
    except OSError:
        method = "VmHWM-VmRSS (peak not reset: includes warm-up)"
    fn()
    peak = _status_kb("VmHWM")
    return {"peak_bytes": (peak - base) * 1024, "method": method}


def measure_memory(case: cases.Case, provider: str, device: str) -> dict:
    if device.startswith("cuda"):
        return mem_worker(case, provider, device)
    env = dict(os.environ)
    # A fixed mmap threshold: every buffer >= 64 KiB is its own mapping and leaves
    # RSS when freed, so peak RSS follows the live tensors.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mem-worker",
           json.dumps(case.to_dict()), provider, "--device", device,
           "--threads", str(torch.get_num_threads())]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"peak_bytes": None, "error": (res.stderr or res.stdout)[-2000:]}


# ----------------------------------------------------------------------------------------
# Machine
# ----------------------------------------------------------------------------------------
def machine_info(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp spins, then sleeps)")}
    try:
        import din_fused

        info["din_fused build"] = din_fused.build_info()
    except Exception as e:  # noqa: BLE001
        info["din_fused build"] = repr(e)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=20).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        flags = fields.get("Flags", "").split()
        info["cpu"] = fields.get("Model name", platform.processor())
        info["cpus"] = fields.get("CPU(s)")
        info["cores per socket"] = fields.get("Core(s) per socket")
        info["threads per core"] = fields.get("Thread(s) per core")
        simd = ("avx", "fma", "sse4_2", "f16c")
        info["cpu flags (SIMD)"] = " ".join(f for f in flags if f.startswith(simd))
    except Exception:  # noqa: BLE001
        info["cpu"] = platform.processor()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def gemm_reference_gflops(device: str, n: int = 2048, reps: int = 5) -> float:
    """What torch.mm (MKL/oneDNN or cuBLAS) reaches on an n^3 fp32 GEMM here: a
    practical ceiling next to the measured FMA peak."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


_FMA_PROBE = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>
#ifdef __AVX512F__
typedef __m512 V; enum { kLanes = 16 };
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#else
typedef __m256 V; enum { kLanes = 8 };
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#endif
#define R(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
static float run(long n) {  // 12 independent chains of full-width FMAs
  V b = SET1(1.0000001f), c = SET1(1e-7f);
#define D(i) V a##i = SET1(i);
  R(D)
  for (long k = 0; k < n; ++k) {
#define F(i) a##i = FMA(a##i, b, c);
    R(F)
    __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(a6),
                     "+x"(a7), "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
  }
  float s = 0, lane[kLanes];
#define S(i) { V t = a##i; __builtin_memcpy(lane, &t, sizeof lane); for (float x : lane) s += x; }
  R(S) return s;
}
int main(int argc, char** argv) {
  int nt = argc > 1 ? atoi(argv[1]) : 1; long n = 20000000; double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> th;
    for (int i = 0; i < nt; ++i) th.emplace_back([n] { volatile float s = run(n); (void)s; });
    for (auto& t : th) t.join();
    double e = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (e < best) best = e;
  }
  printf("%.1f\n", 12.0 * n * kLanes * 2 * nt / best / 1e9);
}
"""


def fma_peak_gflops(threads: int):
    """(GFLOP/s, ISA) of `threads` cores running 12 independent chains of the widest
    fp32 FMAs this CPU has (AVX-512 or AVX2), compiled with the system C++ compiler;
    None when there is no compiler or neither ISA."""
    import shutil
    import tempfile

    cxx = shutil.which("c++") or shutil.which("g++")
    cpuinfo = open("/proc/cpuinfo").read().split()
    isa = "avx512f" if "avx512f" in cpuinfo else ("avx2" if {"avx2", "fma"} <= set(cpuinfo) else None)
    if not cxx or isa is None:
        return None
    flags = ["-mavx512f"] if isa == "avx512f" else ["-mavx2", "-mfma"]
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "fma.cpp", Path(d) / "fma"
        src.write_text(_FMA_PROBE)
        try:
            subprocess.run([cxx, "-O2", *flags, "-std=c++17", "-pthread", str(src), "-o", str(exe)],
                           check=True, capture_output=True, timeout=120)
            out = subprocess.run([str(exe), str(threads)], capture_output=True, text=True, timeout=300)
            return float(out.stdout.strip()), ("AVX-512" if isa == "avx512f" else "AVX2")
        except (subprocess.SubprocessError, ValueError, OSError):
            return None


# ----------------------------------------------------------------------------------------
# Report sections
# ----------------------------------------------------------------------------------------
def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.2f}" if s < 1 else f"{s * 1e3:.0f}"


def headline_section(args, lines: list, data: dict) -> None:
    case = cases.HEADLINE
    providers = [p for p in cases.PROVIDERS if args.compile or not p.startswith("compiled")]
    print(f"[report] headline session: {case.id}, providers {providers}", flush=True)
    with BackgroundLoad() as load:
        res = session(case, args.device, providers, args.rounds)
    mem = {}
    if not args.skip_mem:
        for p in res["fwd"]:
            print(f"[report] peak memory of {p} ...", flush=True)
            mem[p] = measure_memory(case, p, args.device)
    f_fwd, f_fb = med(res["fwd"]["fused"]), med(res["fwdbwd"]["fused"])
    n_valid = res["sum_lengths"]
    gflop = cases.forward_flops(case, n_valid) / 1e9
    data["headline"] = {"case": case.to_dict(), "times": {m: res[m] for m in ("fwd", "fwdbwd")},
                        "memory": mem, "sum_lengths": n_valid, "background_load": load.fraction}
    fmem = (mem.get("fused") or {}).get("peak_bytes")
    lines += [
        f"### Headline: fp32, B={case.B}, T={case.T}, D={case.D}, H={case.hidden}, {case.activation}, "
        f"lengths uniform in 1..T (sum L = {n_valid}), {torch.get_num_threads()} threads, {args.device}",
        "",
        f"Median of {args.rounds} interleaved rounds (min in brackets). "
        "Speed-up = provider time / fused time. " + load_note(load),
        "",
        "| provider | forward ms | fwd+bwd ms | fused fwd speed-up | fused fwd+bwd speed-up | "
        "peak mem fwd+bwd MB | memory / fused |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in res["fwd"]:
        tf, tb = med(res["fwd"][p]), med(res["fwdbwd"][p])
        m = (mem.get(p) or {}).get("peak_bytes")
        mtxt = f"{m / 2**20:.1f}" if m is not None else "n/a"
        mrat = f"{m / fmem:.1f}x" if (m is not None and fmem) else "n/a"
        lines.append(
            f"| {LABELS[p]} | {fmt_ms(tf)} ({fmt_ms(min(res['fwd'][p]))}) | {fmt_ms(tb)} "
            f"({fmt_ms(min(res['fwdbwd'][p]))}) | {tf / f_fwd:.2f}x | {tb / f_fb:.2f}x | {mtxt} | {mrat} |")
    ach = gflop / f_fwd
    ach_min = gflop / min(res["fwd"]["fused"])
    lines += ["", f"Fused forward: {gflop:.3f} GFLOP (napkin, 2(D*H1 + H1*H2 + H2 + D) per valid position) "
              f"in {fmt_ms(f_fwd)} ms = **{ach:.0f} GFLOP/s** median ({ach_min:.0f} GFLOP/s best round)."]
    if not args.device.startswith("cuda"):
        probe = None if args.skip_gemm else fma_peak_gflops(torch.get_num_threads())
        if probe:
            peak, isa = probe
            data["fma_peak_gflops"], data["fma_peak_isa"] = peak, isa
            lines.append(f"Measured FMA peak of this machine ({torch.get_num_threads()} threads, independent "
                         f"{isa} FMA chains): {peak:.0f} GFLOP/s, so the fused forward reaches "
                         f"{100 * ach / peak:.0f}% (best round {100 * ach_min / peak:.0f}%) of what the "
                         "cores can actually do.")
    if not args.skip_gemm:
        g = gemm_reference_gflops(args.device)
        data["gemm_gflops"] = g
        lines.append(f"For scale, torch.mm on a 2048^3 fp32 GEMM reaches {g:.0f} GFLOP/s here with the same "
                     "threads (its BLAS may not pick AVX-512 kernels on every CPU).")
    peak = data.get("fma_peak_gflops")
    if peak and "deepctr" in res["fwd"]:
        # What the ratio targets ask of the kernel against this run's baseline.
        d_f, d_fb = med(res["fwd"]["deepctr"]), med(res["fwdbwd"]["deepctr"])
        need_f = gflop * TARGET_FWD / d_f
        need_fb = FWDBWD_FLOPS * gflop * TARGET_FWDBWD / d_fb
        data["target_needs"] = {"fwd_gflops": need_f, "fwdbwd_gflops": need_fb}
        gm = data.get("gemm_gflops")
        mm = f", against torch.mm's {100 * gm / peak:.0f}% on a large GEMM without activations" if gm else ""
        lines.append(
            f"Against this run's DeepCTR-Torch ({fmt_ms(d_f)} ms forward, {fmt_ms(d_fb)} ms fwd+bwd), a "
            f"forward {TARGET_FWD:.0f}x faster would have to run at {need_f:.0f} GFLOP/s "
            f"({100 * need_f / peak:.0f}% of the FMA peak), and a forward+backward {TARGET_FWDBWD:.0f}x "
            f"faster at {need_fb:.0f} GFLOP/s ({100 * need_fb / peak:.0f}%; it does ~{FWDBWD_FLOPS:.0f}x the "
            f"forward's FLOPs, the backward recomputing the activations){mm}.")
    if mem:
        lines.append("")
        lines.append(f"Peak memory: {next(iter(mem.values())).get('method', '')}, one forward+backward "
                     "above the inputs and parameters, after two warm-up calls"
                     + (" (a fresh process per provider)." if not args.device.startswith("cuda") else "."))
    lines.append("")


def extra_section(args, lines: list, data: dict) -> None:
    h = replace(cases.HEADLINE, compile=False, tags=())
    extra = [replace(h, activation="dice"), replace(h, normalization="softmax"),
             replace(h, lengths="longtail"), replace(h, lengths="full"), replace(h, T=400)]
    providers = ["fused", "reference", "deepctr"]
    lines += ["### Other shapes (headline with one change)", "",
              f"Median of {max(5, args.rounds // 2)} interleaved rounds.", "",
              "| case | fused fwd ms | fused fwd+bwd ms | fwd vs eager ref | fwd+bwd vs eager ref | "
              "fwd vs DeepCTR | fwd+bwd vs DeepCTR |", "|---|---:|---:|---:|---:|---:|---:|"]
    data["extra"] = []
    for c in extra:
        print(f"[report] extra case {c.id}", flush=True)
        res = session(c, args.device, providers, max(5, args.rounds // 2))
        ff, fb = med(res["fwd"]["fused"]), med(res["fwdbwd"]["fused"])

        def ratio(p, mode, base, res=res):
            return f"{med(res[mode][p]) / base:.2f}x" if p in res[mode] else "n/a"

        lines.append(f"| {c.id} | {fmt_ms(ff)} | {fmt_ms(fb)} | {ratio('reference', 'fwd', ff)} | "
                     f"{ratio('reference', 'fwdbwd', fb)} | {ratio('deepctr', 'fwd', ff)} | "
                     f"{ratio('deepctr', 'fwdbwd', fb)} |")
        data["extra"].append({"case": c.to_dict(), "times": {m: res[m] for m in ("fwd", "fwdbwd")}})
    lines.append("")


def t_sweep_section(args, lines: list, data: dict) -> dict:
    Ts = [10, 20, 50, 100, 200, 500, 1000, 2000, args.tmax] if not args.quick else [10, 100, 1000]
    Ts = sorted({t for t in Ts if t <= args.tmax})
    providers = ["fused", "reference", "deepctr"]
    rows = []
    lines += [f"### T sweep: B={args.sweep_batch}, lengths uniform in 1..T (speed-up = provider / fused)", "",
              "Best of the interleaved rounds per provider (a load burst can only slow a round down): "
              "at least 15 rounds up to T = 100, fewer above.", "",
              "| T | sum L | fused fwd ms | fused fwd+bwd ms | fwd vs eager ref | fwd vs DeepCTR | "
              "fwd+bwd vs eager ref | fwd+bwd vs DeepCTR |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for T in Ts:
        c = replace(cases.HEADLINE, B=args.sweep_batch, T=T, compile=False, tags=())
        print(f"[report] T sweep T={T}", flush=True)
        # Short calls get more rounds: at T <= 100 a round of all three providers costs
        # tens of ms, and a best of 3 was mostly a measure of which round a burst missed.
        if args.quick:
            rounds = 3
        elif T <= 100:
            rounds = max(15, args.rounds)
        else:
            rounds = max(3, args.rounds // 2) if T <= 1000 else 3
        res = session(c, args.device, providers, rounds)
        r = {"T": T, "sum_lengths": res["sum_lengths"]}
        for mode in ("fwd", "fwdbwd"):
            for p, ts in res[mode].items():
                r[f"{mode}_{p}"] = min(ts)  # best interleaved round: robust to load bursts
        rows.append(r)

        def sp(mode, p, r=r):
            return f"{r[f'{mode}_{p}'] / r[f'{mode}_fused']:.2f}x" if f"{mode}_{p}" in r else "n/a"

        lines.append(f"| {T} | {r['sum_lengths']} | {fmt_ms(r['fwd_fused'])} | {fmt_ms(r['fwdbwd_fused'])} | "
                     f"{sp('fwd', 'reference')} | {sp('fwd', 'deepctr')} | {sp('fwdbwd', 'reference')} | "
                     f"{sp('fwdbwd', 'deepctr')} |")
    lines.append("")
    data["t_sweep"] = rows
    return rows


def linearity_section(args, lines: list, data: dict) -> list:
    Tp = args.tmax
    Ls = [Tp // 16, Tp // 8, Tp // 4, Tp // 2, Tp] if not args.quick else [Tp // 4, Tp // 2, Tp]
    Ls = [max(1, L) for L in Ls]
    B = args.linear_batch
    rows = []
    for L in Ls:
        print(f"[report] linearity L={L}", flush=True)
        tight = replace(cases.HEADLINE, B=B, T=L, lengths="full", compile=False, tags=())
        padded = replace(tight, T=Tp, max_len=L)
        r = {"L": L, "sum_lengths": B * L}
        for name, c in (("tight", tight), ("padded", padded)):
            res = session(c, args.device, ["fused"], max(5, args.rounds))
            r[f"fwd_{name}"] = min(res["fwd"]["fused"])
            r[f"fwdbwd_{name}"] = min(res["fwdbwd"]["fused"])
        rows.append(r)
    lines += [f"### Linearity in sum(L): fused only, B={B}, every row at length L; tight: T = L, "
              f"padded: T = {Tp}", "", "Best of the rounds.", "",
              "| L | sum L | fwd ms tight | fwd ms padded | padded / tight | fwd x2 L ratio | "
              "fwd+bwd ms tight | fwd+bwd ms padded | fwd+bwd x2 L ratio |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def dbl(now, before):
        x = now / before
        return f"{x:.2f} {'ok' if abs(x - 2) <= 0.3 else 'off'}"

    for i, r in enumerate(rows):
        prev = rows[i - 1] if i else None
        d_fwd = dbl(r["fwd_tight"], prev["fwd_tight"]) if prev else ""
        d_fb = dbl(r["fwdbwd_tight"], prev["fwdbwd_tight"]) if prev else ""
        lines.append(f"| {r['L']} | {r['sum_lengths']} | {fmt_ms(r['fwd_tight'])} | "
                     f"{fmt_ms(r['fwd_padded'])} | "
                     f"{r['fwd_padded'] / r['fwd_tight']:.2f} | {d_fwd} | {fmt_ms(r['fwdbwd_tight'])} | "
                     f"{fmt_ms(r['fwdbwd_padded'])} | {d_fb} |")
    lines += ["", "x2 L ratio: time at L over time at L/2 (2.00 = linear; ok = within 15%). "
              "padded / tight: the cost of padding the same sequences to T = "
              f"{Tp} (1.00 = free). The forward+backward must also write the dense "
              "[B, T, D] key gradient, so its padded time includes zero-filling that tensor.", ""]
    data["linearity"] = rows
    return rows


def layouts_section(args, lines: list) -> None:
    """Issue 9's layouts and long sequences, from layouts.py and long_seq.py, in this session."""
    import layouts
    import long_seq

    rounds = 3 if args.quick else 5
    lines += layouts.run(rounds, "shared" if args.quick else None, mode=cases.allocator_mode(False),
                         shared=[(200, 1000)] if args.quick else layouts.SHARED, memory=not args.skip_mem)
    lines += ["### Long sequences: 2 threads against 1", "",
              *long_seq.table([(1, 100_000)] if args.quick else long_seq.SHAPES, rounds), ""]


def step_section(args, lines: list, data: dict) -> dict:
    """The whole DIN training step of train_step.py, in this session: {attention: its medians}."""
    import train_step

    quick = args.quick
    shape = train_step.QUICK if quick else train_step.Shape()
    a = argparse.Namespace(rounds=2 if quick else 5, steps=2 if quick else 4, warmup=1 if quick else 2,
                           memory=() if (args.skip_mem or quick) else train_step.ATTENTIONS,
                           peak=data.get("fma_peak_gflops"))
    lines += train_step.header(shape, a)
    steps = {att: train_step.section(att, shape, a, lines) for att in train_step.ATTENTIONS}
    data["train_step"] = {"shape": asdict(shape),
                          "seconds": {att: {k: v for k, v in st.items() if k != "att_flops"}
                                      for att, st in steps.items()},
                          "att_flops": next(iter(steps.values()))["att_flops"]}
    return steps


def _medians(args, data: dict, case: cases.Case, providers: list, rounds: int) -> dict:
    """{mode: {provider: median seconds}} of ``case``: the extra section's, when it ran the case."""
    for e in data.get("extra", []):
        if cases.Case.from_dict(e["case"]) == case:
            return {m: {p: med(t) for p, t in e["times"][m].items()} for m in ("fwd", "fwdbwd")}
    res = session(case, args.device, providers, rounds)
    return {m: {p: med(t) for p, t in res[m].items()} for m in ("fwd", "fwdbwd")}


class _PassClock:
    """Stands in for din_fused.ops._C and times each kernel pass of a call: the Dice statistics
    per layer, the forward, the backward's reductions per layer and the full backward.
    ``seconds``: the total per pass; ``per_call``: the kernels' time of each op call (one
    starts at a forward pass, or at the statistics passes that precede a training-mode Dice
    forward; the backward's passes add to the latest).  Its own cost, a Python wrapper per
    pass, falls inside the timed calls (~1 us a pass)."""

    def __init__(self, real):
        self.real, self.seconds, self.per_call, self._last = real, {}, [], None
        for name in ("stats", "forward", "backward"):  # set once: no __getattr__ per call
            setattr(self, name, self._timed(name, getattr(real, name)))

    def __getattr__(self, name):
        return getattr(self.real, name)

    def _timed(self, name, fn):
        def timed(cfg):
            if name == "stats":
                key = f"statistics, layer {cfg['stats_layer']}"
            elif name == "backward" and cfg.get("reduce_layer", -1) >= 0:
                key = f"reduction, layer {cfg['reduce_layer']}"
            else:
                key = name
            t0 = time.perf_counter()
            out = fn(cfg)
            dt = time.perf_counter() - t0
            self.seconds[key] = self.seconds.get(key, 0.0) + dt
            # A call's passes run statistics*, forward, backward*: a new call starts at a
            # statistics or forward pass that no statistics pass precedes.
            if not self.per_call or (name != "backward" and self._last != "stats"):
                self.per_call.append(0.0)
            self.per_call[-1] += dt
            self._last = name
            return out
        return timed


@contextlib.contextmanager
def pass_clock():
    """din_fused's kernel passes timed while the block runs (a _PassClock stands in for ops._C)."""
    from din_fused import ops

    real = ops._C
    ops._C = clock = _PassClock(real)
    try:
        yield clock
    finally:
        ops._C = real


def dice_passes(args, calls: int = 10) -> dict:
    """Training-mode Dice forward+backward of the headline shape, seconds per call in each
    kernel pass (mean of ``calls``), and the whole call ("call")."""
    inputs = cases.make_inputs(DICE, args.device)
    run = cases.fwdbwd_call(cases.ProviderSet(DICE, args.device).get("fused"), inputs, args.device)
    run()
    with pass_clock() as clock:
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        total = time.perf_counter() - t0
    return {**{k: v / calls for k, v in clock.seconds.items()}, "call": total / calls}


def targets_section(args, data: dict, steps: dict) -> list:
    """Issue 12's targets against this run: the value reached and, for one not met, what bounds
    it. A target stated as a ratio to a baseline is turned into the GFLOP/s the fused op would
    have to reach (napkin FLOPs; a forward+backward does FWDBWD_FLOPS times the forward's, the
    backward recomputing the activations) in the time the ratio allows; the small case's row
    splits the call into its kernels (timed in the same rounds) and the rest."""
    peak = data.get("fma_peak_gflops")
    rows = []

    def need(gflop, seconds):
        rate = gflop / seconds
        pct = f", {100 * rate / peak:.0f}% of the measured FMA peak" if peak else ""
        return f"needs {rate:.0f} GFLOP/s{pct}"

    def add(target, now, met, limit):
        rows.append({"target": target, "now": now, "met": bool(met), "limit": "" if met else limit})

    def pct(rate):
        return f"{100 * rate / peak:.0f}% of the peak" if peak else f"{rate:.0f} GFLOP/s"

    h = data["headline"]
    hf = {m: {p: med(t) for p, t in h["times"][m].items()} for m in ("fwd", "fwdbwd")}
    f, fb = hf["fwd"]["fused"], hf["fwdbwd"]["fused"]
    g = cases.forward_flops(cases.HEADLINE, h["sum_lengths"]) / 1e9
    if peak:
        add(f"headline forward >= {TARGET_PEAK:.0%} of the FMA peak", f"{100 * g / f / peak:.0f}% "
            f"({g / f:.0f} of {peak:.0f} GFLOP/s)", g / f >= TARGET_PEAK * peak,
            f"{TARGET_PEAK:.0%} is a forward in {g / (TARGET_PEAK * peak) * 1e3:.2f} ms, "
            f"against {fmt_ms(f)} ms")
    bwd = fb - f
    add(f"headline backward <= {TARGET_BWD:.0f}x the forward", f"{bwd / f:.1f}x ({fmt_ms(bwd)} ms)",
        bwd <= TARGET_BWD * f,
        f"the backward does ~{FWDBWD_FLOPS - 1:.0f}x the forward's FLOPs (it recomputes the activations) and "
        f"runs at {pct((FWDBWD_FLOPS - 1) * g / bwd)}; in {TARGET_BWD:.0f}x the forward's time it "
        + need((FWDBWD_FLOPS - 1) * g, TARGET_BWD * f))
    if "deepctr" in hf["fwd"]:
        d, dfb = hf["fwd"]["deepctr"], hf["fwdbwd"]["deepctr"]
        add(f"headline forward >= {TARGET_FWD:.0f}x DeepCTR-Torch", f"{d / f:.1f}x", d / f >= TARGET_FWD,
            need(g, d / TARGET_FWD) + f" (the fused forward: {pct(g / f)})")
        add(f"headline forward+backward >= {TARGET_FWDBWD:.0f}x DeepCTR-Torch", f"{dfb / fb:.1f}x",
            dfb / fb >= TARGET_FWDBWD, need(FWDBWD_FLOPS * g, dfb / TARGET_FWDBWD)
            + f" (the fused forward+backward: {pct(FWDBWD_FLOPS * g / fb)})")

    dice = _medians(args, data, DICE, ["fused", "reference", "deepctr"], max(5, args.rounds // 2))["fwdbwd"]
    df = dice["fused"]
    passes = dice_passes(args)
    kernels = sum(v for k, v in passes.items() if k != "call")
    extra = sum(v for k, v in passes.items() if k.startswith(("statistics", "reduction")))
    for base, label, target in (("reference", "the eager reference", TARGET_DICE_REF),
                                ("deepctr", "DeepCTR-Torch", TARGET_DICE_DEEPCTR)):
        if base in dice:
            add(f"Dice, training, forward+backward >= {target:.0f}x {label}", f"{dice[base] / df:.1f}x "
                f"({fmt_ms(df)} ms)", dice[base] / df >= target,
                f"{target:.0f}x is {fmt_ms(dice[base] / target)} ms. Timed alone (table below), a call "
                f"takes {fmt_ms(passes['call'])} ms, of which its six kernel passes take {fmt_ms(kernels)}: "
                f"the four that Dice's batch statistics add (two statistics, two reductions) "
                f"{fmt_ms(extra)}, against {fmt_ms(fb)} ms for the sigmoid's whole forward+backward. On the "
                f"forward+backward's count it " + need(FWDBWD_FLOPS * g, dice[base] / target)
                + " at the least")

    fixed = session(FIXED, args.device, ["fused"], 60 if args.quick else 300)
    for mode, target, factor in (("fwd", TARGET_SMALL_FWD, 1), ("fwdbwd", TARGET_SMALL_FWDBWD, FWDBWD_FLOPS)):
        with pass_clock() as clock:  # the fused calls' kernels, timed in the same rounds
            rounds = max(15 if args.quick else 45, args.rounds)
            small = session(SMALL, args.device, ["fused", "deepctr"], rounds, modes=(mode,))
        if "deepctr" not in small[mode]:
            continue
        t, d, c = med(small[mode]["fused"]), med(small[mode]["deepctr"]), med(fixed[mode]["fused"])
        kern = med(clock.per_call)
        flops = factor * cases.forward_flops(SMALL, small["sum_lengths"]) / 1e9
        name = "forward" if mode == "fwd" else "forward+backward"
        add(f"B={SMALL.B}, T={SMALL.T}, {name} >= {target:.0f}x DeepCTR-Torch",
            f"{d / t:.1f}x ({fmt_ms(t)} ms)", d / t >= target,
            f"{target:.0f}x is {fmt_ms(d / target)} ms. The fused call's kernels take {fmt_ms(kern)} ms of "
            f"its {fmt_ms(t)} (medians, same rounds; {pct(flops / kern)} on the napkin count); the rest is "
            f"Python, autograd and allocation (a B=1, T=1 call: {fmt_ms(c)} ms)")

    for att, st in steps.items():
        if "deepctr" not in st:
            continue
        allowed, unit = st["deepctr"] / TARGET_STEP, st["attention"]
        add(f"whole DIN training step, {att} attention, >= {TARGET_STEP:.0f}x DeepCTR-Torch",
            f"{st['deepctr'] / st['din_fused']:.1f}x ({st['din_fused'] * 1e3:.1f} ms)",
            st["deepctr"] / st["din_fused"] >= TARGET_STEP,
            f"{TARGET_STEP:.0f}x is {allowed * 1e3:.1f} ms; the attention unit's forward+backward alone "
            f"takes {unit * 1e3:.1f} ms ({pct(FWDBWD_FLOPS * st['att_flops'] / 1e9 / unit)}), the rest of "
            f"the step {(st['din_fused'] - unit) * 1e3:.1f} ms")
    data["targets"] = rows
    out = ["### Issue 12's targets in this run", "",
           "Each against this session's own numbers (medians). A target not met says what bounds it; for a "
           "ratio to a baseline, the GFLOP/s of the napkin count (forward+backward: "
           f"{FWDBWD_FLOPS:.0f}x the forward's) in the time the target allows, against the FMA peak measured "
           "in this run (the headline section below).", "", "| target | this run | met | what bounds it |",
           "|---|---|---|---|"]
    out += [f"| {r['target']} | {r['now']} | {'yes' if r['met'] else 'no'} | {r['limit']} |" for r in rows]
    data["dice_passes"] = passes
    out += ["", "Training-mode Dice, headline shape, one forward+backward by kernel pass (mean of 10 calls, "
            f"{fmt_ms(passes['call'])} ms a call; the rest of the call is Python, autograd and allocation):",
            "",
            "| pass | ms |", "|---|---:|"]
    out += [f"| {k} | {v * 1e3:.2f} |" for k, v in passes.items() if k != "call"]
    return out + [""]


def plot(args, sweep_rows, lin_rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    if sweep_rows:
        Ts = [r["T"] for r in sweep_rows]
        for mode, style in (("fwd", "-"), ("fwdbwd", "--")):
            for p, color in (("deepctr", "C0"), ("reference", "C1")):
                key = f"{mode}_{p}"
                if all(key in r for r in sweep_rows):
                    a1.plot(Ts, [r[key] / r[f"{mode}_fused"] for r in sweep_rows], style, color=color,
                            marker="o", label=f"vs {LABELS[p]}, {'forward' if mode == 'fwd' else 'fwd+bwd'}")
        a1.set_xscale("log")
        a1.set_xlabel("T (lengths uniform in 1..T)")
        a1.set_ylabel("speed-up of fused (x)")
        a1.set_title(f"Fused speed-up vs T (B={args.sweep_batch}, {args.device})")
        a1.grid(True, which="both", alpha=0.3)
        a1.legend(fontsize=8)
    if lin_rows:
        x = [r["sum_lengths"] for r in lin_rows]
        for key, label, style in (("fwd_tight", "forward, T = L", "o-"),
                                  ("fwd_padded", f"forward, T = {args.tmax}", "s--"),
                                  ("fwdbwd_tight", "fwd+bwd, T = L", "^-"),
                                  ("fwdbwd_padded", f"fwd+bwd, T = {args.tmax}", "v--")):
            a2.plot(x, [r[key] * 1e3 for r in lin_rows], style, label=label)
        a2.set_xlabel("sum of lengths (valid positions)")
        a2.set_ylabel("time per call (ms)")
        a2.set_title(f"Fused time vs sum(L) (B={args.linear_batch})")
        a2.grid(True, alpha=0.3)
        a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds of the headline session")
    ap.add_argument("--out", default=str(HERE / "results" / "local"),
                    help="folder for the report, its JSON and plot (default: bench/results/local, untracked)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile providers")
    ap.add_argument("--skip-mem", action="store_true")
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--skip-extra", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-step", action="store_true", help="skip the whole training step (CPU)")
    ap.add_argument("--skip-layouts", action="store_true", help="skip issue 9's layouts and long rows (CPU)")
    ap.add_argument("--tmax", type=int, default=5000)
    ap.add_argument("--sweep-batch", type=int, default=0,
                    help="B of the T sweep (default 128 CPU, 1024 CUDA)")
    ap.add_argument("--linear-batch", type=int, default=0,
                    help="B of the linearity run (default 512 CPU, 2048 CUDA)")
    ap.add_argument("--name", default="", help="output name suffix: report_<name>.md, perf_<name>.png "
                    "(default: cpu or cuda, plus -<N>threads when --threads is given)")
    ap.add_argument("--quick", action="store_true", help="smaller sweeps and fewer rounds")
    ap.add_argument("--mem-worker", nargs=2, metavar=("CASE_JSON", "PROVIDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases.quiet_compile_logs()
    if args.mem_worker:
        case = cases.Case.from_dict(json.loads(args.mem_worker[0]))
        print(json.dumps(mem_worker(case, args.mem_worker[1], args.device)))
        return 0
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("--device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    args.sweep_batch = args.sweep_batch or (1024 if cuda else 128)
    args.linear_batch = args.linear_batch or (2048 if cuda else 512)
    if args.quick:
        args.rounds = min(args.rounds, 3)
    tag = args.name or (("cuda" if cuda else "cpu") + (f"-{args.threads}threads" if args.threads else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    info = machine_info(args.device)
    cmd = " ".join(["python bench/report.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"## din_fused benchmark report ({tag})", "", f"Command: `{cmd}`", ""]
    for k, v in info.items():
        lines.append(f"- {k}: {v}")
    lines.append("")
    data = {"machine": {k: str(v) for k, v in info.items()}, "device": args.device}

    top = len(lines)  # issue 12's targets go first, once everything they read has run
    with BackgroundLoad() as load:
        headline_section(args, lines, data)
        if not args.skip_extra and not args.quick:
            extra_section(args, lines, data)
        steps = {} if (cuda or args.skip_step) else step_section(args, lines, data)
        if not cuda:
            lines[top:top] = targets_section(args, data, steps)
        sweep_rows, lin_rows = [], []
        if not args.skip_sweep:
            sweep_rows = t_sweep_section(args, lines, data)
            lin_rows = linearity_section(args, lines, data)
            png = out / f"perf_{tag}.png"
            plot(args, sweep_rows, lin_rows, png)
            lines += [f"![speed-up vs T and time vs sum(L)]({png.name})", ""]
        if not (cuda or args.skip_layouts):
            layouts_section(args, lines)
    data["background_load"] = load.fraction
    lines.append(f"Session took {time.time() - t_start:.0f} s. Whole session: " + load_note(load))
    md = "\n".join(lines) + "\n"
    (out / f"report_{tag}.md").write_text(md)
    (out / f"report_{tag}.json").write_text(json.dumps(data, indent=1, default=str))
    print(md)
    png_note = f" and {out / f'perf_{tag}.png'}" if sweep_rows else ""
    print(f"[report] wrote {out / f'report_{tag}.md'}{png_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
