"""Bad input, padding that must never leak, and edge shapes."""

import contextlib
import math
import subprocess
from pathlib import Path

import pytest
import torch
from common import DEVICES, TOL64, max_rel_err, random_params, randomise_

import din_fused
from din_fused import FusedDINAttention, din_attention
from din_fused.params import MLPParams
from din_fused.reference import din_attention_ref


def problem(B=4, T=6, D=5, hidden=(7, 3), act="sigmoid", dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(B, D, generator=gen, dtype=dtype).to(device)
    k = torch.randn(B, T, D, generator=gen, dtype=dtype).to(device)
    lengths = torch.randint(0, T + 1, (B,), generator=gen).to(device)
    p = random_params(D, hidden, act, dtype=dtype, device=device, gen=gen, requires_grad=False)
    return q, k, lengths, p


# ---------------------------------------------------------------------------------------
# Bad input: a clear ValueError/TypeError that names the argument.
# ---------------------------------------------------------------------------------------
def _bad_cases():
    q, k, lengths, p = problem()
    B, T, D = k.shape

    def rnd(*shape):
        return torch.randn(*shape, dtype=q.dtype)

    cases = {
        "query rank": (dict(query=q[None]), ValueError, "query"),
        "keys rank": (dict(keys=k[0]), ValueError, "keys"),
        "lengths rank": (dict(lengths=lengths[:, None]), ValueError, "lengths"),
        "query D": (dict(query=torch.randn(B, D + 1, dtype=q.dtype)), ValueError, "dim"),
        "query B": (dict(query=torch.randn(B + 1, D, dtype=q.dtype)), ValueError, "batch"),
        "lengths B": (dict(lengths=lengths[:-1]), ValueError, "lengths"),
        "lengths < 0": (dict(lengths=torch.tensor([0, -1, 2, 3])), ValueError, "lengths"),
        "lengths > T": (dict(lengths=torch.tensor([0, T + 1, 2, 3])), ValueError, "lengths"),
        "float lengths": (dict(lengths=lengths.double()), TypeError, "lengths"),
        "mask shape": (dict(mask=torch.ones(B, T + 1, dtype=torch.bool)), ValueError, "mask"),
        "mask dtype": (dict(mask=torch.ones(B, T)), TypeError, "mask"),
        "integer keys": (dict(keys=k.long()), TypeError, "keys"),
        "dtype mismatch": (dict(query=q.float()), TypeError, "dtype"),
        "weights[0] shape": (dict(weights=[torch.randn(7, 4 * D + 1, dtype=q.dtype), *p["weights"][1:]]),
                             ValueError, "weights[0]"),
        "five layers": (dict(weights=[rnd(2, 4 * D)] + [rnd(2, 2)] * 4 + [rnd(1, 2)],
                             biases=[rnd(2)] * 5 + [rnd(1)]),
                        ValueError, "1..4 hidden layers"),
        "width 257": (dict(weights=[rnd(257, 4 * D), rnd(1, 257)], biases=[rnd(257), rnd(1)]),
                      ValueError, "width"),
        "biases count": (dict(biases=p["biases"][:-1]), ValueError, "biases"),
        "activation": (dict(activation="tanh"), ValueError, "activation"),
        "normalization": (dict(normalization="l1"), ValueError, "normalization"),
        "prelu without alphas": (dict(activation="prelu"), ValueError, "alphas"),
        "query not tensor": (dict(query=[[1.0]]), TypeError, "query"),
        "D = 0": (dict(query=rnd(B, 0), keys=rnd(B, T, 0)), ValueError, "with D >= 1"),
        "sparse query": (dict(query=q.to_sparse()), TypeError, "query must be a dense"),
        "scale None": (dict(scale=None), TypeError, "scale must be a real number"),
    }
    return q, k, lengths, p, cases


_Q, _K, _L, _P, BAD = _bad_cases()


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_clear_error(name):
    override, exc, words = BAD[name]
    kw = dict(query=_Q, keys=_K, lengths=_L, **_P)
    kw.update(override)
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        din_attention(**kw)


def _op_args(kw: dict) -> tuple:
    """din_attention's keyword arguments as the positional arguments of din_fused::din_fwd."""
    keys = ("alphas", "bn_weights", "bn_biases", "running_means", "running_vars")
    p = MLPParams(kw["weights"], kw["biases"], kw.get("activation", "sigmoid"), *(kw.get(k) for k in keys))
    return (kw["query"], kw["keys"], kw["lengths"], kw.get("mask"), *p.op_args(), p.activation,
            kw.get("normalization", "none"), 1.0, False, 1e-8)


# (the schema refuses a list for the query, and _op_args passes scale 1.0)
@pytest.mark.parametrize("name", [n for n in BAD if n not in ("query not tensor", "scale None")])
def test_op_called_directly_raises_the_same_clear_error(name):
    """torch.ops.din_fused.din_fwd by hand (as a traced or exported graph calls it) checks
    what din_attention checks, instead of reading by the wrong shapes."""
    override, exc, words = BAD[name]
    kw = dict(query=_Q, keys=_K, lengths=_L, **_P)
    kw.update(override)
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        torch.ops.din_fused.din_fwd(*_op_args(kw))


def _backward_args(act: str) -> tuple:
    q, k, lengths, p = problem(act=act)
    args = _op_args(dict(query=q, keys=k, lengths=lengths, **p))
    _out, scores, stats = torch.ops.din_fused.din_fwd(*args)
    params = args[4:9]  # weights, biases, alphas, bn_weights, bn_biases
    return [torch.ones_like(q), None, q, k, lengths, None, *params, stats, scores, act, "none", 1.0, False]


@pytest.mark.parametrize("act", ["sigmoid", "dice"])
@pytest.mark.parametrize("arg, bad, words", [
    (0, "rows", "grad_out must have shape"), (0, "int", "grad_out must be a floating-point"),
    (1, "rows", "grad_scores must have shape"), (12, "cols", "scores must have shape"),
    (11, "rows", "stats must have shape"), (4, "rows", "lengths must have shape"),
    (4, "values", r"lengths must lie in \[0, T\]"), (4, "none", "lengths must be an int32/int64"),
    (6, "weights", r"weights\[1\] must have shape")])
def test_backward_op_called_directly_checks_its_inputs(act, arg, bad, words):
    args = _backward_args(act)
    scores = args[12]
    if bad == "rows":
        args[arg] = (args[arg] if args[arg] is not None else scores)[:-1]
    elif bad == "cols":
        args[arg] = args[arg][:, :-1]
    elif bad == "int":
        args[arg] = args[arg].long()
    elif bad == "values":
        args[arg] = args[arg] + 100
    elif bad == "none":
        args[arg] = None
    else:
        args[6] = [args[6][0], args[6][1][:, :-1], *args[6][2:]]
    torch.ops.din_fused.din_bwd(*_backward_args(act))  # the unchanged call runs
    with pytest.raises((ValueError, TypeError), match=words):
        torch.ops.din_fused.din_bwd(*args)


def test_op_called_directly_refuses_meta_parameters_and_unused_lists():
    """A call that mixes meta and CPU tensors runs the fake implementation, which checks too
    (it would hand back uninitialised CPU tensors); lists the activation has no use for are
    refused (the fake would count gradients for them that the kernels do not return)."""
    q, k, lengths, p = problem()
    args = list(_op_args(dict(query=q, keys=k, lengths=lengths, **p)))
    meta = list(args)
    meta[4] = [w.to("meta") for w in args[4]]
    with pytest.raises(ValueError, match=r"weights\[0\] is on meta"):
        torch.ops.din_fused.din_fwd(*meta)
    back = _backward_args("sigmoid")
    back[11] = back[11].to("meta")
    with pytest.raises(ValueError, match="stats is on meta"):
        torch.ops.din_fused.din_bwd(*back)
    extra = list(args)
    extra[6] = [torch.ones(7, dtype=q.dtype)] * 2  # alphas, with sigmoid
    with pytest.raises(ValueError, match="alphas must be empty for activation 'sigmoid'"):
        torch.ops.din_fused.din_fwd(*extra)


def test_jagged_backward_op_called_directly_checks_offsets_and_weights():
    from jagged_cases import make_jagged

    q, v, off, rs, p, gout = make_jagged([3, 0, 2], [0, 2, 1, 0], 4, (5,), "sigmoid", "cpu", seed=0)
    p = {k: [t.detach() for t in x] if isinstance(x, list) else x for k, x in p.items()}
    mlp = MLPParams(p["weights"], p["biases"])
    attrs = ("sigmoid", "none", 1.0, False)
    _out, w, stats = torch.ops.din_fused.din_jagged_fwd(q, v, off, rs, *mlp.op_args(), *attrs, 1e-8)
    params = mlp.op_args()[:5]
    torch.ops.din_fused.din_jagged_bwd(gout, None, q, v, off, rs, *params, stats, w, *attrs)
    # R = 4 rows of lengths 3, 2, 0, 3
    rows_total = r"\[sum of the rows' lengths\] = \[8\]"  # rows of lengths 3, 2, 0, 3
    with pytest.raises(ValueError, match="flat_weights must have shape " + rows_total):
        torch.ops.din_fused.din_jagged_bwd(gout, None, q, v, off, rs, *params, stats, w[:-1], *attrs)
    with pytest.raises(ValueError, match="offsets must start at 0"):
        torch.ops.din_fused.din_jagged_bwd(gout, None, q, v, off + 1, rs, *params, stats, w, *attrs)
    with pytest.raises(ValueError, match="row_seq must lie in"):
        torch.ops.din_fused.din_jagged_bwd(gout, None, q, v, off, rs + 5, *params, stats, w, *attrs)
    with pytest.raises(TypeError, match="grad_weights must be a floating-point tensor"):
        torch.ops.din_fused.din_jagged_bwd(gout, w.long(), q, v, off, rs, *params, stats, w, *attrs)
    with pytest.raises(ValueError, match=r"flat_weights must have shape \[sum of the rows' lengths\], got"):
        torch.ops.din_fused.din_jagged_bwd(gout, None, q, v, off, rs, *params, stats, w[None], *attrs)


def test_mixed_devices_are_rejected():
    q, k, lengths, p = problem()
    with pytest.raises(ValueError, match="meta"):
        din_attention(q, k.to("meta"), lengths, **p)


def test_module_rejects_wrong_embedding_dim_and_layers():
    mod = FusedDINAttention(embedding_dim=4)
    with pytest.raises(ValueError, match="embedding_dim=4"):
        mod(torch.randn(2, 1, 5), torch.randn(2, 3, 5), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="query"):
        mod(torch.randn(2, 2, 4), torch.randn(2, 3, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="att_hidden_units"):
        FusedDINAttention(att_hidden_units=(8, 8, 8, 8, 8))
    with pytest.raises(ValueError, match="att_hidden_units"):
        FusedDINAttention(att_hidden_units=(300,))
    with pytest.raises(ValueError, match="att_activation"):
        FusedDINAttention(att_activation="tanh")


def test_dice_training_needs_two_positions():
    q, k, _, p = problem(act="dice")
    with pytest.raises(ValueError, match="at least 2 valid positions"):
        din_attention(q, k, torch.tensor([0, 1, 0, 0]), **p, training=True)


def test_cuda_tensor_without_cuda_build_says_how_to_rebuild():
    info = din_fused.build_info()
    if info["cuda"]:
        # CUDA compiled in: the device query must agree with torch (the CPU emulation of
        # the CUDA kernels, which tests/sanitize.sh installs as _C, reports its own device).
        if info["cuda_archs"] != "emulated":
            assert info["cuda_devices"] == torch.cuda.device_count()
        return
    with pytest.raises(RuntimeError, match="DIN_FUSED_CUDA=1"):
        din_fused._C.forward({"rows": 1, "dim": 1, "hidden": [1], "is_cuda": True})


# ---------------------------------------------------------------------------------------
# Padding never leaks, edge shapes
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ["sigmoid", "dice"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_padding_never_leaks(use_mask, act, norm, device):
    q, k, lengths, p = problem(B=6, T=8, act=act, device=device)
    valid = torch.arange(8, device=device)[None] < lengths[:, None]
    mask = None
    if use_mask:
        mask = torch.rand(6, 8, device=device) < 0.5
        valid, lengths = mask, None
    poison = k.clone()
    poison[~valid] = torch.tensor([math.nan, math.inf, -math.inf, 1e30], dtype=k.dtype,
                                  device=device).repeat(64)[: int((~valid).sum()) * 5].reshape(-1, 5)
    kw = dict(normalization=norm, training=act == "dice", return_scores=True)
    outs = []
    for keys in (k, poison):
        kk = keys.clone().requires_grad_()
        pp = {n: ([t.clone() for t in v] if isinstance(v, list) else v) for n, v in p.items()}
        out, w = din_attention(q, kk, lengths, mask, **pp, **kw)
        out.sum().backward()
        outs.append((out, w, kk.grad))
    for a, b in zip(outs[0], outs[1]):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)
    assert torch.all(outs[1][2][~valid] == 0)
    assert torch.all(outs[1][1][~valid] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_batch_zero_and_t_one(device):
    q, k, _, p = problem(device=device)
    lengths = torch.zeros(4, dtype=torch.int64, device=device)
    for norm in ("none", "softmax"):
        out, w = din_attention(q, k, lengths, **p, normalization=norm, return_scores=True)
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(w, torch.zeros_like(w))
    qq = q[:0].clone().requires_grad_()
    out = din_attention(qq, k[:0], lengths[:0], **p)
    assert out.shape == (0, 5)
    out.sum().backward()
    assert qq.grad.shape == (0, 5)
    q1, k1 = q.clone().requires_grad_(), k[:, :1].clone().requires_grad_()
    out = din_attention(q1, k1, torch.ones(4, dtype=torch.int32, device=device), **p,
                        normalization="softmax")
    torch.testing.assert_close(out, k1[:, 0].detach(), rtol=0, atol=1e-12)  # one key, weight 1


def test_long_sequence():
    # T in the hundreds of thousands: no [B,T,H] intermediates, nothing quadratic.
    B, T, D = 2, 300_000, 4
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, D, generator=gen)
    k = torch.randn(B, T, D, generator=gen)
    lengths = torch.tensor([T, T // 3])
    p = random_params(D, (4,), "sigmoid", dtype=torch.float32, gen=gen, requires_grad=False)
    out = din_attention(q, k, lengths, **p, normalization="softmax")
    p64 = {n: ([t.double() for t in v] if isinstance(v, list) else v) for n, v in p.items()}
    ref = din_attention_ref(q.double(), k.double(), lengths, **p64, normalization="softmax")
    assert max_rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_on_cpu_compute_in_float32(dtype):
    q, k, lengths, p = problem(dtype=torch.float64)
    qh, kh = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
    ph = {n: ([t.to(dtype) for t in v] if isinstance(v, list) else v) for n, v in p.items()}
    out = din_attention(qh, kh, lengths, **ph)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert qh.grad.dtype == dtype and kh.grad.dtype == dtype
    # Same as float32 compute on the rounded inputs, rounded once at the end.
    p32 = {n: ([t.float() for t in v] if isinstance(v, list) else v) for n, v in ph.items()}
    ref = din_attention(qh.detach().float(), kh.detach().float(), lengths, **p32)
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)


def test_noncontiguous_and_strided_inputs():
    q, k, lengths, p = problem(B=5, T=7, D=6)
    big_k = torch.randn(5, 14, 12, dtype=torch.float64)
    big_k[:, ::2, ::2] = k
    strided_k = big_k[:, ::2, ::2]
    strided_q = torch.randn(6, 5, dtype=torch.float64).copy_(q.t()).t()
    assert not strided_k.is_contiguous() and not strided_q.is_contiguous()
    lengths_strided = torch.stack([lengths, lengths], 1)[:, 0]
    wt = [w.t().contiguous().t() for w in p["weights"]]
    out = din_attention(strided_q, strided_k, lengths_strided, **{**p, "weights": wt})
    assert max_rel_err(out, din_attention_ref(q, k, lengths, **p)) <= TOL64


def test_build_info_and_no_libtorch_link():
    info = din_fused.build_info()
    for key in ("cuda", "cuda_archs", "nvcc_version", "cxx_compiler", "threading"):
        assert key in info
    lib = Path(din_fused._C.__file__)
    ldd = subprocess.run(["ldd", str(lib)], capture_output=True, text=True).stdout
    assert "libtorch" not in ldd and "libc10" not in ldd, ldd


# ---------------------------------------------------------------------------------------
# Issue 14 / issue 8 defects
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["sigmoid", "dice"])
@pytest.mark.parametrize("validity", ["lengths", "mask", "none"])
def test_empty_sequences_T0_give_zeros_like_reference(validity, act):
    q, _, _, p = problem(act=act)
    p = {k: [t.detach().requires_grad_(k not in ("running_means", "running_vars")) for t in v]
         if isinstance(v, list) else v for k, v in p.items()}
    B, D = q.shape
    k = torch.zeros(B, 0, D, dtype=q.dtype, requires_grad=True)
    lengths = torch.zeros(B, dtype=torch.int64) if validity == "lengths" else None
    mask = torch.zeros(B, 0, dtype=torch.bool) if validity == "mask" else None
    qq = q.clone().requires_grad_()
    out, w = din_attention(qq, k, lengths, mask, **p, normalization="softmax", return_scores=True)
    ref, wr = din_attention_ref(q, k, lengths, mask, **p, normalization="softmax", return_scores=True)
    assert torch.equal(out, ref) and torch.equal(out, torch.zeros(B, D, dtype=q.dtype))
    assert w.shape == wr.shape == (B, 0)
    grads = torch.autograd.grad(out.sum(), [qq, *p["weights"]])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    mod = FusedDINAttention(embedding_dim=D, att_hidden_units=(7, 3), att_activation=act).double().eval()
    assert torch.equal(mod(q[:, None], k, torch.zeros(B, 1)), torch.zeros(B, 1, D, dtype=q.dtype))


def test_forward_mode_ad_is_refused_not_zero():
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp

    q, k, lengths, p = problem()

    def f(x):
        return din_attention(x, k, lengths, **p)

    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        jvp(f, (q,), (torch.ones_like(q),))
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            f(fwAD.make_dual(q, torch.ones_like(q)))
    assert f(q).shape == q.shape  # plain calls are untouched


@pytest.mark.parametrize("act, name", [("prelu", "alphas"), ("dice", "alphas"), ("dice", "bn_weights"),
                                       ("dice", "bn_biases"), ("dice", "running_means"),
                                       ("dice", "running_vars")])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_forward_mode_ad_through_any_parameter_is_refused(act, name, layout):
    """A tangent on any tensor the op reads, not only the query, keys, weights and biases: the
    op would treat it as a constant and drop it."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp

    q, k, lengths, p = problem(act=act)
    values = torch.cat([k[b, :n] for b, n in enumerate(lengths.tolist())])
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])

    def f(t):
        kw = {**p, name: [t, *p[name][1:]]}
        if layout == "padded":
            return din_attention(q, k, lengths, **kw)
        return din_fused.din_attention_jagged(q, values, offsets, **kw)

    t0 = p[name][0]
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        jvp(f, (t0,), (torch.ones_like(t0),))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        f(fwAD.make_dual(t0, torch.ones_like(t0)))


@pytest.mark.parametrize("transform", ["grad", "vjp", "vmap"])
def test_torch_func_transforms_are_refused_by_name(transform):
    """torch.func.grad/vjp and vmap fail inside torch on the op (no setup_context, no batching
    rule): the call says so in words, and points at torch.autograd and the reference."""
    from torch import func

    q, k, lengths, p = problem()

    def f(x):
        return din_attention(x, k, lengths, **p)

    words = "torch.func.vmap" if transform == "vmap" else "torch.func.grad / vjp"
    with pytest.raises(NotImplementedError, match=f"does not run under {words}"):
        if transform == "grad":
            func.grad(lambda x: f(x).sum())(q)
        elif transform == "vjp":
            func.vjp(f, q)
        else:
            func.vmap(f)(q[None].expand(2, *q.shape))
    if transform == "vmap":  # over an index tensor only: refused the same way
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        values = torch.randn(int(offsets[-1]), k.shape[2], dtype=k.dtype)
        mask = torch.ones_like(k[..., 0], dtype=torch.bool)
        for g, x in ((lambda L: din_attention(q, k, L, **p), lengths),
                     (lambda m: din_attention(q, k, mask=m, **p), mask),
                     (lambda o: din_fused.din_attention_jagged(q, values, o, **p), offsets)):
            with pytest.raises(NotImplementedError, match=f"does not run under {words}"):
                func.vmap(g)(x[None].expand(2, *x.shape))


def test_batched_backward_is_refused_by_name():
    """torch.autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) hand the backward
    torch's legacy batched tensors, which have no memory to read: a NotImplementedError that
    says what to use, where the kernel call failed on a data pointer."""
    q, k, lengths, p = problem()
    q.requires_grad_()
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    values = torch.randn(int(offsets[-1]), k.shape[2], dtype=k.dtype)
    padded = lambda x: din_attention(x, k, lengths, **p)  # noqa: E731
    for f in (padded, lambda x: din_fused.din_attention_jagged(x, values, offsets, **p)):
        eye = torch.eye(q.numel(), dtype=q.dtype).reshape(-1, *q.shape)
        with pytest.raises(NotImplementedError, match="no batched backward.*vectorize=False"):
            torch.autograd.grad(f(q), q, eye, is_grads_batched=True)
        with pytest.raises(NotImplementedError, match="no batched backward"):
            torch.autograd.functional.jacobian(f, q, vectorize=True)
    ref = torch.autograd.functional.jacobian(lambda x: din_attention_ref(x, k, lengths, **p), q)
    torch.testing.assert_close(torch.autograd.functional.jacobian(padded, q), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("where", ["query", "keys", "values", "weight", "grad_out", "module"])
def test_negative_views_are_read_as_their_values(where):
    """A negative view (torch._neg_view(x), what x.conj().imag gives) shares x's memory with a
    'negate' flag. The kernels read memory, so it was read as x: silently wrong outputs and
    gradients. Now equal to the same call on a materialised copy, to float64 rounding."""
    q, k, lengths, p = problem()
    neg = torch._neg_view

    def run(q, k, p, gout=None, layout="padded"):
        q = q.detach().requires_grad_()
        if layout == "padded":
            out = din_attention(q, k, lengths, **p)
        else:
            offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            out = din_fused.din_attention_jagged(q, k, offsets, **p)
        (dq,) = torch.autograd.grad(out, q, torch.ones_like(out) if gout is None else gout)
        return out, dq

    if where == "module":
        m = FusedDINAttention(k.shape[2], (7, 3), "prelu").double().eval()
        with torch.no_grad():
            a, b = m(neg(q)[:, None], k, lengths[:, None]), m(-q[:, None], k, lengths[:, None])
        assert torch.equal(a, b)
        return
    if where == "values":
        values = torch.randn(int(lengths.sum()), k.shape[2], dtype=k.dtype)
        got, want = run(q, neg(values), p, layout="jagged"), run(q, -values, p, layout="jagged")
    elif where == "weight":
        w = p["weights"][0]
        got = run(q, k, {**p, "weights": [neg(w), *p["weights"][1:]]})
        want = run(q, k, {**p, "weights": [-w, *p["weights"][1:]]})
    elif where == "grad_out":
        g = torch.randn_like(q)
        got, want = run(q, k, p, gout=neg(g)), run(q, k, p, gout=-g)
    else:
        got = run(neg(q), k, p) if where == "query" else run(q, neg(k), p)
        want = run(-q, k, p) if where == "query" else run(q, -k, p)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_inference_plan_sees_a_reinterpreting_or_negative_data_swap():
    """The eval/no_grad plan keys on each parameter's pointer, shape and strides; a .data swap to
    a negative view or a reinterpreting view keeps all three. Such a swap is now seen: the negative
    view's values are used, and a complex view is refused as the general path refuses it."""
    torch.manual_seed(0)
    m = FusedDINAttention(5, (8, 4), "sigmoid").double().eval()
    q, k = torch.randn(3, 1, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    lengths = torch.tensor([[4], [1], [0]])
    lin = m.local_att.dnn.linears[0]
    with torch.no_grad():
        m(q, k, lengths)  # builds the plan
        w = lin.weight.data
        lin.weight.data = torch._neg_view(w)
        got = m(q, k, lengths)
        lin.weight.data = (-w).contiguous()
        assert torch.equal(got, m(q, k, lengths))
        lin.weight.data = w.view(torch.complex64)
        with pytest.raises(TypeError, match=r"weights\[0\] must be floating point"):
            m(q, k, lengths)


def test_scale_tensor_requiring_grad_is_refused_and_constant_tensor_works():
    q, k, lengths, p = problem()
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="scale"):
        din_attention(q, k, lengths, **p, normalization="softmax", scale=s)
    got = din_attention(q, k, lengths, **p, normalization="softmax", scale=s.detach())
    want = din_attention_ref(q, k, lengths, **p, normalization="softmax", scale=0.7)
    assert max_rel_err(got, want) <= TOL64


def test_lengths_as_python_list_is_a_clear_type_error():
    q, k, lengths, p = problem()
    with pytest.raises(TypeError, match="lengths must be an int32/int64 torch.Tensor"):
        din_attention(q, k, lengths.tolist(), **p)


def test_functional_momentum_none_in_training_is_explained():
    q, k, lengths, p = problem(act="dice")
    with pytest.raises(ValueError, match="momentum=None"):
        din_attention(q, k, lengths, **p, training=True, momentum=None)


# ---------------------------------------------------------------------------------------
# Cheap eager calls (issue 10): a no-grad eager call skips the dispatcher, nothing else.
# ---------------------------------------------------------------------------------------
def _spy_impls(monkeypatch):
    from din_fused import ops
    calls = []
    for op, fn in list(ops._IMPLS.items()):
        def spy(*args, _fn=fn):
            calls.append(_fn)
            return _fn(*args)
        monkeypatch.setitem(ops._IMPLS, op, spy)
    return calls


def _general_path(monkeypatch):
    """The module's general path: no cached small-inference plan."""
    monkeypatch.setattr(FusedDINAttention, "_small_inference", lambda self, *a: None)


def _spy_plan(monkeypatch, method: str = "forward") -> list:
    """A list that grows by one per call that runs through ops.InferencePlan.<method>
    (forward: padded, forward_jagged: values/offsets/row_seq)."""
    calls = []
    plan = din_fused.ops.InferencePlan
    real = getattr(plan, method)
    monkeypatch.setattr(plan, method, lambda self, *a: calls.append(1) or real(self, *a))
    return calls


def test_no_grad_eager_call_skips_the_dispatcher_with_the_same_results(monkeypatch):
    q, k, lengths, p = problem(act="prelu")
    calls = _spy_impls(monkeypatch)
    with torch.no_grad():
        fast, wf = din_attention(q, k, lengths, **p, normalization="softmax", return_scores=True)
    assert len(calls) == 1
    qq = q.clone().requires_grad_()
    slow, ws = din_attention(qq, k, lengths, **p, normalization="softmax", return_scores=True)
    assert len(calls) == 2  # gradients needed: the implementation under _EagerGrad
    assert type(slow.grad_fn).__name__ == "_EagerGradBackward"
    assert torch.equal(fast, slow.detach()) and torch.equal(wf, ws.detach())
    with torch.no_grad(), torch.device("cpu"):  # a torch-function mode: dispatcher again
        din_attention(q, k, lengths, **p)
    assert len(calls) == 2
    mod = FusedDINAttention(embedding_dim=k.shape[-1], att_hidden_units=(7, 3)).double().eval()
    _general_path(monkeypatch)
    with torch.no_grad():
        mod(q, k, lengths)  # nn.Parameter inputs qualify (the module's general path)
    assert len(calls) == 3


@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("act, norm, training", [("prelu", "softmax", False), ("dice", "none", True),
                                                 ("sigmoid", "softmax", False)])
def test_eager_autograd_equals_the_registered_autograd(layout, act, norm, training):
    # Plain eager calls that need gradients run _EagerGrad; under a torch-function mode the
    # same call goes through the dispatcher and the op's registered autograd.  Outputs,
    # weights, every gradient and the running statistics must agree bitwise.
    def run(mode):
        q, k, lengths, p = problem(act=act)
        p = {key: [t.requires_grad_() for t in v] if key in ("weights", "biases", "alphas", "bn_weights",
                                                               "bn_biases") else v for key, v in p.items()}
        q.requires_grad_()
        k.requires_grad_()
        with mode:
            if layout == "padded":
                out, w = din_attention(q, k, lengths, **p, normalization=norm, training=training,
                                       return_scores=True)
            else:
                offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
                values = torch.cat([k[b, :lengths[b]] for b in range(k.shape[0])])
                out, w, _ = din_fused.din_attention_jagged(q, values, offsets, **p, normalization=norm,
                                                           training=training, return_scores=True)
            leaves = [q, values if layout == "jagged" else k] + [t for key in ("weights", "biases", "alphas",
                      "bn_weights", "bn_biases") for t in p.get(key, [])]
            grads = torch.autograd.grad((out * out).sum() + (w * w).sum(), leaves, allow_unused=True)
        name = type(out.grad_fn).__name__
        return name, [out, w, *grads, *p.get("running_means", [])]

    eager_name, eager = run(contextlib.nullcontext())
    op_name, op = run(torch.device("cpu"))
    assert eager_name == "_EagerGradBackward" and op_name != eager_name
    for a, b in zip(eager, op):
        assert (a is None and b is None) or torch.equal(a, b)


def test_eager_autograd_refuses_double_backward():
    q, k, lengths, p = problem()
    q.requires_grad_()
    out = din_attention(q, k, lengths, **p)
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|does not require grad"):
        g.sum().backward()


@pytest.mark.parametrize("bad", [-1, 7])
def test_fast_path_still_checks_lengths(bad, monkeypatch):
    q, k, lengths, p = problem()
    calls = _spy_impls(monkeypatch)
    lengths = lengths.clone()
    lengths[2] = bad
    with torch.no_grad(), pytest.raises(ValueError, match="lengths must lie in"):
        din_attention(q, k, lengths, **p)
    assert len(calls) == 1


def test_jit_trace_goes_through_the_op(monkeypatch):
    q, k, lengths, p = problem()
    calls = _spy_impls(monkeypatch)
    with torch.no_grad():
        traced = torch.jit.trace(lambda q, k: din_attention(q, k, lengths, **p), (q, k), check_trace=False)
        q2, k2 = torch.randn_like(q), torch.randn_like(k)
        assert torch.equal(traced(q2, k2), din_attention(q2, k2, lengths, **p))
    assert len(calls) == 1  # only the untraced eager call


@pytest.mark.parametrize("route", ["cpu kernel", "grad", "mask", "dice training", "T=0", "every row"])
@pytest.mark.parametrize("bad", [-1, 7, 2**40, -(2**40)])
def test_every_route_of_the_lengths_check_catches_bad_lengths(route, bad):
    """The padded op checks lengths in the CPU forward kernel (no grad, no mask, not
    training Dice) and in Python elsewhere: every route rejects every bad value, at any row."""
    act = "dice" if route == "dice training" else "sigmoid"
    q, k, lengths, p = problem(act=act, T=0 if route == "T=0" else 6)
    lengths = lengths.clone().clamp(max=k.shape[1])
    rows = range(lengths.numel()) if route == "every row" else [2]
    for r in rows:
        bad_lengths = lengths.clone()
        bad_lengths[r] = bad
        kwargs = dict(p)
        if route == "mask":
            kwargs["mask"] = torch.ones(k.shape[:2], dtype=torch.bool)
        qq = q.clone().requires_grad_(route == "grad")
        with torch.set_grad_enabled(route == "grad"), pytest.raises(ValueError, match="lengths must lie in"):
            din_attention(qq, k, bad_lengths, training=route == "dice training", **kwargs)


def _fused_and_reference(q, k, lengths, hidden, act="prelu"):
    """A float64 FusedDINAttention, its impl="reference" twin, and agree(): copies the fused
    module's current state into the twin and compares their outputs on (q, k, lengths)."""
    kw = dict(embedding_dim=k.shape[-1], att_hidden_units=hidden, att_activation=act)
    mod = FusedDINAttention(**kw).double().eval()
    ref = FusedDINAttention(**kw, impl="reference").double().eval()

    def agree():
        ref.load_state_dict(mod.state_dict())
        with torch.no_grad():
            assert max_rel_err(mod(q, k, lengths), ref(q, k, lengths)) < TOL64

    return mod, ref, agree


def test_module_parameter_bundle_follows_reassigned_and_swapped_parameters():
    """FusedDINAttention caches its parameter bundle between calls; it must follow every
    way a parameter can change: in place, .data, reassignment, load_state_dict(assign=True),
    a swapped layer and torch.func.functional_call."""
    q, k, lengths, _ = problem(act="prelu")
    mod, ref, agree = _fused_and_reference(q, k, lengths, (7, 3))
    agree()
    dense = mod.local_att.dense
    with torch.no_grad():
        dense.weight.mul_(-2.0)
    agree()
    dense.weight.data = torch.randn_like(dense.weight)
    agree()
    dense.weight = torch.nn.Parameter(torch.randn_like(dense.weight))
    agree()
    mod.load_state_dict({n: torch.randn_like(t) if t.is_floating_point() else t
                         for n, t in mod.state_dict().items()}, assign=True)
    agree()
    mod.local_att.dnn.linears[1] = torch.nn.Linear(7, 3).double()
    agree()
    swapped = {n: torch.randn_like(t) for n, t in mod.named_parameters()}
    with torch.no_grad():
        got = torch.func.functional_call(mod, swapped, (q, k, lengths))
        ref.load_state_dict(swapped, strict=False)
        assert max_rel_err(got, ref(q, k, lengths)) < TOL64


@pytest.mark.parametrize("act", ["sigmoid", "relu", "prelu", "dice"])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_small_inference_path_equals_the_general_path_bitwise(act, norm, dtype, threads, monkeypatch):
    """Eager no_grad eval calls of FusedDINAttention take a cached-plan path (the same kernel
    call, parameters checked once): it must give bitwise the general path's results, for
    query [B, E] and [B, 1, E], lengths [B] and [B, 1], lengths above T (meaning T), T = 1."""
    gen = torch.Generator().manual_seed(5)
    mod = FusedDINAttention(embedding_dim=37, att_hidden_units=(9, 5), att_activation=act,
                            weight_normalization=norm).to(dtype).eval()
    if act == "dice":
        randomise_(mod, gen)
    plan_calls = _spy_plan(monkeypatch)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shapes = [(5, 7, True, True), (3, 1, False, False), (9, 30, True, False), (1, 4, False, True)]
        for B, T, q3, l2 in shapes:
            q = torch.randn(B, 1, 37, generator=gen, dtype=dtype)
            q = q if q3 else q[:, 0].contiguous()
            k = torch.randn(B, T, 37, generator=gen, dtype=dtype)
            lengths = torch.randint(0, T + 3, (B, 1) if l2 else (B,), generator=gen)  # some above T
            with torch.no_grad():
                fast = mod(q, k, lengths)
                mod.return_score = True
                fast_w = mod(q, k, lengths)
                mod.return_score = False
            with monkeypatch.context() as m:
                _general_path(m)
                with torch.no_grad():
                    slow = mod(q, k, lengths)
                    mod.return_score = True
                    slow_w = mod(q, k, lengths)
                    mod.return_score = False
            assert fast.shape == slow.shape and fast_w.shape == slow_w.shape
            assert torch.equal(fast, slow) and torch.equal(fast_w, slow_w)
    finally:
        torch.set_num_threads(old)
    assert len(plan_calls) == 8


def test_small_inference_path_is_only_taken_where_it_applies(monkeypatch):
    mod = FusedDINAttention(embedding_dim=6, att_hidden_units=(4,)).eval()
    calls = _spy_plan(monkeypatch)
    q, k = torch.randn(3, 1, 6), torch.randn(3, 5, 6)
    lengths = torch.tensor([1, 5, 0])
    with torch.no_grad():
        mod(q, k, lengths)
    assert len(calls) == 1
    mod(q, k, lengths)  # grad enabled
    with torch.no_grad():
        mod(q, k.transpose(0, 1).contiguous().transpose(0, 1), lengths)  # non-contiguous keys
        mod(q, k, lengths.int())  # int32 lengths
        mod(q, k, lengths.float())  # DeepCTR's float lengths
        mod(q, k, lengths, mask=torch.ones(3, 5, dtype=torch.bool))
        mod.train()
        mod(q, k, lengths)
    assert len(calls) == 1
    dice = FusedDINAttention(embedding_dim=6, att_hidden_units=(4,), att_activation="dice").eval()
    with torch.no_grad():
        dice(q, k, lengths)  # eval Dice reads its running statistics: the plan covers it
        dice.train()(q, k, lengths)  # batch statistics: the general path
    assert len(calls) == 2
    with torch.no_grad(), pytest.raises(ValueError, match="lengths must lie in"):
        mod.eval()(q, k, torch.tensor([1, -1, 2]))
    assert len(calls) == 3


def test_small_inference_path_follows_parameter_changes():
    q, k = torch.randn(4, 1, 6, dtype=torch.float64), torch.randn(4, 5, 6, dtype=torch.float64)
    lengths = torch.tensor([[1], [5], [0], [3]])
    mod, ref, agree = _fused_and_reference(q, k, lengths, (4, 3))
    agree()
    lin = mod.local_att.dnn.linears[0]
    with torch.no_grad():
        lin.weight.mul_(3.0)
    agree()
    lin.weight.data = torch.randn_like(lin.weight)
    agree()
    lin.weight.data = torch.randn(2, 24, dtype=torch.float64)  # a different shape: the plan is rebuilt
    with torch.no_grad(), pytest.raises(ValueError, match=r"biases\[0\] must have shape \[2\]"):
        mod(q, k, lengths)
    lin.weight.data = torch.randn(4, 24, dtype=torch.float64)
    agree()
    alpha = mod.local_att.dnn.activation_layers[0].weight  # PReLU's single alpha: the plan reads a copy
    with torch.no_grad():
        alpha.fill_(0.7)
    agree()
    alpha.data.fill_(5.0)  # a write that moves no version counter
    agree()
    alpha.data.fill_(float("nan"))
    with torch.no_grad():
        nan = mod(q, k, lengths).isnan().all(-1).flatten()
    assert torch.equal(nan, lengths.flatten() > 0)  # rows with keys NaN, the empty one 0, as the reference
    alpha.data.fill_(-0.3)
    agree()
    mod.scale = 2.0
    mod.normalization = "softmax"
    ref.scale, ref.normalization = 2.0, "softmax"
    agree()


@pytest.mark.parametrize("act", ["prelu", "dice", "sigmoid"])
def test_small_inference_path_serves_modules_made_in_inference_mode(act, monkeypatch):
    """A module built (or loaded) under torch.inference_mode() holds inference tensors, which have
    no version counter: the cached plan serves it, PReLU's single alpha included, and follows a
    change of that alpha made under inference mode."""
    q, k = torch.randn(4, 1, 6), torch.randn(4, 5, 6)
    lengths = torch.tensor([1, 5, 0, 3])
    calls = _spy_plan(monkeypatch)
    with torch.inference_mode():
        mod = FusedDINAttention(embedding_dim=6, att_hidden_units=(4, 3), att_activation=act).eval()
        fast = mod(q, k, lengths)
        with monkeypatch.context() as m:
            _general_path(m)
            assert torch.equal(fast, mod(q, k, lengths))
        if act == "prelu":
            mod.local_att.dnn.activation_layers[1].weight.fill_(-2.0)
            fast = mod(q, k, lengths)
            with monkeypatch.context() as m:
                _general_path(m)
                assert torch.equal(fast, mod(q, k, lengths))
    assert len(calls) == (2 if act == "prelu" else 1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_small_inference_path_leaves_other_dtypes_to_the_general_paths_errors(dtype, layout):
    """Eval, no_grad, CPU: a query and keys of a dtype the kernels do not take get the general
    path's TypeError, as with gradients on, not an error from inside the plan."""
    mod = FusedDINAttention(embedding_dim=6, att_hidden_units=(4,)).eval()
    q, k = torch.ones(3, 1, 6, dtype=dtype), torch.ones(3, 5, 6, dtype=dtype)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(TypeError, match="floating-point"):
            if layout == "padded":
                mod(q, k, torch.tensor([1, 5, 0]))
            else:
                mod(q, k.reshape(15, 6), offsets=torch.tensor([0, 5, 10, 15]))


def test_small_inference_path_follows_a_transposed_data_swap():
    """A square weight's .data swapped for its own transpose keeps the pointer and the shape: the
    plan must see the strides change (the general path reads the transpose)."""
    q, k = torch.randn(4, 1, 6, dtype=torch.float64), torch.randn(4, 5, 6, dtype=torch.float64)
    lengths = torch.tensor([[1], [5], [0], [3]])
    mod, ref, agree = _fused_and_reference(q, k, lengths, (4, 4), act="relu")
    agree()
    square = mod.local_att.dnn.linears[1].weight
    square.data = square.data.t()
    agree()


def test_small_inference_path_follows_dice_statistics_changes(monkeypatch):
    """Eval-mode Dice through the cached plan reads its running statistics on every call: an
    in-place update, a training step, a .data write or swap, and a new BatchNorm eps all show."""
    q, k = torch.randn(4, 1, 6, dtype=torch.float64), torch.randn(4, 5, 6, dtype=torch.float64)
    lengths = torch.tensor([[1], [5], [0], [3]])
    mod, ref, agree = _fused_and_reference(q, k, lengths, (4, 3), act="dice")
    calls = _spy_plan(monkeypatch)
    randomise_(mod, torch.Generator().manual_seed(2))
    agree()
    bns = [a.bn for a in mod.local_att.dnn.activation_layers]
    with torch.no_grad():
        bns[0].running_var.mul_(3.0)
        bns[1].running_mean.add_(0.5)
    agree()
    bns[0].running_var.data.fill_(0.25)  # no version bump: the plan computes 1/sqrt(var + eps) per call
    agree()
    bns[1].running_var.data = torch.full_like(bns[1].running_var, 4.0)
    agree()
    for a in [*mod.local_att.dnn.activation_layers, *ref.local_att.dnn.activation_layers]:
        a.bn.eps = 0.5  # not in the state dict: the twin gets it by hand
    agree()
    mod.train()
    mod(q, k, lengths).sum().backward()  # moves the running statistics
    mod.eval()
    agree()
    # A new BatchNorm object (the bundle keeps the first one for its eps and momentum): its
    # statistics and its eps show, here 0.25 in every layer of both twins.
    new_bn = torch.nn.BatchNorm1d(4, eps=0.25).double().eval()
    with torch.no_grad():
        new_bn.running_var.fill_(1.5)
        new_bn.running_mean.fill_(-0.2)
    mod.local_att.dnn.activation_layers[0].bn = new_bn
    for a in [*mod.local_att.dnn.activation_layers, *ref.local_att.dnn.activation_layers]:
        a.bn.eps = 0.25
    agree()
    assert len(calls) == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-8, 1e-3, 0.7])
