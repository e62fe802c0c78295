"""CPU kernel specifics: long rows split over threads, NaN/Inf propagation, fp32
accuracy at large T, cancellation-free Dice statistics, and the thread pool
(concurrent callers, fork)."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from common import TOL64, max_rel_err, random_params
from common import num_threads as _threads
from kernel_cases import DOMINANT_SOFTMAX_CASES, check_dominant_softmax
from test_op import run, run_forward

import din_fused
from din_fused import ops
from din_fused.reference import din_attention_ref


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


_AVX512 = {"avx512f", "avx512dq", "avx512vl", "avx512bw"}
_AVX2 = {"avx2", "fma"}


@pytest.fixture(params=["avx512", "avx2", "generic"])
def isa(request, monkeypatch):
    """Each CPU ISA path of the kernel.  DIN_FUSED_CPU_ISA can only lower the ISA,
    so a path the CPU lacks is skipped, with the reason, rather than run as another."""
    flags = _cpu_flags()
    if request.param == "avx512":
        if not _AVX512 <= flags:
            pytest.skip("this CPU has no AVX-512 (F/DQ/VL/BW): the AVX-512 path cannot run here")
        monkeypatch.delenv("DIN_FUSED_CPU_ISA", raising=False)
    else:
        if request.param == "avx2" and not _AVX2 <= flags:
            pytest.skip("this CPU has no AVX2+FMA: the AVX2 path cannot run here")
        monkeypatch.setenv("DIN_FUSED_CPU_ISA", request.param)
    return request.param


def _long_problem(B, T, act, validity, seed, D=5, hidden=(6, 3)):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    lengths = None
    if validity in ("lengths", "both"):
        lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
        lengths[0] = T
    mask = (torch.rand(B, T, generator=gen) < 0.7) if validity in ("mask", "both") else None
    p = random_params(D, hidden, act.split("-")[0], gen=gen)
    gout = torch.randn(B, D, generator=gen, dtype=torch.float64)
    gsc = torch.randn(B, T, generator=gen, dtype=torch.float64)
    return q, k, lengths, mask, p, gout, gsc


def _all(res):
    out, w, grads, running = res
    return [out, w, *grads, *running]


# ---------------------------------------------------------------------------------------
# Long rows: fewer rows than threads, positions split over threads (issue 9)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ["sigmoid", "relu", "prelu", "dice-train"])
def test_split_rows_match_reference(act, norm, B, threads, isa):
    T = 1500  # > 2 * 256 positions per part: every row is cut into `threads` parts
    validity = "both" if B == 2 else "lengths"
    q, k, lengths, mask, p, gout, gsc = _long_problem(B, T, act, validity, seed=B * 10 + threads)
    training = act == "dice-train"
    args = (q, k, lengths, mask, p, torch.float64, training, norm, True, gout, gsc)
    with _threads(threads):
        got = _all(run(din_fused.din_attention, *args))
    want = _all(run(din_attention_ref, *args))
    for i, (g, w) in enumerate(zip(got, want)):
        assert max_rel_err(g, w) <= TOL64, (i, max_rel_err(g, w))


@pytest.mark.parametrize("act", ["sigmoid", "dice-train"])
def test_split_rows_bitwise_reproducible_and_close_across_thread_counts(act):
    q, k, lengths, mask, p, gout, gsc = _long_problem(1, 4000, act, "lengths", seed=3)
    q32, k32 = q.float(), k.float()
    args = (q32, k32, lengths, mask, p, torch.float32, act == "dice-train", "softmax", True, gout, gsc)
    with _threads(2):
        runs = [_all(run(din_fused.din_attention, *args)) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    args64 = (q, k, lengths, mask, p, torch.float64, act == "dice-train", "softmax", True, gout, gsc)
    per_threads = []
    for n in (1, 2, 4):
        with _threads(n):
            per_threads.append(_all(run(din_fused.din_attention, *args64)))
    for other in per_threads[1:]:
        for a, b in zip(per_threads[0], other):
            assert max_rel_err(a, b) <= TOL64


def _row_parts(lengths, threads, row_seq=None):
    """The CPU kernels' cut (_C.row_parts) of jagged sequences of these lengths, or of padded
    rows when row_seq is "padded": [(row, t0, t1)], empty when rows are not cut."""
    D, p = 4, random_params(4, (6,), "sigmoid", dtype=torch.float32, requires_grad=False)
    args = (p["weights"], p["biases"], [], [], [], "sigmoid", "none", 1.0)
    if row_seq == "padded":
        T = max(lengths)
        prep = ops._Prepared(torch.zeros(len(lengths), D), torch.zeros(len(lengths), T, D),
                             torch.tensor(lengths), None, *args)
    else:
        offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        rs = None if row_seq is None else torch.tensor(row_seq)
        prep = ops._jagged_prepared(torch.zeros(len(row_seq or lengths), D), torch.zeros(int(offsets[-1]), D),
                                    offsets, rs, *args, False, gather=False)
    prep.cfg["num_threads"] = threads
    return ops._C.row_parts(prep.cfg)


def test_rows_are_cut_over_positions_when_fewer_than_four_a_thread():
    """The cut itself, padded, jagged and shared (the tests above check its results, which
    would also hold if no row were cut): parts of whole 32-key tiles, in order, covering each
    long row, at most one per thread; rows under 2 x 256 positions stay whole."""
    assert _row_parts([4000], 2, "padded") == [(0, 0, 2016), (0, 2016, 4000)]
    assert _row_parts([4000], 1, "padded") == [(0, 0, 4000)]  # one part: the single thread
    assert _row_parts([1500, 0, 700], 2, [0, 2, 0]) == [
        (0, 0, 768), (0, 768, 1500), (1, 0, 352), (1, 352, 700), (2, 0, 768), (2, 768, 1500)]
    assert _row_parts([100, 4000], 3) == [(0, 0, 100), (1, 0, 1344), (1, 1344, 2688), (1, 2688, 4000)]
    assert _row_parts([4000] * 8, 2, "padded") == []  # 4 rows a thread: rows run whole
    for lengths, threads in (([4000], 2), ([1500, 700, 9000], 2), ([600, 513], 3)):
        parts = _row_parts(lengths, threads)
        for r, n in enumerate(lengths):
            mine = [(t0, t1) for row, t0, t1 in parts if row == r]
            assert mine[0][0] == 0 and mine[-1][1] == n and len(mine) <= threads
            assert all(a[1] == b[0] for a, b in zip(mine, mine[1:]))
            assert all(t0 % 32 == 0 for t0, _ in mine)


# ---------------------------------------------------------------------------------------
# The backward writes its outputs whole (DinParams::dk_assign): no zero fills first
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2])  # 6 rows on 2 threads are cut into parts (Plan); on 1 not
@pytest.mark.parametrize("act", ["prelu", "dice-train"])
@pytest.mark.parametrize("layout", ["lengths", "mask", "both", "split", "jagged"])
def test_backward_writes_every_element_of_its_outputs(layout, act, threads, isa, monkeypatch):
    """The CPU backward writes every element of dq and the parameter gradients, and, when the
    rows cover the key gradient (padded, or jagged with one sequence per row), all of dk, zeros
    at padding and masked positions, into uninitialised tensors.  Poison every tensor the op
    allocates uninitialised: every element must still be the reference's (zeros past each
    row's length, at masked positions, for empty rows and past a split row's end)."""
    from din_fused import ops

    poisoned = []
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(out):
        out.fill_(float("nan") if out.is_floating_point() else 123)
        poisoned.append(out)
        return out

    monkeypatch.setattr(ops.torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(ops.torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
    if layout == "split":  # one long row cut over threads; its last part writes the padding
        q, k, lengths, mask, p, gout, gsc = _long_problem(1, 1300, act, "lengths", seed=4)
        lengths[0] = 1100
    else:
        validity = "lengths" if layout == "jagged" else layout
        q, k, lengths, mask, p, gout, gsc = _long_problem(6, 9, act, validity, seed=5)
        if lengths is not None:
            lengths[1], lengths[2] = 0, 1
        if mask is not None:
            mask[3] = False
    p = {key: [t.detach() for t in v] if isinstance(v, list) else v for key, v in p.items()}
    training = act == "dice-train"
    with _threads(threads):
        args = (q, k, lengths, mask, p, torch.float64, training, "softmax", True, gout, gsc)
        if layout == "jagged":
            values = torch.cat([k[b, :int(n)] for b, n in enumerate(lengths)])
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            vv = values.clone().requires_grad_()

            def leaves():  # fresh parameter leaves (the running statistics stay shared buffers)
                return {key: v if "running" in key or not isinstance(v, list)
                        else [t.clone().requires_grad_() for t in v] for key, v in p.items()}

            def grads(out, q, keys, params):  # every input's gradient: query, keys, all parameters
                leaf = [t for key in ("weights", "biases", "alphas", "bn_weights", "bn_biases")
                        for t in params.get(key, [])]
                return list(torch.autograd.grad((out * gout).sum(), [q, keys, *leaf]))

            kw = dict(normalization="softmax", training=training)
            pg, pr = leaves(), leaves()
            qg, qr, kk = q.clone().requires_grad_(), q.clone().requires_grad_(), k.clone().requires_grad_()
            out = din_fused.din_attention_jagged(qg, vv, offsets, **pg, **kw)
            got = [out, *grads(out, qg, vv, pg)]
            ref_out = din_attention_ref(qr, kk, lengths, **pr, **kw)
            want = [ref_out, *grads(ref_out, qr, kk, pr)]
            want[2] = want[2][torch.arange(k.shape[1])[None] < lengths[:, None]]  # the valid keys, jagged
        else:
            got = _all(run(din_fused.din_attention, *args))
            want = _all(run(din_attention_ref, *args))
    assert poisoned, "the backward no longer takes an uninitialised dk: drop this test"
    for i, (g, w) in enumerate(zip(got, want)):
        assert not torch.isnan(g).any(), i
        assert max_rel_err(g, w) <= TOL64, (i, max_rel_err(g, w))


# ---------------------------------------------------------------------------------------
# Short rows share packed tiles (csrc/din_cpu.cpp, Kernel::pack_add)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ["sigmoid", "prelu", "dice"])
def test_short_rows_do_not_depend_on_the_rows_packed_with_them(act, norm, isa):
    """Rows of a few positions are gathered into shared tiles, with layer 1 unfolded.  A row's
    out, weights, dq and dk must be bitwise the same whichever rows share its tiles (the
    batch, the batch reversed on 2 threads, every third row), and match the reference in
    float64, with parameter gradients, empty and masked rows and both row-length regimes
    (packed: up to 8 positions; row by row above)."""
    gen = torch.Generator().manual_seed(11)
    B, T, D = 30, 12, 37
    q = torch.randn(B, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    lengths = torch.randint(0, 9, (B,), generator=gen)
    lengths[:3] = torch.tensor([0, T, 1])
    mask = torch.rand(B, T, generator=gen) < 0.8
    mask[4] = False
    p = random_params(D, (16, 8), act, gen=gen)
    gout = torch.randn(B, D, generator=gen, dtype=torch.float64)
    gsc = torch.randn(B, T, generator=gen, dtype=torch.float64)

    def rows(idx, dtype, threads, fn=din_fused.din_attention):
        with _threads(threads):
            out, w, grads, _ = run(fn, q[idx], k[idx], lengths[idx], mask[idx], p, dtype, False, norm, True,
                                   gout[idx], gsc[idx])
        return [out, w, grads[0], grads[1]], list(grads[2:])

    whole, _ = rows(torch.arange(B), torch.float32, 1)
    for idx, threads in ((torch.arange(B).flip(0), 2), (torch.arange(0, B, 3), 1)):
        part, _ = rows(idx, torch.float32, threads)
        for i, (a, b) in enumerate(zip(whole, part)):
            assert torch.equal(a[idx], b), i
    got, got_p = rows(torch.arange(B), torch.float64, 2)
    want, want_p = rows(torch.arange(B), torch.float64, 1, din_attention_ref)
    for i, (g, w) in enumerate(zip(got + got_p, want + want_p)):
        assert max_rel_err(g, w) <= TOL64, (i, max_rel_err(g, w))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ["sigmoid", "relu", "prelu", "dice"])
def test_packed_rows_match_reference_in_every_layout(act, dtype, threads, isa):
    """Packed tiles need at least 4 rows per thread, which the small shapes of the general
    tests do not give on every machine: padded rows (lengths, masks, both; D = 1, 3, 8, 37;
    1 to 4 layers; with and without softmax and weight gradients) and jagged rows, with and
    without sequences shared by several rows (which add into per-thread key gradients)."""
    from jagged_cases import check_jagged
    from kernel_cases import check_case

    cases = [(1, (5,), "lengths", "none", False), (3, (12, 7, 5), "both", "softmax", True),
             (37, (9, 4, 6, 3), "mask", "softmax", False), (8, (16, 8), "both", "none", True)]
    with _threads(threads):
        for i, (D, hidden, validity, norm, use_scores) in enumerate(cases):
            check_case(24, 8, D, hidden, act, norm, validity, use_scores, dtype, "cpu", seed=i)
        for layout in ("packed-jagged", "packed-shared"):
            check_jagged(layout, act, "softmax", dtype, "cpu")


def test_backward_refuses_dk_assign_for_rows_that_share_keys(monkeypatch):
    """Rows sharing a sequence add into per-thread partials, which the kernel sums into dk: it
    must hold zeros, so a call that asks it to write dk (dk_assign) with a row_seq is an error,
    never a sum into uninitialised memory."""
    from din_fused import ops

    real = ops._C

    class Force:
        def __getattr__(self, name):
            f = getattr(real, name)
            return (lambda cfg: f({**cfg, "dk_assign": 1})) if name == "backward" else f

    monkeypatch.setattr(ops, "_C", Force())
    p = random_params(5, (4,), "sigmoid", gen=torch.Generator().manual_seed(0))
    q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    values = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    out = din_fused.din_attention_jagged(q, values, torch.tensor([0, 4]), torch.tensor([0, 0, 0]), **p)
    with pytest.raises(ValueError, match="dk_assign needs rows with their own sequences"):
        out.sum().backward()


# ---------------------------------------------------------------------------------------
# Issue 14 (2): NaN and Inf in valid positions propagate as in the reference
# ---------------------------------------------------------------------------------------
def _nan_pattern_matches(got, want):
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(torch.isnan(g), torch.isnan(w)), (i, torch.isnan(g).sum(), torch.isnan(w).sum())
        assert torch.equal(torch.isinf(g), torch.isinf(w)), i


@pytest.mark.parametrize("shape", [(3, 6), (12, 4), (1, 1200)], ids=["rows", "packed-rows", "split-row"])
@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ["relu", "prelu"])
def test_nan_weight_propagates_like_reference(act, norm, shape, isa):
    # One NaN input weight of the first layer: that channel's pre-activation is NaN
    # at every position.  torch.relu keeps NaN (the kernel once mapped it to 0, so
    # the output stayed finite), and PReLU's dalpha must not drop NaN either.  With few
    # rows on 2 threads the rows are cut into parts whose softmax partials merge: an
    # all-NaN part once merged as "no valid positions" and gave 0.
    q, k, lengths, mask, p, gout, gsc = _long_problem(*shape, act, "lengths", seed=1)
    with torch.no_grad():
        p["weights"][0][1, 2] = float("nan")
    args = (q, k, lengths, mask, p, torch.float64, False, norm, True, gout, gsc)
    with _threads(2):
        got = _all(run(din_fused.din_attention, *args))
    want = _all(run(din_attention_ref, *args))
    assert torch.isnan(want[0]).any()
    _nan_pattern_matches(got, want)
    if act == "prelu":
        dalpha = got[4 + 2 * len(p["weights"])]  # out, w, dq, dk, weights, biases, alphas
        assert torch.isnan(dalpha[1])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ["sigmoid", "relu", "prelu", "dice"])
@pytest.mark.parametrize("shape", [(3, 6), (12, 4)], ids=["rows", "packed-rows"])
def test_nonfinite_key_in_valid_position_propagates_like_reference(act, norm, value, shape):
    q, k, lengths, mask, p, gout, gsc = _long_problem(*shape, act, "all", seed=2)
    k[1, 2, 0] = value  # every position is valid
    args = (q, k, None, None, p, torch.float64, False, norm, False, gout, gsc)
    with _threads(2):
        got, want = _all(run(din_fused.din_attention, *args)), _all(run(din_attention_ref, *args))
    _nan_pattern_matches(got[:2], want[:2])
    finite = torch.isfinite(want[0])
    assert max_rel_err(got[0][finite], want[0][finite]) <= TOL64


# ---------------------------------------------------------------------------------------
# Issue 14 (3): fp32 accuracy does not decay with T
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("norm", ["none", "softmax"])
def test_fp32_error_stays_near_reference_error_at_long_T(norm, threads):
    B, T, D = 1, 300_000, 4
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, D, generator=gen, dtype=torch.float64).abs()  # pooled sums that grow with T
    p = random_params(D, (4,), "sigmoid", gen=gen, requires_grad=False)
    p32 = {n: ([t.float() for t in v] if isinstance(v, list) else v) for n, v in p.items()}
    ref64, w64 = din_attention_ref(q, k, **p, normalization=norm, return_scores=True)
    ref32, w32 = din_attention_ref(q.float(), k.float(), **p32, normalization=norm, return_scores=True)
    with _threads(threads):
        out, w = din_fused.din_attention(q.float(), k.float(), **p32, normalization=norm, return_scores=True)
    # The measure: error of the weights and of the output against float64,
    # next to the float32 reference's own error (3e-4 vs 3e-6 at this T before).
    for got, base, want in ((out, ref32, ref64), (w, w32, w64)):
        assert max_rel_err(got, want) <= 2 * max_rel_err(base, want) + 2e-6, (
            max_rel_err(got, want), max_rel_err(base, want))


# ---------------------------------------------------------------------------------------
# Issue 14 (4): float64 training-mode Dice statistics do not cancel
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1e4, 1e6])
def test_dice_training_variance_without_cancellation(shift):
    # Pre-activations with |mean| >> std: E[z^2] - E[z]^2 lost ~(mean/std)^2 * eps.
    q, k, lengths, mask, p, gout, gsc = _long_problem(9, 11, "dice", "lengths", seed=4, hidden=(5,))
    with torch.no_grad():
        p["biases"][0] += shift
        p["weights"][1] /= shift  # keep the scores O(1)
    args = (q, k, lengths, mask, p, torch.float64, True, "softmax", True, gout, gsc)
    got, want = _all(run(din_fused.din_attention, *args)), _all(run(din_attention_ref, *args))
    for i, (g, w) in enumerate(zip(got, want)):
        assert max_rel_err(g, w) <= TOL64, (i, max_rel_err(g, w))


# ---------------------------------------------------------------------------------------
# Issue 12: the float sigmoid (1 / (1 + 2^t) with its own polynomial) against float64
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["sigmoid", "dice"])
def test_float_sigmoid_within_a_few_ulp(act, isa):
    # One hidden unit that passes the key through: z = k, weight = act(z).  Dice in eval
    # mode with mean 0, var 1 - eps, gamma 1, beta 0, alpha 0 gives z * sigmoid(z).
    # The whole normal range, and the denormal one below it: the clamps (-88.8, 87.34) and
    # the underflow to exactly 0 below -88.376, where round(-z log2 e) reaches 128 and
    # 1 / (1 + 2^128) is 0 (the same on every path since AVX-512's rcp14 went, round 23).
    edge = [-100.0, -88.9, -88.5, -88.35, -88.3, -88.25, -88.0, -87.0, -80.0, 80.0, 87.3, 87.4, 88.0, 100.0]
    z = torch.cat([torch.linspace(-30, 30, 20001), torch.linspace(-87.3, -30, 5001),
                   torch.linspace(-88.9, -87.3, 161), torch.linspace(30, 100, 701),
                   torch.tensor(edge + [0.0, -0.0])])
    keys = z.reshape(1, -1, 1)
    w1 = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    p = {"weights": [w1, torch.ones(1, 1)], "biases": [torch.zeros(1), torch.zeros(1)], "activation": act}
    if act == "dice":
        eps = 1e-8
        p.update(alphas=[torch.zeros(1)], bn_weights=[torch.ones(1)], bn_biases=[torch.zeros(1)],
                 running_means=[torch.zeros(1)], running_vars=[torch.ones(1) - eps], eps=eps)
    _, w = din_fused.din_attention(torch.zeros(1, 1), keys, **p, return_scores=True)
    z64 = z.double()
    want = torch.sigmoid(z64) * (z64 if act == "dice" else 1.0)
    got = w[0].double()
    ulp = 2.0 ** -23
    normal = torch.sigmoid(z64) >= torch.finfo(torch.float32).tiny  # z >= -87.33
    rel = ((got - want).abs() / want.abs().clamp_min(1e-300))[normal & (z != 0)]
    assert rel.max() <= 4 * ulp, float(rel.max())
    # Denormal sigmoids: within two of the smallest denormals (times |z| for Dice's z * p), or
    # exactly 0 past the underflow; below -88.38 exactly 0 on every path.
    close = (got - want).abs() <= 2 * 2.0 ** -149 * z64.abs().clamp_min(1)
    zero = (got == 0) & (z < -88.376)
    assert (close | zero)[~normal].all(), z[~normal & ~(close | zero)]
    assert (got[z < -88.38] == 0).all()
    if act == "dice":
        assert torch.equal(got[z == 0], torch.zeros_like(got[z == 0]))
    else:
        assert ((got[z == 0] - 0.5).abs() <= 1e-7).all()
    # A NaN pre-activation stays NaN (no clamp or mask turns it into a number).
    nan_keys = torch.full((1, 3, 1), float("nan"))
    _, w = din_fused.din_attention(torch.zeros(1, 1), nan_keys, **p, return_scores=True)
    assert w.isnan().all(), w
    # Infinite pre-activations (an infinite bias): sigmoid gives exactly 0 and 1, and Dice's
    # p*z + (1-p)*alpha*z is NaN at either infinity (one term is 0 * inf), as in torch.
    inf = float("inf")
    for bias, alpha in ((-inf, 0.0), (inf, 0.0), (-inf, 0.25), (inf, 0.25)):
        pb = {**p, "biases": [torch.tensor([bias]), torch.zeros(1)]}
        if act == "dice":
            pb["alphas"] = [torch.full((1,), alpha)]
        _, w = din_fused.din_attention(torch.zeros(1, 1), keys[:, :5], **pb, return_scores=True)
        p64 = {key: [t.double() for t in v] if isinstance(v, list) else v for key, v in pb.items()}
        _, w_ref = din_attention_ref(torch.zeros(1, 1, dtype=torch.float64), keys[:, :5].double(), **p64,
                                     return_scores=True)
        torch.testing.assert_close(w.double(), w_ref, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------
# Issue 12: training-mode Dice passes share the pre-activations through a cache
# ---------------------------------------------------------------------------------------
def _spy_zcache(monkeypatch):
    """Record (call, zcache_have or None) for every kernel call of the op."""
    from din_fused import ops
    seen = []
    def spy(name):
        real = getattr(ops._C, name)

        def call(d):
            seen.append((name, d["zcache_have"] if d.get("zcache") else None))
            return real(d)
        return call

    for name in ("stats", "forward", "backward"):
        monkeypatch.setattr(ops._C, name, spy(name))
    return seen


_CACHE_CASES = {
    # name -> (B, T, D, hidden, validity, threads)
    "padded-mask": (7, 9, 37, (12, 7), "both", 2),
    "three-layers": (6, 33, 5, (8, 6, 3), "lengths", 3),   # tiles of 32 and a partial one
    "split-row": (1, 1500, 6, (8, 4), "lengths", 2),       # one row cut into parts over threads
    "four-layers-holes": (6, 40, 7, (9, 8, 6, 4), "both", 2),  # empty rows, Inf/NaN where invalid
}


def _cache_problem(case, dtype):
    B, T, D, hidden, validity, threads = _CACHE_CASES[case]
    q, k, lengths, mask, p, gout, gsc = _long_problem(B, T, "dice", validity, seed=5, D=D, hidden=hidden)
    if case == "four-layers-holes":
        lengths[1] = 0            # an empty row
        mask[2] = False           # a fully masked row
        mask[3, 0] = False
        k[3, 0] = float("inf")    # never read: masked
        k[4, lengths[4]:] = float("nan")  # never read: beyond the length
    args = (q.to(dtype), k.to(dtype), lengths, mask, p, dtype, True, "softmax", True, gout, gsc)
    return args, hidden, threads


def _bitwise(a, b):
    # Equal bit for bit, NaN where NaN.
    return a.shape == b.shape and torch.equal(torch.isnan(a), torch.isnan(b)) and \
        torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(_CACHE_CASES))
def test_dice_training_cache_is_bitwise_the_recomputation(case, dtype, isa, monkeypatch):
    from din_fused import ops
    args, hidden, threads = _cache_problem(case, dtype)
    seen = _spy_zcache(monkeypatch)
    with _threads(threads):
        cached = _all(run(din_fused.din_attention, *args))
        L, full = len(hidden), (1 << len(hidden)) - 1
        # Statistics pass l finds layers < l; the forward all; the backward's passes all, the
        # first one the forward's (still in this thread's buffer: _Ident).
        assert seen == ([("stats", (1 << l) - 1) for l in range(L)] + [("forward", full)]
                        + [("backward", full)] * (L + 1))
        monkeypatch.setattr(ops, "ZCACHE_MAX_BYTES", 0)
        seen.clear()
        recomputed = _all(run(din_fused.din_attention, *args))
        assert seen and all(have is None for _, have in seen)
    for i, (a, b) in enumerate(zip(cached, recomputed)):
        assert _bitwise(a, b), i
    assert all(torch.isfinite(t).all() for t in cached)  # the holes were never read


def _first_reduction(seen):
    return [have for name, have in seen if name == "backward"][0]


@pytest.mark.parametrize("between", ["nothing", "another call", "release", "another ISA", "another thread",
                                     "other thread counts", "data swapped"])
def test_dice_training_backward_reuses_the_forward_cache_only_when_it_is_there(between, monkeypatch):
    """The backward reads the forward's pre-activations from this thread's buffer when no
    din_fused call has written it since (and recomputes them otherwise): bitwise the same
    gradients either way."""
    from din_fused import ops
    args, hidden, threads = _cache_problem("three-layers", torch.float32)
    other, _, _ = _cache_problem("padded-mask", torch.float32)
    full = (1 << len(hidden)) - 1
    bwd_threads = (1 if threads > 1 else 2) if between == "other thread counts" else threads
    with _threads(threads):
        monkeypatch.setattr(ops, "ZCACHE_MAX_BYTES", 0)
        recompute = run_forward(din_fused.din_attention, *args)
        torch.set_num_threads(bwd_threads)  # (gradient partials are summed per thread count)
        want = _all(recompute())
        torch.set_num_threads(threads)
        monkeypatch.setattr(ops, "ZCACHE_MAX_BYTES", 256 << 20)
        seen = _spy_zcache(monkeypatch)
        backward = run_forward(din_fused.din_attention, *args)
        if between == "another call":
            run_forward(din_fused.din_attention, *other)
        elif between == "release":
            ops.release_scratch()
        elif between == "another ISA":
            monkeypatch.setenv("DIN_FUSED_CPU_ISA", "generic")
        elif between == "other thread counts":  # the cache's contents do not depend on them
            torch.set_num_threads(bwd_threads)
        elif between == "data swapped":  # .data given other memory with the same values: recompute
            w = backward.params["weights"][1]
            w.data = w.data.clone()
        seen.clear()
        if between == "another thread":
            got = []
            t = threading.Thread(target=lambda: got.extend(_all(backward())))
            t.start()
            t.join()
        else:
            got = _all(backward())
    assert _first_reduction(seen) == (full if between in ("nothing", "other thread counts") else 0)
    if between == "another ISA":  # the backward ran on the baseline path: not bitwise the forward's ISA
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=str(i))
        return
    for i, (a, b) in enumerate(zip(got, want)):
        assert _bitwise(a, b), i


def test_dice_training_backward_with_other_statistics_recomputes(monkeypatch):
    """A backward op called by hand with statistics other than its forward's (here: the same
    values, another tensor) must not take the forward's cache."""
    from din_fused import ops
    args, hidden, threads = _cache_problem("three-layers", torch.float64)
    q, k, lengths, mask, p, dtype, training, norm, _, gout, gsc = args
    a = dict(query=q, keys=k, lengths=lengths, mask=mask, weights=p["weights"], biases=p["biases"],
             alphas=p["alphas"], bn_weights=p["bn_weights"], bn_biases=p["bn_biases"], activation="dice",
             normalization=norm, scale=0.7, training=True)
    with _threads(threads):
        out, scores, stats = ops.din_fwd(**a, running_means=[t.clone() for t in p["running_means"]],
                                         running_vars=[t.clone() for t in p["running_vars"]], eps=1e-8)
        seen = _spy_zcache(monkeypatch)
        reused = ops.din_bwd(gout, gsc, **a, stats=stats, scores=scores)
        assert _first_reduction(seen) == (1 << len(hidden)) - 1
        seen.clear()
        got = ops.din_bwd(gout, gsc, **a, stats=stats.clone(), scores=scores)
        assert _first_reduction(seen) == 0
    for i, (x, y) in enumerate(zip([got[0], got[1], *got[2]], [reused[0], reused[1], *reused[2]])):
        assert _bitwise(x, y), i


