"""The CUDA kernels' logic, checked without a GPU.

tests/cuda_emu/build.sh compiles csrc/*.cu as plain C++ against a small CUDA
emulation (one CPU thread per CUDA thread, barriers for __syncthreads and the
warp intrinsics), and din_fused.ops is patched so that CPU tensors take the
CUDA code path of that module.  Numerics are the kernels' own (fp32/fp64
accumulation, half/bfloat16 storage), so these are real checks of indexing,
tiling, online softmax, the backward and the deterministic reductions; not of
timing, occupancy or the GPU memory model (compute-sanitizer covers those on a
GPU, see bench/gpu_check.sh).  Races between barriers are what tests/sanitize.sh
looks for, with this module built under ThreadSanitizer.

Skipped when no C++20 compiler is found.  Set DIN_TEST_CUDA_EMU=0 to skip.
"""

from __future__ import annotations

import pytest
import torch
from common import clone_params
from jagged_cases import LAYOUTS, check_jagged, jagged_fwd_bwd
from kernel_cases import (
    DOMINANT_SOFTMAX_CASES,
    check_case,
    check_dominant_softmax,
    check_row_seq,
    check_unaligned_keys,
    fwd_bwd,
    make_problem,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu_module(emu_c):
    emu, mod = emu_c
    undo = emu.install(mod)
    yield emu
    undo()


ACTS = ["sigmoid", "relu", "prelu", "dice", "dice-train"]
LONG_T = 4096


@pytest.mark.parametrize("validity", ["lengths", "mask", "both"])
@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ACTS)
def test_float64_all_modes(emu_module, act, norm, validity):
    check_case(7, 13, 37, (12, 7, 5), act, norm, validity, True, torch.float64, "cpu", seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_low_precision(emu_module, act, dtype):
    check_case(6, 9, 8, (16, 8), act, "softmax", "both", True, dtype, "cpu", seed=2)
    check_case(5, 7, 37, (12, 7, 5), act, "none", "lengths", False, dtype, "cpu", seed=3)


@pytest.mark.parametrize("shape", [
    (10, 1, 3, (5,)),                # T = 1
    (3, 5, 1, (1,)),                 # D = 1, width 1
    (3, 6, 5, (4, 1, 3, 2)),         # four layers, a width-1 layer
    (3, 150, 6, (8, 4)),             # several tiles, ballot windows, masked gaps
    (3, 9, 100, (256,)),             # unfolded first layer (M does not fit next to the tiles)
    (3, 7, 4, (256, 256, 256, 256)),  # widest
], ids=str)
@pytest.mark.parametrize("act", ["sigmoid", "dice-train"])
def test_shapes(emu_module, shape, act):
    B, T, D, hidden = shape
    validity = "both" if T > 1 else "mask"  # dice-train needs >= 2 valid positions
    check_case(B, T, D, hidden, act, "softmax", validity, True, torch.float64, "cpu", seed=4)
    check_case(B, T, D, hidden, act, "none", "lengths", False, torch.float64, "cpu", seed=5)


_LOWP_SHAPES = [
    (10, 1, 3, (5,)),
    (3, 5, 1, (1,)),
    (3, 6, 5, (4, 1, 3, 2)),
    (3, 150, 6, (8, 4)),              # several tensor-core tiles per row
    (70, 3, 7, (9, 5)),               # many rows per chunk: tiles span rows
    (3, 7, 4, (256, 256)),            # wide: smaller tensor-core tiles / FFMA backward
    (3, 7, 4, (256, 256, 256, 256)),  # too wide for the tensor-core tiles: FFMA fallback
]
# The four-layer 256-wide FFMA fallback is slow under emulation, so it runs in
# fp16 only (bf16 takes the same fallback code).
_LOWP_CASES = [(s, dt) for s in _LOWP_SHAPES for dt in (torch.bfloat16, torch.float16)
               if not (len(s[3]) == 4 and s[3][0] == 256 and dt == torch.bfloat16)]


@pytest.mark.parametrize("shape,dtype", _LOWP_CASES, ids=str)
def test_low_precision_shapes(emu_module, shape, dtype):
    B, T, D, hidden = shape
    validity = "both" if T > 1 else "mask"
    for act in ("prelu", "dice-train"):
        check_case(B, T, D, hidden, act, "softmax", validity, True, dtype, "cpu", seed=9)
        check_case(B, T, D, hidden, act, "none", "lengths", False, dtype, "cpu", seed=10)


@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_rows_sharing_sequences(emu_module, dtype, norm):
    from din_fused import ops
    check_row_seq(ops._C, "cpu", dtype, norm=norm)


@pytest.mark.parametrize("act", ["sigmoid", "prelu", "dice-train"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_jagged_and_shared_layouts(emu_module, layout, act):
    check_jagged(layout, act, "softmax", torch.float64, "cpu")
    check_jagged(layout, act, "none", torch.float32, "cpu")


def _spy_full_backward(monkeypatch) -> list:
    """One entry per full (not reduce-pass) backward kernel call: whether it was handed the
    per-row key-gradient scratch and the rows grouped by sequence."""
    from din_fused import ops
    seen = []
    backward = ops._C.backward

    def spy(d):
        if d.get("reduce_layer", -1) < 0:
            seen.append("dk_rows" in d and "seq_rows" in d)
        backward(d)
    monkeypatch.setattr(ops._C, "backward", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["shared-one", "shared-mixed"])
def test_shared_dk_fixed_order(emu_module, layout, dtype, monkeypatch):
    # Rows sharing a sequence: the full backward hands the kernels per-row scratch and the
    # rows grouped by sequence (no atomics), and every result is bitwise reproducible.
    seen = _spy_full_backward(monkeypatch)
    runs = [jagged_fwd_bwd(layout, dtype, "cpu") for _ in range(2)]
    assert seen and all(seen)
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_shared_dk_scratch_cap(emu_module, monkeypatch):
    # Above the scratch cap the kernels add shared key gradients with atomics (still
    # correct); torch.use_deterministic_algorithms(True) keeps the fixed order at any size.
    from din_fused import ops
    seen = _spy_full_backward(monkeypatch)
    monkeypatch.setattr(ops, "SHARED_DK_ROWS_MAX_BYTES", 0)
    check_jagged("shared-mixed", "prelu", "softmax", torch.float64, "cpu")
    assert seen and not any(seen)
    seen.clear()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        check_jagged("shared-mixed", "prelu", "softmax", torch.float64, "cpu")
    finally:
        torch.use_deterministic_algorithms(before)
    assert seen and all(seen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["jagged", "shared-mixed"])
def test_jagged_low_precision(emu_module, layout, dtype):
    check_jagged(layout, "dice-train", "softmax", dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(emu_module, dtype):
    q, k, lengths, mask, p, _, _ = make_problem(9, 20, 7, (10, 6), "dice", "both", "cpu", seed=6)
    pp = {**p, "weights": [w.float() for w in p["weights"]]}
    a = fwd_bwd(q.to(dtype), k.to(dtype), lengths, mask, pp)
    b = fwd_bwd(q.to(dtype), k.to(dtype), lengths, mask, pp)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_workspace_checked(emu_module):
    from din_fused import ops
    q, k, lengths, mask, p, _, _ = make_problem(2, 3, 4, (5,), "sigmoid", "lengths", "cpu", seed=7)
    prep = ops._Prepared(q, k, lengths, None, p["weights"], p["biases"], [], [], [], "sigmoid", "none", 1.0)
    out = torch.empty(2, 4, dtype=torch.float64)
    sc = torch.empty(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="workspace"):
        ops._C.forward({**prep.cfg, "out": out.data_ptr(), "ldo": 4, "scores": sc.data_ptr(), "ld_scores": 3})


# --------------------------------------------------------------------------------------
# Issue 14 regressions
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["weight", "key"])
@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ["relu", "prelu"])
def test_nan_propagates_like_torch(emu_module, act, norm, where):
    """A NaN pre-activation stays NaN through ReLU (torch.relu), and PReLU's dalpha
    sums it (torch.where's backward): a diverged model must not look finite."""
    from kernel_cases import names_of, run

    import din_fused
    from din_fused.reference import din_attention_ref

    q, k, lengths, mask, p, gout, gsc = make_problem(5, 9, 6, (7, 5), act, "lengths", "cpu", seed=11)
    if where == "weight":
        p["weights"][0][2, 3] = float("nan")   # channel 2 of layer 1 is NaN for every key
    else:
        k[1, 4] = float("nan")                 # one valid key (lengths[1] = T)
    got = run(din_fused.din_attention, q, k, lengths, mask, p, torch.float64, False, norm, True, gout, gsc)
    want = run(din_attention_ref, q, k, lengths, mask, p, torch.float64, False, norm, True, gout, gsc)
    names = names_of(len(got), 0)
    assert any(w.isnan().any() for w in want)  # the case does reach the kernels' NaN paths
    for name, g, w in zip(names, got, want):
        assert torch.equal(g.isnan(), w.isnan()), (name, g.isnan().sum().item(), w.isnan().sum().item())
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, equal_nan=True, msg=name)


def _norm_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def test_long_sequence_fp32_accumulation(emu_module):
    """fp32 at long T (issue 14, defect 3): the softmax denominator and the pooled
    sum must not lose the many small terms.  One key dominates (weight ~1) and
    LONG_T - 1 keys have weight ~1.5e-8 each (6e-5 together): the float sums lost
    all of them (out error 6.2e-5 at T = 4096; torch's own fp32 softmax loses them
    too, 6.5e-5); summed in double the error is that of the rounded terms (< 5e-7)."""
    import din_fused
    from din_fused.reference import din_attention_ref

    B, T, D = 1, LONG_T, 4
    gen = torch.Generator().manual_seed(12)
    k = torch.randn(B, T, D, generator=gen, dtype=torch.float64).add_(3.0)
    k[0, :, 0] = -10.0
    k[0, 0, 0] = 10.0                       # score sigmoid(k[.., 0]): ~1 for key 0, ~4.5e-5 after
    q = torch.randn(B, D, generator=gen, dtype=torch.float64)
    w0 = torch.zeros(1, 4 * D, dtype=torch.float64)
    w0[0, D] = 1.0                          # z = k[0]
    p = {"weights": [w0, torch.ones(1, 1, dtype=torch.float64)],
         "biases": [torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)],
         "activation": "sigmoid"}
    lengths = torch.full((B,), T)
    kw = dict(normalization="softmax", scale=18.0, return_scores=True)  # weight ratio e^-18
    with torch.no_grad():
        out64, w64 = din_attention_ref(q, k, lengths, **p, **kw)
        p32 = clone_params(p, torch.float32, False)
        ref_out, ref_w = din_attention_ref(q.float(), k.float(), lengths, **p32, **kw)
        out, w = din_fused.din_attention(q.float(), k.float(), lengths, **p32, **kw)
    assert 3e-5 < w64[0, 1:].sum().item() < 1e-3   # the small weights matter at fp32 precision
    for name, g, r, x in (("out", out, ref_out, out64), ("weights", w, ref_w, w64)):
        err = _norm_err(g, x)
        assert err <= 5e-7, (name, err, "reference fp32:", _norm_err(r, x))


