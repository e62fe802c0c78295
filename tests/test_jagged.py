"""din_attention_jagged: jagged and shared histories against the reference on the
equivalent padded/tiled input, gradcheck, opcheck, torch.compile, reproducibility, bad input."""

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from common import assert_modules_agree, num_threads, param_tensors, random_params
from jagged_cases import LAYOUTS, check_jagged, jagged_fwd_bwd, make_jagged

import din_fused
from din_fused import din_attention_jagged

ACTS = ["sigmoid", "relu", "prelu", "dice", "dice-train"]
# Before torch 2.10, torch.compile(fullgraph=True) did not capture data-dependent output shapes
# (the jagged op's weights) unless capture_dynamic_output_shape_ops was set (pytorch#163123).
CAPTURE_NEEDS_FLAG = torch.torch_version.TorchVersion(torch.__version__) < (2, 10)


@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_jagged_matches_tiled_reference_float64(layout, act, norm):
    check_jagged(layout, act, norm, torch.float64, "cpu")


@pytest.mark.parametrize("act", ["prelu", "dice-train"])
@pytest.mark.parametrize("layout", ["jagged", "shared-mixed"])
def test_jagged_float32(layout, act):
    check_jagged(layout, act, "softmax", torch.float32, "cpu")


def _has_avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() == "AVX512"
    return all(f in flags for f in ("avx512f", "avx512dq", "avx512vl", "avx512bw"))


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
@pytest.mark.parametrize("layout", ["jagged", "shared-one", "shared-mixed"])
def test_jagged_every_isa(layout, isa, monkeypatch):
    if isa == "avx512" and not _has_avx512():
        pytest.skip("this CPU has no AVX-512: the AVX-512 kernels cannot run here")
    monkeypatch.setenv("DIN_FUSED_CPU_ISA", isa)
    check_jagged(layout, "dice-train", "softmax", torch.float64, "cpu")
    check_jagged(layout, "relu", "none", torch.float64, "cpu")