def test_dice_training_cache_off_64_bytes_is_bitwise_the_same(isa, monkeypatch):
    """The cache is written with non-temporal stores when it is 64-byte aligned (a fresh
    torch buffer always is); a buffer that is not takes plain stores, with the same results."""
    from din_fused import ops
    args, _, threads = _cache_problem("four-layers-holes", torch.float32)
    caches = []
    real_stats = ops._C.stats
    monkeypatch.setattr(ops._C, "stats", lambda d: caches.append(d["zcache"] % 64) or real_stats(d))
    with _threads(threads):
        aligned = _all(run(din_fused.din_attention, *args))
        real = ops._cpu_scratch
        monkeypatch.setattr(ops, "_cpu_scratch", lambda nbytes: real(nbytes + 64)[4:])
        shifted = _all(run(din_fused.din_attention, *args))
    n = len(caches) // 2
    assert n and caches[:n] == [0] * n and caches[n:] == [4] * n  # both paths ran
    for i, (a, b) in enumerate(zip(aligned, shifted)):
        assert _bitwise(a, b), i


def test_dice_training_cache_matches_reference_with_holes():
    args, _, threads = _cache_problem("four-layers-holes", torch.float64)
    with _threads(threads):
        got = _all(run(din_fused.din_attention, *args))
    want = _all(run(din_attention_ref, *args))
    for i, (g, w) in enumerate(zip(got, want)):
        assert max_rel_err(g, w) <= TOL64, (i, max_rel_err(g, w))


