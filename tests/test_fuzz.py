"""Property fuzzing: the fused op against din_fused.reference (issue 14).

hypothesis draws the problem (sizes, layers, activation, Dice train/eval,
normalisation and scale, lengths/mask/both, return_scores, the CPU ISA path or
the emulated CUDA kernels, the dtype) and a seed for the values; keys at
invalid positions are NaN, so any leak of padding shows.  Checked: the output,
the scores and every gradient (query, keys, every parameter) and the Dice
running statistics.
  float64: max relative error <= 1e-9 (tests/common.max_rel_err).
  float32: norm-relative error <= 1e-4, or within 4x the reference's own fp32
           error where that is larger (tensors that are analytically ~0, such as
           the output bias gradient under softmax, are pure rounding noise).
  float16/bfloat16 (emulated CUDA kernels): against the float64 answer for the
           rounded inputs, within 3x the reference's own error in that precision
           plus a floor (the rule of tests/kernel_cases.py, on norms).

Profiles: CI runs a fixed-seed (derandomised) profile of 2,000 examples.  Fixed
seed is not fixed examples: hypothesis also draws literals from the local
(non-site-packages) modules loaded at the time, and the CPU ISA list depends on
the machine, so a full run from an installed package, this file alone, and an
in-tree build each draw their own examples;
`pytest tests/test_fuzz.py --fuzz-full` (or DIN_FUZZ_FULL=1) runs 10x as many
with a random seed.  Sizes: B 0..64, T 0..300, D 1..130, 1..4 hidden layers of
widths 1..256 for the CPU kernels, capped by a work budget per example (big D
and widths come with few keys); the emulated CUDA kernels (one CPU thread per
CUDA thread) get smaller problems.

Left out of the domain while other changes fix them (issue 14); re-enable with
DIN_FUZZ_ENABLE=<comma list>:
  dice_few  float32 Dice training on fewer than 4 valid keys (found by this fuzz: the
            generic-ISA CPU path's dq can be off by more than the bound, see the xfail test at the end).
  lowp_sharp  fp16/bf16 with softmax scale > 4 (found by this fuzz: BF16_SHARP_SOFTMAX_RELU).
  lowp_narrow fp16/bf16 ReLU/PReLU with a hidden layer narrower than 4 (found by the full
            run: FP16_WIDTH1_RELU_KINK).
Not reachable from this domain anyway: NaN/Inf inputs (ReLU NaN), T > 300
(long-T fp32 accuracy), |mean|/std >> 1 in Dice layers (float64 variance
cancellation).
"""

from __future__ import annotations

import os

import pytest
import torch
from common import clone_params, max_rel_err, param_tensors, random_params, rounded_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import din_fused
from din_fused.reference import din_attention_ref, valid_positions

FULL = os.environ.get("DIN_FUZZ_FULL", "0") not in ("", "0")
ENABLED = set(filter(None, os.environ.get("DIN_FUZZ_ENABLE", "").split(",")))
T_MIN = 0  # T = 0 (keys [B, 0, D]) crashed in the op before issue 14; it is in the domain since

# Examples per test in the CI profile; --fuzz-full multiplies by 10.
CI_EXAMPLES = {"cpu64": 1090, "cpu32": 750, "emu": 100, "emu_lowp": 60}