def test_all_sequences_empty_gives_zeros():
    q = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    v = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    p = random_params(4, (5,), "sigmoid")
    out, w, row_off = din_attention_jagged(q, v, torch.zeros(3, dtype=torch.int64), torch.tensor([0, 1, 0]),
                                           **p, return_scores=True, normalization="softmax")
    assert torch.equal(out, torch.zeros(3, 4, dtype=torch.float64))
    assert w.shape == (0,) and row_off.tolist() == [0, 0, 0, 0]
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.parametrize("act", ["sigmoid", "prelu", "dice-train"])
@pytest.mark.parametrize("layout", ["jagged", "shared-mixed"])
def test_jagged_gradcheck(layout, act):
    lens, row_seq, _, _ = LAYOUTS[layout]
    q, v, off, rs, p, _ = make_jagged(lens, row_seq, 3, (4, 3), act, "cpu", seed=5)
    tensors = param_tensors(p)
    n_w = len(p["weights"])

    def f(q, v, *params):
        pp = dict(p)
        pp["weights"], pp["biases"] = list(params[:n_w]), list(params[n_w:2 * n_w])
        rest = list(params[2 * n_w:])
        for key in ("alphas", "bn_weights", "bn_biases"):
            if key in p:
                pp[key], rest = rest[:n_w - 1], rest[n_w - 1:]
        out, w, _ = din_attention_jagged(q, v, off, rs, **pp, training=act == "dice-train",
                                         normalization="softmax", scale=1.3, return_scores=True)
        return out, w

    assert torch.autograd.gradcheck(f, [q.requires_grad_(), v.requires_grad_(), *tensors], eps=1e-6,
                                    atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("act", ["sigmoid", "prelu", "dice", "dice-train"])
@pytest.mark.parametrize("shared", [False, True])
def test_jagged_opcheck(act, shared):
    lens, row_seq, D, hidden = LAYOUTS["shared-mixed" if shared else "jagged"]
    q, v, off, rs, p, _ = make_jagged(lens, row_seq, D, hidden, act, "cpu", seed=2)
    dice = act.startswith("dice")
    args = (q.requires_grad_(), v.requires_grad_(), off, rs, p["weights"], p["biases"], p.get("alphas", []),
            p.get("bn_weights", []), p.get("bn_biases", []), p.get("running_means", []) if dice else [],
            p.get("running_vars", []) if dice else [], p["activation"], "softmax", 0.5,
            act == "dice-train", 1e-8)
    torch.library.opcheck(torch.ops.din_fused.din_jagged_fwd.default, args)


def test_jagged_torch_compile_fullgraph():
    lens, row_seq, D, hidden = LAYOUTS["shared-mixed"]
    q, v, off, rs, p, gout = make_jagged(lens, row_seq, D, hidden, "prelu", "cpu", seed=4)

    def f(q, v):
        out, w, row_off = din_attention_jagged(q, v, off, rs, **p, normalization="softmax",
                                               return_scores=True)
        return (out * gout).sum() + w.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    # (torch < 2.10 captures the op's data-dependent output shape only when told to: README, Build)
    with (torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True) if CAPTURE_NEEDS_FLAG
          else nullcontext()):
        for fn in (f, compiled):
            qq, vv = q.clone().requires_grad_(), v.clone().requires_grad_()
            loss = fn(qq, vv)
            results.append([loss, *torch.autograd.grad(loss, [qq, vv])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# Fewer than 4 rows a thread, rows over 2 x 256 positions: the CPU cuts each row into parts
# over positions (csrc/din_cpu.cpp, Plan), forward and backward, for jagged and shared rows alike.
# Rows 0 and 2 share sequence 0; row 1 reads sequence 2 (sequence 1 is empty).
LONG_ROWS = ([1500, 0, 700], [0, 2, 0], 6, (8, 4))


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ["sigmoid", "dice-train"])
def test_long_rows_cut_over_threads_match_tiled_reference(act, norm, threads):
    with num_threads(threads):
        check_jagged(LONG_ROWS, act, norm, torch.float64, "cpu", seed=threads)


def test_jagged_module_torch_compile_inductor_dice_training():
    """The module on jagged keys under torch.compile(fullgraph=True) with inductor, Dice in
    training: outputs, gradients and the running statistics as in eager mode."""
    lens, row_seq, D, hidden = LAYOUTS["shared-mixed"]
    q, v, off, rs, _, _ = make_jagged(lens, row_seq, D, hidden, "dice", "cpu", seed=5)
    q, v = q.float(), v.float()
    torch._dynamo.reset()
    eager = din_fused.FusedDINAttention(embedding_dim=D, att_hidden_units=hidden, att_activation="dice",
                                        weight_normalization=True)
    mod = din_fused.FusedDINAttention(embedding_dim=D, att_hidden_units=hidden, att_activation="dice",
                                      weight_normalization=True)
    mod.load_state_dict(eager.state_dict())
    compiled = torch.compile(mod, fullgraph=True)
    results = []
    with (torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True) if CAPTURE_NEEDS_FLAG
          else nullcontext()):
        for m in (eager, compiled):
            qq, vv = q[:, None].clone().requires_grad_(), v.clone().requires_grad_()
            out = m(qq, vv, offsets=off, row_seq=rs)
            out.square().sum().backward()
            results.append((out.detach(), qq.grad, vv.grad))
    assert_modules_agree(results, eager, mod)
    assert any(not torch.equal(b, torch.zeros_like(b)) and not torch.equal(b, torch.ones_like(b))
               for b in mod.buffers()), "the running statistics were not updated"