@pytest.mark.parametrize("layout", ["jagged", "shared-mixed", "permuted", "long-tiles"])
def test_dice_training_cache_jagged_layouts(layout, monkeypatch):
    from jagged_cases import LAYOUTS, check_jagged, jagged_fwd_bwd

    from din_fused import ops
    seen = _spy_zcache(monkeypatch)
    check_jagged(layout, "dice-train", "softmax", torch.float64, "cpu")
    assert any(have for _, have in seen if have is not None)
    seen.clear()
    cached = jagged_fwd_bwd(layout, torch.float32, "cpu")
    # The backward (rows' sequences gathered when none is shared) found the forward's cache.
    assert _first_reduction(seen) == (1 << len(LAYOUTS[layout][3])) - 1
    monkeypatch.setattr(ops, "ZCACHE_MAX_BYTES", 0)
    for a, b in zip(cached, jagged_fwd_bwd(layout, torch.float32, "cpu")):
        assert torch.equal(a, b)


def test_kernel_threads_are_the_calling_threads_torch_count(monkeypatch):
    """The kernels take torch.get_num_threads() of the thread that calls the op, as torch's own
    ops do: a serving worker that set its own count gets it, whatever the main thread set."""
    from din_fused import ops
    q, k, lengths, mask, p, _, _ = _long_problem(3, 9, "sigmoid", "lengths", seed=8)
    seen = []
    real = ops._C.forward
    monkeypatch.setattr(ops._C, "forward", lambda cfg: seen.append(cfg["num_threads"]) or real(cfg))

    def call(n):
        torch.set_num_threads(n)
        return din_fused.din_attention(q, k, lengths, **p)

    with _threads(2):
        main = call(2)
        with ThreadPoolExecutor(1) as pool:
            worker = pool.submit(call, 1).result()
        if "parallel backend: OpenMP" in torch.__config__.parallel_info():
            assert torch.get_num_threads() == 2  # OpenMP: the worker's count stayed in the worker
        again = call(2)
    assert seen == [2, 1, 2]
    assert torch.equal(main, worker) and torch.equal(main, again)