def test_small_inference_dice_invstd_is_the_general_paths_bitwise(dtype, eps, monkeypatch):
    """The plan's kernel takes 1/sqrt(running_var + eps) itself (DinParams::bn_var), the
    general path with torch's add and rsqrt (_eval_invstd): the same correctly rounded operations.
    Full-width layers (256, 256, vector bodies and no tail) and (37, 3) (tails), variances
    from 1e-7 to 1e5, so that an ulp's difference in any of them shows in the weights."""
    gen = torch.Generator().manual_seed(23)
    for hidden in [(256, 256), (37, 3)]:
        mod = FusedDINAttention(embedding_dim=5, att_hidden_units=hidden, att_activation="dice")
        mod = mod.to(dtype).eval()
        randomise_(mod, gen)
        for a in mod.local_att.dnn.activation_layers:
            a.bn.eps = eps
            a.bn.running_var.copy_(10.0 ** (torch.rand(a.bn.running_var.shape, generator=gen) * 12 - 7))
        q = torch.randn(6, 1, 5, generator=gen, dtype=dtype)
        k = torch.randn(6, 40, 5, generator=gen, dtype=dtype)
        lengths = torch.randint(1, 41, (6,), generator=gen)
        calls = _spy_plan(monkeypatch)
        mod.return_score = True
        with torch.no_grad():
            fast = mod(q, k, lengths)
            with monkeypatch.context() as m:
                _general_path(m)
                slow = mod(q, k, lengths)
        assert len(calls) == 1
        assert torch.equal(fast, slow)
        monkeypatch.undo()