@pytest.mark.parametrize("layout", ["shared-one", "shared-mixed", "long-tiles"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_shared_sequence_gradients_bitwise_reproducible(layout, threads):
    with num_threads(threads):
        a = jagged_fwd_bwd(layout, torch.float32, "cpu")
        b = jagged_fwd_bwd(layout, torch.float32, "cpu")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_many_rows_sharing_one_sequence_reproducible():
    # Enough rows that every thread adds into the shared sequence's gradient.
    gen = torch.Generator().manual_seed(0)
    C, T, D = 200, 33, 8
    v = torch.randn(T, D, generator=gen)
    q = torch.randn(C, D, generator=gen)
    p = random_params(D, (16, 8), "sigmoid", dtype=torch.float32, gen=gen)
    off, rs = torch.tensor([0, T]), torch.zeros(C, dtype=torch.int64)

    def run():
        vv = v.clone().requires_grad_()
        out = din_attention_jagged(q, vv, off, rs, **p, normalization="softmax")
        (dv,) = torch.autograd.grad(out.square().sum(), [vv])
        return dv

    first = run()
    for _ in range(3):
        assert torch.equal(run(), first)


# ---------------------------------------------------------------------------------------
# Rows in the vector lanes (din_cpu.cpp, Kernel::lanes_t): bitwise the row path
# ---------------------------------------------------------------------------------------
ISA_BYTES = {"avx512": 64, "avx2": 32, "generic": 16}


def _isa(isa, monkeypatch) -> int:
    """Forces the CPU kernels' ISA; the vector width in bytes."""
    if isa == "avx512" and not _has_avx512():
        pytest.skip("this CPU has no AVX-512: the AVX-512 kernels cannot run here")
    monkeypatch.setenv("DIN_FUSED_CPU_ISA", isa)
    return ISA_BYTES[isa]


def _lane_rows(lens, row_seq, D, H1, dtype, threads=2):
    """The rows the CPU forward runs in the lanes (_C.lane_rows) for sequences of these lengths."""
    from din_fused import ops

    p = random_params(D, (H1, 3), "sigmoid", dtype=dtype, requires_grad=False)
    offsets = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    prep = ops._jagged_prepared(torch.zeros(len(row_seq), D, dtype=dtype), torch.zeros(sum(lens), D, dtype=dtype),
                                offsets, torch.tensor(row_seq), p["weights"], p["biases"], [], [], [],
                                "sigmoid", "none", 1.0, False, gather=False)
    prep.cfg["num_threads"] = threads
    return ops._C.lane_rows(prep.cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("isa", list(ISA_BYTES))
def test_lanes_take_whole_groups_of_rows_sharing_a_long_sequence(isa, dtype, monkeypatch):
    """Of each sequence longer than 8 positions, the first floor(n / W) * W of its n rows (in row
    order) run in the lanes, W a vector's lanes; none when rows are cut over positions, have their
    own sequences, or the lanes' folded weights would pass 512 KB."""
    vb = _isa(isa, monkeypatch)
    W = vb // dtype.itemsize
    lens = [40, 9, 8, 100]
    row_seq = [(7 * i) % 4 for i in range(6 * W + 3)]
    rows = _lane_rows(lens, row_seq, 5, 12, dtype)
    want = []
    for s, n in enumerate(lens):
        mine = [r for r, x in enumerate(row_seq) if x == s]
        want += mine[:len(mine) // W * W] if n > 8 else []
    assert sorted(rows) == sorted(want) and len(rows) % W == 0 and len(rows) >= 2 * W
    for g in range(0, len(rows), W):
        assert len({row_seq[r] for r in rows[g:g + W]}) == 1
    assert _lane_rows([40], [0] * (2 * W), 5, 12, dtype, threads=W) == []  # fewer than 4 rows a thread
    assert _lane_rows([40] * W, list(range(W)), 5, 12, dtype) == []  # no sequence shared
    over = (512 << 10) // (256 * vb) + 1  # the lanes' weights, D x H1 vectors, just over 512 KB
    n = max(W, 4)  # (fewer than 4 rows on one thread are cut over positions)
    assert _lane_rows([40], [0] * n, over, 256, dtype, threads=1) == []
    assert _lane_rows([40], [0] * n, over - 1, 256, dtype, threads=1) == list(range(n))


def _row_path_twin(values, offsets, row_seq):
    """The same rows with a copy of its sequence each: the row path's layout."""
    lens = (offsets[1:] - offsets[:-1])[row_seq]
    vals = torch.cat([values[offsets[s]:offsets[s + 1]] for s in row_seq.tolist()])
    return vals, torch.cat([lens.new_zeros(1), lens.cumsum(0)])


@pytest.mark.parametrize("hidden", [(100, 7, 5), (12,)])  # K over 96 (summed in chunks); one layer
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ["sigmoid", "relu", "prelu", "dice"])
@pytest.mark.parametrize("isa", list(ISA_BYTES))
def test_lanes_forward_is_bitwise_the_row_path(isa, act, norm, dtype, hidden, monkeypatch):
    """Rows run in the lanes give bitwise the outputs and weights of the same rows on the row
    path (each with its own copy of the sequence), so a row's results do not depend on how many
    rows share its sequence, and the backward (on the row path) recomputes exactly the forward's
    activations.  D = 37; sequences of 70 (tiles of 32 + 32 + 6), 33 and 9 positions."""
    W = _isa(isa, monkeypatch) // dtype.itemsize
    gen = torch.Generator().manual_seed(5)
    lens, D = [70, 33, 9], 37
    row_seq = torch.tensor([(5 * i) % 3 for i in range(3 * W + 7)])
    values = torch.randn(sum(lens), D, generator=gen, dtype=dtype)
    offsets = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    query = torch.randn(len(row_seq), D, generator=gen, dtype=dtype)
    p = random_params(D, hidden, act, dtype=dtype, gen=gen, requires_grad=False)
    assert len(_lane_rows(lens, row_seq.tolist(), D, hidden[0], dtype)) >= W
    twin_values, twin_offsets = _row_path_twin(values, offsets, row_seq)
    kw = dict(**p, normalization=norm, scale=1.7, return_scores=True)
    with torch.no_grad():
        out, w, _ = din_attention_jagged(query, values, offsets, row_seq, **kw)
        out2, w2, _ = din_attention_jagged(query, twin_values, twin_offsets, None, **kw)
    assert torch.equal(out, out2) and torch.equal(w, w2)


@pytest.mark.parametrize("isa", list(ISA_BYTES))
def test_lanes_with_non_finite_inputs_are_the_row_paths(isa, monkeypatch):
    """An Inf key or a NaN query (where the row path recomputes layer 1 unfolded, as the
    reference does) sends its lane group back to the row path: the same NaN and Inf as there."""
    W = _isa(isa, monkeypatch) // 4
    gen = torch.Generator().manual_seed(6)
    lens, D = [40, 20], 6
    row_seq = torch.tensor([i % 2 for i in range(4 * W)])
    values = torch.randn(sum(lens), D, generator=gen)
    values[3, 2] = float("inf")
    offsets = torch.tensor([0, *lens]).cumsum(0)
    query = torch.randn(len(row_seq), D, generator=gen)
    query[5, 1] = float("nan")
    p = random_params(D, (8, 4), "relu", dtype=torch.float32, gen=gen, requires_grad=False)
    twin_values, twin_offsets = _row_path_twin(values, offsets, row_seq)
    for norm in ("none", "softmax"):
        kw = dict(**p, normalization=norm, return_scores=True)
        with torch.no_grad():
            out, w, _ = din_attention_jagged(query, values, offsets, row_seq, **kw)
            out2, w2, _ = din_attention_jagged(query, twin_values, twin_offsets, None, **kw)
        assert out.isnan().any() and out[row_seq == 1].isfinite().sum() > 0
        torch.testing.assert_close(out, out2, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(w, w2, rtol=0, atol=0, equal_nan=True)


def _bad_jagged():
    q, v, off, rs, p, _ = make_jagged([3, 0, 2], [0, 2, 1, 0], 4, (5,), "sigmoid", "cpu", seed=0)
    return q, v, off, rs, {k: [t.detach() for t in x] if isinstance(x, list) else x for k, x in p.items()}


BAD = {
    "offsets 2-D": (dict(offsets=torch.tensor([[0, 3, 3, 5]])), ValueError, "offsets"),
    "offsets float": (dict(offsets=torch.tensor([0.0, 3, 3, 5])), TypeError, "offsets"),
    "offsets start": (dict(offsets=torch.tensor([1, 3, 3, 5])), ValueError, "start at 0"),
    "offsets decrease": (dict(offsets=torch.tensor([0, 4, 3, 5])), ValueError, "decrease"),
    "offsets end": (dict(offsets=torch.tensor([0, 3, 3, 4])), ValueError, "end at N"),
    "offsets empty": (dict(offsets=torch.zeros(0, dtype=torch.int64)), ValueError, "offsets"),
    "row_seq high": (dict(row_seq=torch.tensor([0, 3, 1, 0])), ValueError, "row_seq"),
    "row_seq negative": (dict(row_seq=torch.tensor([0, -1, 1, 0])), ValueError, "row_seq"),
    "row_seq shape": (dict(row_seq=torch.tensor([0, 1])), ValueError, "row_seq"),
    "row_seq float": (dict(row_seq=torch.tensor([0.0, 1, 1, 0])), TypeError, "row_seq"),
    "no row_seq, S != R": (dict(row_seq=None), ValueError, "offsets"),
    "values dtype": (dict(values=torch.randn(5, 4)), TypeError, "dtype"),
    "values rank": (dict(values=torch.randn(5, 4, 1, dtype=torch.float64)), ValueError, "values"),
    "values dim": (dict(values=torch.randn(5, 3, dtype=torch.float64)), ValueError, "dim"),
    "values device": (dict(values=torch.randn(5, 4, dtype=torch.float64, device="meta")), ValueError, "meta"),
    "offsets device": (dict(offsets=torch.tensor([0, 3, 3, 5], device="meta")), ValueError, "offsets"),
    "row_seq device": (dict(row_seq=torch.tensor([0, 2, 1, 0], device="meta")), ValueError, "row_seq"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_jagged_bad_input_raises_clear_error(name):
    q, v, off, rs, p = _bad_jagged()
    kw = dict(query=q, values=v, offsets=off, row_seq=rs)
    override, exc, words = BAD[name]
    kw.update(override)
    with pytest.raises(exc, match=words):
        din_attention_jagged(**kw, **p)


def _layout_cases():
    g = torch.Generator().manual_seed(5)
    for S, R, shared in [(0, 0, None), (1, 0, True), (1, 4, True), (6, 6, None), (6, 6, True), (5, 9, True),
                         (4, 3, True)]:
        lens = torch.randint(0, 5, (S,), generator=g)
        off = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
        N = int(off[-1])
        if shared is None:
            yield off, None, N
        elif R == S:  # a permutation: no sequence shared, so gather=True gathers
            yield off, torch.randperm(S, generator=g), N
        else:
            yield off, torch.randint(0, max(S, 1), (R,), generator=g), N
    base = torch.tensor([0, 3, 3, 5])  # with N = 5 below
    for off, rs in [(torch.tensor([1, 3, 3, 5]), None), (torch.tensor([0, 4, 3, 5]), None),
                    (torch.tensor([0, 3, 3, 4]), None), (base, torch.tensor([0, 3, 1])),
                    (base, torch.tensor([-2, 1, 2])), (torch.zeros(1, dtype=torch.int64), torch.tensor([0]))]:
        yield off, rs, 5


@pytest.mark.parametrize("gather", [False, True])
def test_cpu_jagged_layout_equals_the_torch_ops_layout(gather):
    """The CPU's one-pass _C.jagged_layout against the torch ops that CUDA tensors take:
    the same layout, and the same error for every bad offsets or row_seq."""
    from din_fused.ops import _jagged_layout, _jagged_layout_torch

    D = 3
    for off, rs, N in _layout_cases():
        values = torch.zeros(N, D)
        try:
            want = _jagged_layout_torch(off, rs, N, D, gather=gather)
        except ValueError as e:
            with pytest.raises(ValueError) as got:
                _jagged_layout(values, off, rs, gather=gather)
            assert str(got.value) == str(e)
            continue
        got = _jagged_layout(values, off, rs, gather=gather)
        assert (got[2] is None) == (want[2] is None), (off, rs)
        for a, b in zip(got, want):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), (off, rs, a, b)
            else:
                assert a == b, (off, rs)


def test_jagged_op_called_directly_refuses_bad_offsets_shapes():
    """The op itself (no check_jagged_inputs in front of it) refuses offsets without the
    leading 0, or not 1-D, instead of reading them."""
    from din_fused.params import MLPParams

    q, v, off, rs, p, _ = make_jagged([3, 0, 2], [0, 2, 1, 0], 4, (5,), "sigmoid", "cpu", seed=0)
    mlp = MLPParams(p["weights"], p["biases"])
    for bad in (torch.zeros(0, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int64)):
        with pytest.raises(ValueError, match="offsets must have shape"):
            torch.ops.din_fused.din_jagged_fwd(q, v, bad, rs, *mlp.op_args(), "sigmoid", "none", 1.0, False,
                                               1e-8)


def test_jagged_int32_indices_match_int64():
    q, v, off, rs, p, _ = make_jagged([3, 0, 2], [0, 2, 1, 0], 4, (5,), "sigmoid", "cpu", seed=1)
    a = din_attention_jagged(q, v, off, rs, **p)
    b = din_attention_jagged(q, v, off.int(), rs.int(), **p)
    assert torch.equal(a, b)


def test_package_exports_jagged():
    assert din_fused.din_attention_jagged is din_attention_jagged