@pytest.mark.parametrize("B, T, scale, seed", DOMINANT_SOFTMAX_CASES)
def test_fp32_softmax_gradients_with_a_dominant_weight(emu_module, B, T, scale, seed):
    """The FFMA kernel's softmax row term in double, as on the CPU (kernel_cases)."""
    check_dominant_softmax(B, T, scale, seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_dim_beyond_32_bits_rejected(emu_module, dtype):
    """D is held in int by the kernels: a dim that does not fit must be refused
    before a narrowed copy of it is used (the fp16 tensor-core plan used to run
    with D mod 2^32)."""
    from din_fused import ops
    q, k, lengths, mask, p, _, _ = make_problem(2, 3, 4, (5,), "sigmoid", "lengths", "cpu", seed=7)
    acc = torch.float32
    prep = ops._Prepared(q.to(dtype), k.to(dtype), lengths, None, [w.to(acc) for w in p["weights"]],
                         [b.to(acc) for b in p["biases"]], [], [], [], "sigmoid", "none", 1.0)
    ws = prep.workspace("forward")
    out = torch.zeros(2, 4, dtype=dtype)
    sc = torch.zeros(2, 3, dtype=acc)
    cfg = {**prep.cfg, "dim": 2**32 + 4, "workspace_bytes": 2**62, "out": out.data_ptr(), "ldo": 4,
           "scores": sc.data_ptr(), "ld_scores": 3}
    with pytest.raises(ValueError, match="dim"):
        ops._C.forward(cfg)
    assert ws.numel() > 0


def test_unaligned_key_rows_take_the_scalar_loads(emu_module):
    check_unaligned_keys("cpu")