@pytest.mark.parametrize("bad", [-1, -(2**40)])
def test_module_small_inference_rejects_negative_lengths_at_every_row(bad):
    """The module's cached-plan path checks lengths inside the kernel (values above T mean T,
    as in DeepCTR-Torch): a negative length at any row is an error, never a silent zero."""
    mod = FusedDINAttention(embedding_dim=5, att_hidden_units=(7, 3)).double().eval()
    q, k, lengths, _ = problem()
    for r in range(lengths.numel()):
        bad_lengths = lengths.clone()
        bad_lengths[r] = bad
        with torch.no_grad(), pytest.raises(ValueError, match="lengths must lie in"):
            mod(q, k, bad_lengths)


@pytest.mark.parametrize("act", ["sigmoid", "prelu", "dice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_small_inference_jagged_path_equals_the_general_path_bitwise(act, dtype, threads, monkeypatch):
    """Eager no_grad eval calls with values/offsets[/row_seq] take the cached plan too: bitwise
    the general path's output, for per-row sequences (with empty ones), one history shared by
    every candidate, several shared ones, query [R, E] and [R, 1, E], and all-empty sequences."""
    gen = torch.Generator().manual_seed(11)
    mod = FusedDINAttention(embedding_dim=37, att_hidden_units=(9, 5), att_activation=act).to(dtype).eval()
    if act == "dice":
        randomise_(mod, gen)
    calls = _spy_plan(monkeypatch, "forward_jagged")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cases = [([3, 0, 7, 1], None), ([50], [0] * 9), ([4, 0, 6], [2, 0, 0, 1, 2]), ([0, 0], None),
                 ([1], [0])]
        for i, (lens, rs) in enumerate(cases):
            offsets = torch.tensor([0] + lens).cumsum(0)
            values = torch.randn(int(offsets[-1]), 37, generator=gen, dtype=dtype)
            row_seq = None if rs is None else torch.tensor(rs)
            R = len(lens) if rs is None else len(rs)
            q = torch.randn(R, 1, 37, generator=gen, dtype=dtype)
            q = q if i % 2 else q[:, 0].contiguous()
            with torch.no_grad():
                fast = mod(q, values, offsets=offsets, row_seq=row_seq)
            with monkeypatch.context() as m:
                _general_path(m)
                with torch.no_grad():
                    slow = mod(q, values, offsets=offsets, row_seq=row_seq)
            assert fast.shape == slow.shape == q.shape
            assert torch.equal(fast, slow)
    finally:
        torch.set_num_threads(old)
    assert len(calls) == 5


def test_small_inference_jagged_path_checks_offsets_and_row_seq(monkeypatch):
    """The cached-plan path still rejects every bad offsets/row_seq value, with the general
    path's messages, and leaves calls it does not cover to the general path."""
    mod = FusedDINAttention(embedding_dim=6, att_hidden_units=(4,)).eval()
    calls = _spy_plan(monkeypatch, "forward_jagged")
    values, q = torch.randn(5, 6), torch.randn(3, 1, 6)
    t = torch.tensor
    bad = [  # (offsets, row_seq, N, message)
        (t([1, 2, 4, 5]), None, 5, "offsets must start at 0"),
        (t([0, 3, 2, 5]), None, 5, r"must not decrease, got offsets\[1\] = 3 > offsets\[2\] = 2"),
        (t([0, 2, 4, 4]), None, 5, "offsets must end at N"),
        (t([0, 2, 5]), t([0, 2, 1]), 5, r"row_seq must lie in \[0, S\) = \[0, 2\)"),
        (t([0, 2, 5]), t([0, -1, 1]), 5, r"row_seq must lie in \[0, S\) = \[0, 2\)"),
        (t([0]), t([0, 0, 0]), 0, r"row_seq must lie in \[0, S\) = \[0, 0\)"),
        (t([3]), t([0, 0, 0]), 3, "offsets must start at 0"),  # S = 0: the offsets' errors come first
        (t([0]), t([0, 0, 0]), 3, "offsets must end at N")]
    for offsets, row_seq, N, msg in bad:
        with torch.no_grad(), pytest.raises(ValueError, match=msg):
            mod(q, values[:N], offsets=offsets, row_seq=row_seq)
    assert len(calls) == len(bad)
    with torch.no_grad(), pytest.raises(ValueError, match=r"offsets must have shape"):
        mod(q, values, offsets=torch.tensor(0))  # 0-d: the general path's error, not an IndexError
    offsets = torch.tensor([0, 2, 4, 5])
    with torch.no_grad():
        mod(q, values, offsets=offsets.int())  # int32 offsets: the general path
        mod(q, values, offsets=offsets[None].expand(2, 4)[0])  # a view is fine, still contiguous
        mod.return_score = True
        mod(q, values, offsets=offsets)  # weights wanted: the general path
        mod.return_score = False
        with pytest.raises(ValueError, match=r"offsets must have shape \[R\+1\]"):
            mod(q, values, offsets=offsets[:3])
    assert len(calls) == len(bad) + 1


@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_small_inference_path_refuses_forward_ad_like_the_general_path(layout):
    """no_grad does not turn forward-mode AD off: a dual input must still be refused (the op has
    no forward-mode derivative), not run through the cached plan with its tangent dropped."""
    import torch.autograd.forward_ad as fwAD

    mod = FusedDINAttention(embedding_dim=6, att_hidden_units=(4,)).eval()
    q = torch.randn(3, 1, 6)
    with fwAD.dual_level(), torch.no_grad(), pytest.raises(NotImplementedError, match="forward-mode"):
        qd = fwAD.make_dual(q, torch.randn_like(q))
        if layout == "padded":
            mod(qd, torch.randn(3, 5, 6), torch.tensor([1, 5, 0]))
        else:
            mod(qd, torch.randn(5, 6), offsets=torch.tensor([0, 2, 4, 5]))


def test_meta_tensors_get_the_fake_implementations_shapes():
    """Meta inputs (shape inference, e.g. a model built on the meta device) go through the
    dispatcher to the op's fake implementation: the kernels would need data."""
    q, k, lengths, p = problem(act="prelu")
    meta = {key: [t.to("meta") for t in v] if isinstance(v, list) else v for key, v in p.items()}
    out, w = din_attention(q.to("meta"), k.to("meta"), lengths.to("meta"), **meta, return_scores=True)
    assert out.is_meta and out.shape == q.shape and w.shape == lengths.shape + (k.shape[1],)


def test_module_embedding_dim_must_be_positive():
    with pytest.raises(ValueError, match="embedding_dim must be >= 1, got 0"):
        FusedDINAttention(embedding_dim=0)