def test_dice_training_cache_is_kept_per_thread_and_released():
    from din_fused import ops
    q, k, lengths, mask, p, gout, gsc = _long_problem(5, 20, "dice", "lengths", seed=6)
    args = (q, k, lengths, mask, p, torch.float64, True, "none", False, gout, gsc)
    ops.release_scratch()
    run(din_fused.din_attention, *args)
    buf = ops._scratch.buf
    assert buf is not None and buf.numel() > 0
    run(din_fused.din_attention, *args)
    assert ops._scratch.buf is buf  # reused, not reallocated
    other = []
    t = threading.Thread(target=lambda: other.append(ops._scratch.buf))
    t.start()
    t.join()
    assert other == [None]  # another thread has its own (none yet)
    ops.release_scratch()
    assert ops._scratch.buf is None


def test_dice_training_cache_size_is_checked():
    from din_fused import ops
    q, k, lengths, mask, p, gout, gsc = _long_problem(3, 8, "dice", "lengths", seed=7)
    prep = ops._Prepared(q, k, lengths, None, p["weights"], p["biases"], p["alphas"], p["bn_weights"],
                         p["bn_biases"], "dice", "none", 1.0)
    prep.set_stats(torch.ones(2, 3, 6, dtype=torch.float64))
    need = ops._C.workspace_bytes(prep.cfg, "zcache")
    assert need == int(lengths.clamp(0, 8).sum()) * (8 + 8) * 8  # widths 6 and 3, padded to 64 bytes of f64
    buf = torch.empty(need, dtype=torch.uint8)
    out = torch.empty(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="zcache too small"):
        ops._C.stats({**prep.cfg, "stats_layer": 0, "stats_out": out.data_ptr(), "zcache": buf.data_ptr(),
                      "zcache_bytes": need - 1})


