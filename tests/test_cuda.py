"""CUDA kernels on a real GPU (skipped cleanly without one, or without a CUDA build).

The same checks run on CPU through the emulation in test_cuda_emulated.py; here
they meet the real hardware, plus what only a GPU can show: CUDA-graph capture
and replay, bitwise determinism across runs, long sequences, side streams.
"""

from __future__ import annotations

import pytest
import torch
from common import clone_params, max_rel_err, param_tensors
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

import din_fused

HAS_CUDA = torch.cuda.is_available() and din_fused.build_info().get("cuda", False)
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of din_fused")

ACTS = ["sigmoid", "relu", "prelu", "dice", "dice-train"]
LOWP = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("use_scores", [False, True])
@pytest.mark.parametrize("validity", ["lengths", "mask", "both"])
@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_reference(dtype, act, norm, validity, use_scores):
    check_case(7, 13, 37, (12, 7, 5), act, norm, validity, use_scores, dtype, "cuda", seed=1)
    check_case(6, 9, 8, (16, 8), act, norm, validity, use_scores, dtype, "cuda", seed=2)


@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_low_precision(dtype, act, norm):
    # error <= 2x (outputs) / 3x (gradients) the reference's own error in dtype
    check_case(6, 9, 8, (16, 8), act, norm, "both", True, dtype, "cuda", seed=3)
    check_case(7, 13, 37, (12, 7, 5), act, norm, "lengths", True, dtype, "cuda", seed=4)
    check_case(16, 1, 37, (8,), act, norm, "lengths", False, dtype, "cuda", seed=5)          # T = 1
    check_case(4, 1000, 36, (80, 40), act, norm, "both", True, dtype, "cuda", seed=6)      # T = 1000