def _settings(name):
    # DIN_FUZZ_SCALE scales the CI profile (tests/sanitize.sh runs a slice of it)
    scale = 10.0 if FULL else float(os.environ.get("DIN_FUZZ_SCALE", "1"))
    n = max(1, round(CI_EXAMPLES[name] * scale))
    return settings(max_examples=n, deadline=None, derandomize=not FULL, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def _cpu_isas():
    """The CPU kernel's ISA paths this machine can run (DIN_FUSED_CPU_ISA values)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        pass
    fl = set(flags.split())
    isas = ["generic"]
    if {"avx2", "fma"} <= fl:
        isas.append("avx2")
    if {"avx512f", "avx512dq", "avx512vl", "avx512bw"} <= fl:
        isas.append("avx512")
    return isas


CPU_ISAS = _cpu_isas()


def test_every_cpu_isa_path_is_fuzzed():
    """The fuzz draws from the ISA paths this CPU has; say so when one is missing."""
    if "avx512" not in CPU_ISAS:
        pytest.skip("this CPU has no AVX-512: the AVX-512 kernel path is not fuzzed here")
    assert CPU_ISAS == ["generic", "avx2", "avx512"]


# --------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------
# Work budget per example: multiply-adds of one forward over the keys, and (the
# emulation's cost is its barriers, ~ rows x tiles) B * T for the emulated kernels.
BUDGET = {"cpu": 3e6, "emu": 3e5}
MAX_KEYS = {"cpu": 64 * 300, "emu": 64}
LIMITS = {  # (B, T, D, width) upper bounds: "small" draws most of the time, "full" sometimes
    "cpu": {"small": (8, 24, 24, 32), "full": (64, 300, 130, 256)},
    "emu": {"small": (3, 12, 8, 16), "full": (6, 70, 130, 256)},
}


@st.composite
def problems(draw, backend, dtypes):
    size = draw(st.sampled_from(["small", "small", "full"]))
    Bm, Tm, Dm, Hm = LIMITS[backend][size]
    L = draw(st.integers(1, 4))
    hidden = [draw(st.integers(1, Hm)) for _ in range(L)]
    D = draw(st.integers(1, Dm))
    B = draw(st.integers(0, Bm))
    T = draw(st.integers(T_MIN, Tm))
    per_key = 4 * D * hidden[0] + sum(a * b for a, b in zip(hidden, hidden[1:])) + hidden[-1]
    max_keys = max(1, min(MAX_KEYS[backend], int(BUDGET[backend] // per_key)))
    if B * T > max_keys:  # keep the drawn D and widths, shrink the keys
        T = max(T_MIN, min(T, max_keys // max(B, 1)))
        B = min(B, max(1, max_keys // max(T, 1)))
    act = draw(st.sampled_from(["sigmoid", "relu", "prelu", "dice"]))
    if set(dtypes) & {torch.float16, torch.bfloat16} and act in ("relu", "prelu") \
            and "lowp_narrow" not in ENABLED:
        hidden = [max(h, 4) for h in hidden]  # see FP16_WIDTH1_RELU_KINK below
    return {
        "B": B, "T": T, "D": D, "hidden": tuple(hidden), "act": act,
        "training": act == "dice" and draw(st.booleans()),
        "norm": draw(st.sampled_from(["none", "softmax"])),
        # fp16/bf16: scale <= 4, see BF16_SHARP_SOFTMAX_RELU below
        "scale": draw(st.sampled_from([1.0, 0.5, 50.0]) | st.floats(0.01, 50.0))
        if not set(dtypes) & {torch.float16, torch.bfloat16} or "lowp_sharp" in ENABLED
        else draw(st.sampled_from([1.0, 0.5, 4.0]) | st.floats(0.01, 4.0)),
        "validity": draw(st.sampled_from(["lengths", "mask", "both"])),
        "density": draw(st.sampled_from([0.0, 0.3, 0.8, 1.0])),
        "return_scores": draw(st.booleans()),
        "isa": draw(st.sampled_from(CPU_ISAS)) if backend == "cpu" else None,
        # kernel threads (the op uses torch.get_num_threads()); mostly 1, which keeps an
        # example cheap on a busy machine, sometimes 2 (per-thread partial sums)
        "threads": draw(st.sampled_from([1, 1, 1, 2])) if backend == "cpu" else 1,
        "dtype": draw(st.sampled_from(dtypes)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def make_inputs(c):
    """float64 tensors of one drawn problem; keys at invalid positions are NaN."""
    gen = torch.Generator().manual_seed(c["seed"])
    B, T, D = c["B"], c["T"], c["D"]
    q = torch.randn(B, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    lengths = mask = None
    valid = torch.ones(B, T, dtype=torch.bool)
    if c["validity"] in ("lengths", "both"):
        lengths = torch.randint(0, T + 1, (B,), generator=gen)
        if c["density"] == 1.0:
            lengths.fill_(T)
        valid &= torch.arange(T)[None] < lengths[:, None]
    if c["validity"] in ("mask", "both"):
        mask = torch.rand(B, T, generator=gen) < c["density"]
        valid &= mask
    # batch statistics need two valid keys; float32 on fewer than 4 is a known
    # accuracy failure (test_fuzz_found_fp32_dice_training_on_two_valid_keys)
    few = 4 if c["dtype"] == torch.float32 and "dice_few" not in ENABLED else 2
    training = c["training"] and int(valid.sum()) >= few
    k[~valid] = float("nan")
    p = random_params(D, c["hidden"], c["act"], gen=gen, requires_grad=False)
    gout = torch.randn(B, D, generator=gen, dtype=torch.float64)
    gsc = torch.randn(B, T, generator=gen, dtype=torch.float64)
    return q, k, lengths, mask, p, gout, gsc, training


def run(fn, c, q, k, lengths, mask, p, gout, gsc, training, dtype):
    """Forward + backward in dtype: [out, (scores), dq, dk, dparams..., running stats...]."""
    p = clone_params(p, dtype)
    qq = q.to(dtype).requires_grad_()
    kk = k.to(dtype).requires_grad_()
    res = fn(qq, kk, lengths, mask, **p, training=training, normalization=c["norm"], scale=c["scale"],
             return_scores=c["return_scores"])
    out, w = res if c["return_scores"] else (res, None)
    loss = (out.double() * gout).sum()
    if w is not None:
        loss = loss + (w.double() * gsc).sum()
    inputs = [qq, kk, *param_tensors(p)]
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, inputs)
    else:  # B = 0 (or nothing valid and no parameter on the graph)
        grads = [torch.zeros_like(t) for t in inputs]
    running = p.get("running_means", []) + p.get("running_vars", []) if training else []
    return [out] + ([w] if w is not None else []) + list(grads) + running


def _names(c, n):
    head = ["out"] + (["scores"] if c["return_scores"] else []) + ["dq", "dk"]
    return head + [f"t{i}" for i in range(n - len(head))]


def norm_errs(got, want, base):
    """(||got - want||, ||base - want||, ||want||, sqrt(numel)) in float64."""
    g, w, r = got.double(), want.double(), base.double()
    return (g - w).norm().item(), (r - w).norm().item(), w.norm().item(), w.numel() ** 0.5


FUZZ_LOG = os.environ.get("DIN_FUZZ_LOG")  # append one line per example (counts of long runs)


def fp32_bounds(want, norm, scale, scale_terms=True):
    """The float32 rule for one example whose float64 answers are want: bound(ref_err, size,
    root_n) -> the largest admissible ||fused - want|| of a tensor (norm_errs' terms).

    Norm-relative 1e-4, or within 4x the reference's own fp32 error.  Tensors that are
    analytically ~0 (the output bias gradient under softmax) hold rounding noise of terms
    as large as the other gradients: their floor is 1e-5 of the largest tensor of the
    example (the full run found 1.6e-6 of it with softmax scale 32 over 512 keys).  Under
    softmax every logit's rounding is multiplied by the scale before the exp (the problem's
    condition grows with it), so above scale 10 the floor and the norm-relative bound grow
    with it too (scale_terms).  This loosens the rule, at most 5x at scale 50, after
    sharp-softmax cases failed it: SHARP_SOFTMAX_DICE at 1.1x (AVX2 and baseline paths) and
    SHARP_SOFTMAX_PRELU at 1.004x.  What it measures is the problem, not the kernel
    (`python bench/softmax_accuracy.py`: 3,000 problems at scales 20-50, three ISA paths):
    the reference itself, run on the problem with D and the hidden units permuted (the same
    math, another rounding order), fails the rule without these terms on 21 of them and
    with them on 5; the fused op, since its softmax backward forms its row term in double
    (din_cpu.cpp, WSum), on 4 and none, its median error 0.77-0.80x the reference's own
    (the permuted reference's: 1.11-1.20x)."""
    sharp = max(1.0, scale / 10) if norm == "softmax" and scale_terms else 1.0
    noise = 1e-5 * sharp * max(w.double().norm().item() for w in want)
    return lambda ref_err, size, root_n: max(1e-4 * sharp * size, 4 * ref_err, 1e-6 * root_n, noise)


def _fp32_failure(c, names, got, want, ref_errs):
    """None when every tensor is within the float32 rule of want, else (name, err, ref_err,
    size, limit) of the first that is not; ref_errs: the reference's own fp32 errors."""
    bound = fp32_bounds(want, c["norm"], c["scale"])
    for name, g, w, ref_err in zip(names, got, want, ref_errs):
        err, _, size, root_n = norm_errs(g, w, w)
        limit = bound(ref_err, size, root_n)
        if not err <= limit:
            return name, err, ref_err, size, limit
    return None


# A pre-activation is at a kink when |z| is below this fraction of the rounding scale of its
# sum, sum |w x| + |b|: ~170 fp32 unit roundoffs of it, above the typical rounding of these sums
# (a missed kink shows as a failure, never as a hidden one).
KINK_REL = 1e-5


def kinks(c, q, k, lengths, mask, p, most=4):
    """Up to `most` (layer, unit, z) of the float64 forward at valid keys, nearest first, whose
    ReLU/PReLU pre-activation z is within KINK_REL of 0 relative to its rounding scale."""
    if c["act"] not in ("relu", "prelu"):
        return []
    B, T, D = k.shape
    valid = valid_positions(T, lengths, mask, batch=B)
    qv = q[:, None, :].expand(B, T, D)[valid]
    kv = k[valid]
    x = torch.cat([qv, kv, qv - kv, qv * kv], dim=1)
    found = []
    for layer, (w, b) in enumerate(zip(p["weights"][:-1], p["biases"][:-1])):
        w, b = w.double(), b.double()
        z = x @ w.T + b
        rel = z.abs() / (x.abs() @ w.abs().T + b.abs()).clamp_min(1e-300)
        for i, j in (rel < KINK_REL).nonzero().tolist():
            found.append((rel[i, j].item(), layer, j, z[i, j].item()))
        alpha = p["alphas"][layer].double().reshape(-1) if c["act"] == "prelu" else torch.zeros(())
        x = torch.where(z > 0, z, alpha * z)
    return [(layer, unit, z) for _, layer, unit, z in sorted(found)[:most]]


def check(c, fused_fn):
    """Fused vs reference for one drawn problem; AssertionError names the tensor.  Returns
    None, or the (layer, unit) of the ReLU/PReLU kink (see kinks) whose other side the
    fused op was on."""
    threads = torch.get_num_threads()
    torch.set_num_threads(c["threads"])
    try:
        flipped = _check(c, fused_fn)
    finally:
        torch.set_num_threads(threads)
    if FUZZ_LOG:
        with open(FUZZ_LOG, "a") as f:
            f.write(f"{c['dtype']} {c['isa']} B={c['B']} T={c['T']} D={c['D']} H={c['hidden']} {c['act']}"
                    f"{' kink ' + str(flipped) if flipped else ''}\n")
    return flipped


def _check(c, fused_fn):
    q, k, lengths, mask, p, gout, gsc, training = make_inputs(c)
    dtype = c["dtype"]
    got = run(fused_fn, c, q, k, lengths, mask, p, gout, gsc, training, dtype)
    names = _names(c, len(got))
    if dtype == torch.float64:
        want = run(din_attention_ref, c, q, k, lengths, mask, p, gout, gsc, training, torch.float64)
        for name, g, w in zip(names, got, want):
            err = max_rel_err(g, w)
            assert err <= 1e-9, (name, err)
        return
    if dtype == torch.float32:
        want = run(din_attention_ref, c, q, k, lengths, mask, p, gout, gsc, training, torch.float64)
        base = run(din_attention_ref, c, q, k, lengths, mask, p, gout, gsc, training, torch.float32)
        ref_errs = [norm_errs(w, w, r)[1] for w, r in zip(want, base)]
        failure = _fp32_failure(c, names, got, want, ref_errs)
        if failure is None:
            return None
        # A ReLU/PReLU pre-activation that fp32 rounding can put on either side of 0: the
        # derivative jumps there, so which side a computation lands on decides a whole term of
        # the gradients.  Then the fused op must be within the rule of the float64 answer on
        # one side or the other (the other: that unit's bias moved by -2z, which flips z and
        # moves the unit's other pre-activations by 2|z|, far below their own size).
        for layer, unit, z in kinks(c, q, k, lengths, mask, p):
            flipped = clone_params(p, torch.float64, requires_grad=False)
            flipped["biases"][layer][unit] -= 2 * z
            other = run(din_attention_ref, c, q, k, lengths, mask, flipped, gout, gsc, training,
                        torch.float64)
            if _fp32_failure(c, names, got, other, ref_errs) is None:
                return layer, unit
        raise AssertionError(failure)
    # fp16/bf16: the exact answer for the rounded inputs, and the reference's own error
    pr = rounded_params(p, dtype)
    rq, rk, rg, rs = (t.to(dtype).double() for t in (q, k, gout, gsc))
    want = run(din_attention_ref, c, rq, rk, lengths, mask, pr, rg, rs, training, torch.float64)
    base = run(din_attention_ref, c, q, k, lengths, mask, p, gout, gsc, training, dtype)
    floor = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for name, g, w, r in zip(names, got, want, base):
        err, ref_err, size, root_n = norm_errs(g, w, r)
        assert err <= 3 * ref_err + floor * max(size, root_n), (name, err, ref_err, size)


def _cpu_case(c, monkeypatch):
    monkeypatch.setenv("DIN_FUSED_CPU_ISA", c["isa"])
    check(c, din_fused.din_attention)


# --------------------------------------------------------------------------------------
# The fuzz tests
# --------------------------------------------------------------------------------------
@pytest.mark.slow
@_settings("cpu64")
@given(c=problems("cpu", [torch.float64]))
def test_fuzz_cpu_float64(c):
    with pytest.MonkeyPatch.context() as mp:
        _cpu_case(c, mp)


@pytest.mark.slow
@_settings("cpu32")
@given(c=problems("cpu", [torch.float32]))
def test_fuzz_cpu_float32(c):
    with pytest.MonkeyPatch.context() as mp:
        _cpu_case(c, mp)


@pytest.fixture(scope="module")
def emu_install(emu_c):
    """Installs the emulated CUDA kernels for one example at a time (the CPU fuzz
    tests in this module must see the real CPU kernels)."""
    emu, mod = emu_c

    def case(c):
        undo = emu.install(mod)
        try:
            check(c, din_fused.din_attention)
        finally:
            undo()

    return case


@pytest.mark.slow
@_settings("emu")
@given(c=problems("emu", [torch.float64, torch.float32]))
def test_fuzz_emulated_cuda(emu_install, c):
    emu_install(c)


@pytest.mark.slow
@_settings("emu_lowp")
@given(c=problems("emu", [torch.float16, torch.bfloat16]))
def test_fuzz_emulated_cuda_low_precision(emu_install, c):
    emu_install(c)


# --------------------------------------------------------------------------------------
# Failures the fuzz found, kept as named regression tests
# --------------------------------------------------------------------------------------
FP32_DICE_TRAIN_FEW_KEYS = {
    "B": 3, "T": 3, "D": 3, "hidden": (235,), "act": "dice", "training": True, "norm": "none", "scale": 1.0,
    "validity": "both", "density": 0.3, "return_scores": False, "isa": "generic", "threads": 1,
    "dtype": torch.float32, "seed": 3,
}


# Found by the full fuzz run (issue 14): float32 Dice training on 2 valid keys, whose batch
# statistics are ill-conditioned.  On the generic (SSE2) CPU path dq was 8.5x the reference's
# own fp32 error, and still ~1.4x over the rule of the time after the statistics were merged
# with Chan's formula; it was a non-strict xfail, which has passed (XPASS) in every run since.
# On every ISA path of an AVX-512 Xeon each tensor is now within 0.35-1.13x the reference's own
# fp32 error, 0.002 of the rule's bound, so it is a plain test on every path.
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_fuzz_found_fp32_dice_training_on_two_valid_keys(isa, monkeypatch):
    _cpu_case({**FP32_DICE_TRAIN_FEW_KEYS, "isa": isa}, monkeypatch)


# Found by the CI profile (emulated CUDA kernels, bf16): dk 54% norm-relative off
# against 11% for the reference's own bf16 run.  A width-1 ReLU layer and a
# softmax at scale 50: bf16 rounding decides which keys pass the kink and the
# sharp softmax turns each flip into a large change, so the fused and the
# reference bf16 runs differ from float64 in different, large ways.  Not yet
# known whether the kernels or the error rule is at fault; the low-precision
# domain keeps scale <= 4 until that is settled (DIN_FUZZ_ENABLE=lowp_sharp).
BF16_SHARP_SOFTMAX_RELU = {
    "B": 4, "T": 16, "D": 102, "hidden": (1, 207), "act": "relu", "training": False, "norm": "softmax",
    "scale": 50.0, "validity": "mask", "density": 0.3, "return_scores": False, "isa": None, "threads": 1,
    "dtype": torch.bfloat16, "seed": 1,
}


# Found by the full run (emulated CUDA kernels, fp16): the bias gradient of a width-1 ReLU
# layer 12x the reference's own fp16 error.  One unit decides alone whether a key passes
# the kink: a pre-activation within fp16 rounding of 0 flips in one computation and not in
# the other, and a flip adds or drops a whole term of the sum.  The function is not
# continuous there, so no error rule relative to the reference's own rounding can hold; the
# low-precision domain keeps ReLU/PReLU layers at width >= 4 (DIN_FUZZ_ENABLE=lowp_narrow),
# where one flip is diluted by the other units.
FP16_WIDTH1_RELU_KINK = {
    "B": 3, "T": 13, "D": 49, "hidden": (1, 1, 146), "act": "relu", "training": False, "norm": "none",
    "scale": 1.0, "validity": "lengths", "density": 0.0, "return_scores": False, "isa": None, "threads": 1,
    "dtype": torch.float16, "seed": 218,
}


@pytest.mark.xfail(strict=False, reason="issue 14, full fuzz run: fp16 width-1 ReLU kink flips (see above)")
def test_fuzz_found_fp16_width1_relu_kink(emu_install):
    emu_install(FP16_WIDTH1_RELU_KINK)


# Found by the full run (CPU, generic ISA, fp32): the output layer's weight gradient 4.2x
# the reference's own fp32 error, against the rule's 4x.  Softmax at scale 50 over a
# single feature (D=1) multiplies every logit's rounding by 50 before the exp; the fused
# fold and the reference's concatenated Linear round the logits differently, and the
# ratio of two such errors has no hard bound.  The domain keeps scale 50 for fp32
# (the issue asks for it).  This example was an xfail at the edge of the 4x rule on the AVX2
# machine where it was found; on the AVX-512 machine it passes under the old rule too (0.76 of
# the bound; 0.25 of the scale-grown one, see fp32_bounds), so it is a plain test now.
FP32_SHARP_SOFTMAX_D1 = {
    "B": 45, "T": 58, "D": 1, "hidden": (227,), "act": "prelu", "training": False, "norm": "softmax",
    "scale": 50.0, "validity": "lengths", "density": 0.0, "return_scores": True, "isa": "generic",
    "threads": 1, "dtype": torch.float32, "seed": 191,
}


def test_fuzz_found_fp32_sharp_softmax_d1(monkeypatch):
    _cpu_case(FP32_SHARP_SOFTMAX_D1, monkeypatch)


# Found by the CI profile on an AVX-512 machine: a Dice MLP (eval) under softmax at scale 28
# over D=1, the AVX2 path's third weight gradient 4.4x the reference's own fp32 error, 1.10x
# over the rule before the floor grew with the scale; hypothesis shrank it to the baseline
# path's dWout at scale 26.5, 7.3x (1.16x over).  Both, on every ISA path this CPU has.
SHARP_SOFTMAX_DICE = [{
    "B": 5, "T": 12, "D": 1, "hidden": hidden, "act": "dice", "training": False, "norm": "softmax",
    "scale": scale, "validity": "mask", "density": 0.3, "return_scores": False, "isa": None,
    "threads": 1, "dtype": torch.float32, "seed": 16655464,
} for hidden, scale in (((12, 3, 12), 28.096005791910166), ((12, 3, 4), 26.5))]


# Found by the full run on the same machine: the first layer's weight gradient of a 4-layer
# PReLU MLP under softmax at scale 50, on the baseline path, 4.0x the reference's own fp32
# error (1.5e-4 norm-relative), 1.004x over the rule before its norm-relative bound grew with
# the scale.
SHARP_SOFTMAX_PRELU = {
    "B": 7, "T": 23, "D": 13, "hidden": (16, 3, 6, 8), "act": "prelu", "training": False,
    "norm": "softmax", "scale": 50.0, "validity": "mask", "density": 0.8, "return_scores": False,
    "isa": "generic", "threads": 1, "dtype": torch.float32, "seed": 2277497,
}


def test_fuzz_found_fp32_sharp_softmax_prelu(monkeypatch):
    _cpu_case(SHARP_SOFTMAX_PRELU, monkeypatch)


# Found by a full run (random seed) on the AVX-512 machine: dq of a ReLU MLP (250 units, then
# 1) under softmax at scale 14 over D=1, 7.5x the reference's own fp32 error (3.9e-4
# norm-relative), 1.8x over the rule, the same on every ISA path.  It is one row whose weight
# 0.9984 dominates.  First blamed on the layer-2 GEMM's serial sum over 250 terms, it was an
# xfail; summing K in chunks (Gemm::run) did not move it.  The cause was the softmax
# backward's row term sum_u w_u dL/dw_u, formed in fp32, cancelling against dL/dw_t; formed
# in double and normalised by the weights' sum it passes on every ISA path
# (test_fp32_softmax_gradients_with_a_dominant_weight in test_cpu_kernel.py isolates it).
FP32_RELU_WIDTH1_D1 = {
    "B": 48, "T": 49, "D": 1, "hidden": (250, 1), "act": "relu", "training": False, "norm": "softmax",
    "scale": 14.0, "validity": "lengths", "density": 0.0, "return_scores": False, "isa": "generic",
    "threads": 1, "dtype": torch.float32, "seed": 256,
}


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_fuzz_found_fp32_relu_width1_d1(isa, monkeypatch):
    _cpu_case({**FP32_RELU_WIDTH1_D1, "isa": isa}, monkeypatch)


# ReLU/PReLU kinks found by full CPU float32 runs (random seeds), the same on every ISA path and
# in the builds before: a pre-activation below the fp32 rounding of its sum, so rounding decides
# its sign, and the fused op lands on the other side than float64 (the reference's fp32 run
# happens to agree with float64).  _check then holds the fused op to float64 on the other side
# (kinks).  These cases assert the diagnosis (that kink, and no other, near 0) and that the
# check passes: check() returns the flipped unit, or None where an ISA path lands on float64's side.
#   session 13: dq of one row 0.166 off (1e-3 norm-relative, 10x over the rule); at the row's
#     only valid key, layer 1's unit 17 is 2.2e-7 (the sum has 4D = 184 terms).
#   session 14: dq 0.56 off (1.4e-3 norm-relative, 14x); layer 2's unit 5 at row 3, key 3 is
#     2.1e-7, 1.8e-8 of its rounding scale (the next nearest: 5.6e-5 of its scale).
FP32_KINKS = [
    ({"B": 46, "T": 8, "D": 46, "hidden": (43,), "act": "relu", "training": False, "norm": "none",
      "scale": 1.0, "validity": "mask", "density": 0.3, "return_scores": False, "isa": None,
      "threads": 1, "dtype": torch.float32, "seed": 43}, (0, 17)),
    ({"B": 9, "T": 10, "D": 10, "hidden": (61, 10, 10, 229), "act": "prelu", "training": False,
      "norm": "none", "scale": 1.0, "validity": "both", "density": 1.0, "return_scores": False,
      "isa": None, "threads": 1, "dtype": torch.float32, "seed": 4015583}, (1, 5)),
]


@pytest.mark.parametrize("case", range(len(FP32_KINKS)))
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_fuzz_found_fp32_kink_lands_on_either_side(case, isa, monkeypatch):
    c, unit = FP32_KINKS[case]
    c = {**c, "isa": isa}
    q, k, lengths, mask, p = make_inputs(c)[:5]
    assert [u[:2] for u in kinks(c, q, k, lengths, mask, p)] == [unit]
    monkeypatch.setenv("DIN_FUSED_CPU_ISA", isa)
    assert check(c, din_fused.din_attention) in (None, unit)


def test_fuzz_kink_rule_still_catches_a_wrong_gradient(monkeypatch):
    """The kink rule only admits the float64 answer on the kink's other side: a fused dq that
    is off by as much as a flip, in another direction, still fails."""
    c, _ = FP32_KINKS[1]
    c = {**c, "isa": CPU_ISAS[0]}
    assert kinks(c, *make_inputs(c)[:5])  # so the check does try the flip
    monkeypatch.setenv("DIN_FUSED_CPU_ISA", c["isa"])

    def skewed(q, k, *args, **kwargs):
        x = 1.4e-3 * q.roll(1, -1)  # the forward sees q exactly; dq gains 1.4e-3 of itself, rolled
        return din_fused.din_attention(q + (x - x.detach()), k, *args, **kwargs)

    with pytest.raises(AssertionError, match="dq"):
        check(c, skewed)


@pytest.mark.parametrize("case", range(len(SHARP_SOFTMAX_DICE)))
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_fuzz_found_fp32_sharp_softmax_dice(case, isa, monkeypatch):
    _cpu_case({**SHARP_SOFTMAX_DICE[case], "isa": isa}, monkeypatch)