# ---------------------------------------------------------------------------------------
# The threads: torch's OpenMP team or the kernels' own pool; concurrent callers and fork
# ---------------------------------------------------------------------------------------
@pytest.fixture(params=["openmp", "pool"])
def runtime(request, monkeypatch):
    """Each thread runtime of the CPU kernels (DIN_FUSED_CPU_THREADS is read per call)."""
    monkeypatch.setenv("DIN_FUSED_CPU_THREADS", request.param)
    if din_fused.build_info()["threading"] != request.param:
        pytest.skip(f"torch in this process has no OpenMP runtime: {request.param} cannot run")
    return request.param


def _fwd_bwd(seed):
    q, k, lengths, mask, p, gout, gsc = _long_problem(17, 40, "sigmoid", "lengths", seed=seed)
    out, w, grads, _ = run(din_fused.din_attention, q.float(), k.float(), lengths, mask, p, torch.float32,
                           False, "softmax", True, gout, gsc)
    return [out, w, *grads]


def test_concurrent_python_threads_get_serial_results(runtime):
    serial = [_fwd_bwd(s) for s in range(4)]
    results = [None] * 4

    def work(i):
        for _ in range(5):
            results[i] = _fwd_bwd(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for want, got in zip(serial, results):
        assert got is not None
        for a, b in zip(want, got):
            assert torch.equal(a, b)


def _child(queue):
    queue.put(float(_fwd_bwd(0)[0].detach().sum()))


def test_kernel_works_in_a_forked_child(runtime):
    # The parent's workers (pool or OpenMP) do not exist in a fork; the child must not wait for them.
    want = float(_fwd_bwd(0)[0].detach().sum())
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue,))
    proc.start()
    proc.join(timeout=120)
    alive = proc.is_alive()
    if alive:
        proc.kill()
    assert not alive, "forked child hung in the kernel"
    assert queue.get(timeout=10) == want