@pytest.mark.parametrize("shape", [
    (10, 1, 3, (5,)),
    (3, 5, 1, (1,)),
    (3, 6, 5, (4, 1, 3, 2)),
    (5, 300, 6, (8, 4)),
    (70, 3, 7, (9, 5)),              # tensor-core tiles spanning many rows
    (3, 9, 300, (256,)),             # unfolded first layer in fp32 too
    (3, 7, 4, (256, 256)),           # smaller tensor-core tiles
    (3, 7, 4, (256, 256, 256, 256)),  # fp16/bf16: too wide for tensor-core tiles, FFMA fallback
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_odd_shapes(shape, dtype):
    B, T, D, hidden = shape
    validity = "both" if T > 1 else "mask"
    for act in ("sigmoid", "dice-train"):
        check_case(B, T, D, hidden, act, "softmax", validity, True, dtype, "cuda", seed=7)
        check_case(B, T, D, hidden, act, "none", "lengths", False, dtype, "cuda", seed=8)


def test_zero_lengths_give_zeros():
    q, k, _, _, p, _, _ = make_problem(5, 6, 7, (8, 4), "sigmoid", "none", "cuda", seed=9)
    lengths = torch.zeros(5, dtype=torch.int64, device="cuda")
    res = fwd_bwd(q.float(), k.float(), lengths, None, clone_params(p, torch.float32))
    for t in res:  # out, scores, dq, dk and every parameter gradient
        assert torch.count_nonzero(t) == 0


@pytest.mark.parametrize("B, T, scale, seed", DOMINANT_SOFTMAX_CASES)
def test_fp32_softmax_gradients_with_a_dominant_weight(B, T, scale, seed):
    check_dominant_softmax(B, T, scale, seed, device="cuda")


def test_long_sequence():
    # T in the hundreds of thousands: one row per CTA streams ~400 tiles
    B, T, D, hidden = 2, 200_000, 8, (16, 8)
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(B, D, generator=gen).cuda()
    k = torch.randn(B, T, D, generator=gen).cuda()
    lengths = torch.tensor([T, 123_457]).cuda()
    from common import random_params

    p = random_params(D, hidden, "sigmoid", dtype=torch.float32, device="cuda", gen=gen)
    from din_fused.reference import din_attention_ref

    for norm in ("softmax", "none"):
        got = din_fused.din_attention(q, k, lengths, weights=p["weights"], biases=p["biases"],
                                      normalization=norm, return_scores=True)
        want = din_attention_ref(q.double(), k.double(), lengths,
                                 weights=[w.double() for w in p["weights"]],
                                 biases=[b.double() for b in p["biases"]], normalization=norm,
                                 return_scores=True)
        assert max_rel_err(got[0], want[0]) < 1e-4
        assert max_rel_err(got[1], want[1]) < 1e-4


@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_rows_sharing_sequences(dtype, norm):
    check_row_seq(din_fused._C, "cuda", dtype, norm=norm)


@pytest.mark.parametrize("act", ["sigmoid", "prelu", "dice-train"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_jagged_and_shared_layouts(dtype, layout, act):
    for norm in ("none", "softmax"):
        check_jagged(layout, act, norm, dtype, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["jagged", "permuted", "shared-one", "shared-mixed"])
def test_jagged_deterministic_across_runs(layout, dtype):
    # Bitwise reproducible, also where rows share a sequence: each row's share of dk
    # goes to scratch and a second kernel adds a sequence's rows in a fixed order.
    runs = [jagged_fwd_bwd(layout, dtype, "cuda") for _ in range(3)]
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ["sigmoid", "dice-train"])
def test_deterministic_across_runs(act, dtype):
    q, k, lengths, mask, p, _, _ = make_problem(300, 57, 24, (32, 16), act, "both", "cuda", seed=11)
    pp = clone_params(p, torch.float32)
    runs = [fwd_bwd(q.to(dtype), k.to(dtype), lengths, mask, pp, training=act == "dice-train")
            for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("act", ["sigmoid", "dice-train"])
def test_cuda_graph_capture_and_replay(act):
    training = act == "dice-train"
    B, T, D, hidden = 64, 50, 16, (32, 16)
    q, k, lengths, _, p, _, _ = make_problem(B, T, D, hidden, act, "lengths", "cuda", seed=12,
                                             nan_padding=False)
    lengths.clamp_(min=1)
    p = clone_params(p, torch.float32)
    params = param_tensors(p)
    sq = q.float().clone().requires_grad_()
    sk = k.float().clone().requires_grad_()
    sl = lengths.clone()

    def step():
        out, w = din_fused.din_attention(sq, sk, sl, None, **p, training=training, normalization="softmax",
                                         return_scores=True)
        loss = (out * out).sum() + w.sum()
        return [out, w, *torch.autograd.grad(loss, [sq, sk, *params])]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    gen = torch.Generator().manual_seed(13)
    for _ in range(2):  # new inputs, replay, compare with eager
        with torch.no_grad():
            sq.copy_(torch.randn(B, D, generator=gen))
            sk.copy_(torch.randn(B, T, D, generator=gen))
            sl.copy_(torch.randint(1, T + 1, (B,), generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for a, b in zip(static, eager):
            assert torch.equal(a, b)


def test_side_stream_and_second_call_order():
    q, k, lengths, mask, p, _, _ = make_problem(33, 40, 12, (16, 8), "prelu", "both", "cuda", seed=14)
    pp = clone_params(p, torch.float32)
    ref = fwd_bwd(q.float(), k.float(), lengths, mask, pp)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = fwd_bwd(q.float(), k.float(), lengths, mask, pp)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_module_bf16_matches_reference_impl():
    # The drop-in module on bf16 CUDA tensors (autocast-free mixed precision use)
    torch.manual_seed(15)
    mod = din_fused.FusedDINAttention(embedding_dim=36, att_hidden_units=(80, 40), att_activation="dice",
                                      weight_normalization=True).cuda().eval()
    ref = din_fused.FusedDINAttention(embedding_dim=36, att_hidden_units=(80, 40), att_activation="dice",
                                      weight_normalization=True, impl="reference").cuda().eval()
    mod.to(torch.bfloat16)
    ref.load_state_dict(mod.state_dict())  # the same bf16-rounded parameters
    ref.double()
    q = torch.randn(64, 1, 36, device="cuda")
    k = torch.randn(64, 20, 36, device="cuda")
    lengths = torch.randint(0, 21, (64,), device="cuda")
    got = mod(q.bfloat16(), k.bfloat16(), lengths)
    want = ref(q.bfloat16().double(), k.bfloat16().double(), lengths)
    assert max_rel_err(got, want) < 3e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_runs_the_kernels_in_the_autocast_dtype(dtype):
    """Under CUDA autocast the fused layer takes query and keys as a matmul would: in the autocast
    dtype, which the kernels read natively.  A float32 query (an autocast Linear gives the
    autocast dtype already) and float32 keys from an embedding meet there; the result is the
    fused op on inputs cast by hand, bitwise, and the gradients reach both."""
    torch.manual_seed(16)
    mod = din_fused.FusedDINAttention(embedding_dim=36, att_hidden_units=(80, 40), att_activation="sigmoid",
                                      weight_normalization=True).cuda()
    q = torch.randn(64, 1, 36, device="cuda", requires_grad=True)
    k = torch.randn(64, 20, 36, device="cuda", requires_grad=True)
    lengths = torch.randint(0, 21, (64,), device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = mod(q, k, lengths)
    assert out.dtype == dtype
    assert torch.equal(out, mod(q.detach().to(dtype), k.detach().to(dtype), lengths))
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


def test_unaligned_key_rows_take_the_scalar_loads():
    check_unaligned_keys("cuda")