def test_both_runtimes_give_bitwise_equal_results(monkeypatch):
    # The work split depends on the thread count alone, not on which threads run it.
    with _threads(2):
        monkeypatch.setenv("DIN_FUSED_CPU_THREADS", "pool")
        pool = [_fwd_bwd(s) for s in range(2)]
        monkeypatch.delenv("DIN_FUSED_CPU_THREADS")
        default = [_fwd_bwd(s) for s in range(2)]
    for want, got in zip(pool, default):
        for a, b in zip(want, got):
            assert torch.equal(a, b)


def test_build_info_names_the_runtime(monkeypatch):
    # torch's wheels run ATen on OpenMP; the kernels join that team unless told not to.
    want = "openmp" if "OpenMP" in torch.__config__.parallel_info() else "pool"
    monkeypatch.delenv("DIN_FUSED_CPU_THREADS", raising=False)
    assert din_fused.build_info()["threading"] == want
    monkeypatch.setenv("DIN_FUSED_CPU_THREADS", "pool")
    assert din_fused.build_info()["threading"] == "pool"


@pytest.mark.parametrize("preset", [None, "active"])
def test_training_cli_defaults_to_passive_openmp_and_says_so(preset):
    # torch's spinning OpenMP waits cost the main job ~7x on a loaded machine
    # (bench/loaded.py); the CLI re-runs itself with passive waits unless told otherwise.
    root = str(Path(din_fused.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    p = subprocess.run([sys.executable, "-m", "din_fused.train", "--help"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    said = "OMP_WAIT_POLICY=passive" in p.stderr
    assert said == (preset is None), p.stderr


# ---------------------------------------------------------------------------------------
# fp32 softmax backward with one weight near 1
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("B, T, scale, seed", DOMINANT_SOFTMAX_CASES)
def test_fp32_softmax_gradients_with_a_dominant_weight(B, T, scale, seed, isa):
    """ds_t = scale w_t (dL/dw_t - sum_u w_u dL/dw_u): when one weight is ~1 the
    difference is tiny and the sum, formed in fp32, cancels.  Such rows' dq came out
    off by more than their own size (as torch's own fp32 softmax backward does here);
    the kernels form the row term in double, normalised by the weights' sum (din_cpu.cpp,
    WSum).  The one-row case runs on two threads, which split it and merge the sums."""
    with _threads(2 if B == 1 else 1):
        check_dominant_softmax(B, T, scale, seed)
