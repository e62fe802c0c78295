"""Fused op vs the float64 reference: values, gradients, scores, running statistics."""

import pytest
import torch
from common import (
    DEVICES,
    TOL64,
    clone_params,
    lowp_bound,
    max_rel_err,
    num_threads,
    param_tensors,
    random_lengths,
    random_params,
    rounded_params,
)

import din_fused
from din_fused.reference import din_attention_ref

# (B, T, D, hidden): odd sizes on purpose (D=37, T=1, H=(3,), four layers).
SHAPES = [(6, 9, 8, (16, 8)), (5, 1, 37, (3,)), (7, 13, 37, (12, 7, 5)), (3, 5, 5, (4, 6, 3, 2))]
ACTS = ["sigmoid", "relu", "prelu", "dice", "dice-train"]


def make_problem(B, T, D, hidden, act, validity, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    lengths = random_lengths(B, T, gen) if validity in ("lengths", "both") else None
    mask = None
    if validity in ("mask", "both"):
        mask = torch.rand(B, T, generator=gen) < 0.6
        mask[0] = False  # an empty row
    p = random_params(D, hidden, act.split("-")[0], dtype=torch.float64, gen=gen)
    gout = torch.randn(B, D, generator=gen, dtype=torch.float64)
    gsc = torch.randn(B, T, generator=gen, dtype=torch.float64)
    to = dict(device=device)
    return (q.to(**to), k.to(**to), None if lengths is None else lengths.to(**to),
            None if mask is None else mask.to(**to), p, gout.to(**to), gsc.to(**to))


def run(fn, q, k, lengths, mask, p, dtype, training, norm, use_scores, gout, gsc):
    """Forward + backward of fn with inputs cast to dtype; returns (out, w, grads, running)."""
    return run_forward(fn, q, k, lengths, mask, p, dtype, training, norm, use_scores, gout, gsc)()


def run_forward(fn, q, k, lengths, mask, p, dtype, training, norm, use_scores, gout, gsc):
    """run()'s forward now, and a function that runs its backward and returns run()'s result
    later; the function's .params are the parameters the forward took."""
    p = clone_params(p, dtype)
    for key in ("running_means", "running_vars"):
        if key in p:
            p[key] = [t.to(q.device) for t in p[key]]
    for key, v in p.items():
        if isinstance(v, list) and key not in ("running_means", "running_vars"):
            p[key] = [t.detach().to(q.device).requires_grad_() for t in v]
    qq = q.to(dtype).requires_grad_()
    kk = k.to(dtype).requires_grad_()
    out, w = fn(qq, kk, lengths, mask, **p, training=training, normalization=norm, scale=0.7,
                return_scores=True)
    loss = (out.double() * gout).sum()
    if use_scores:
        loss = loss + (w.double() * gsc).sum()

    def backward():
        grads = torch.autograd.grad(loss, [qq, kk, *param_tensors(p)])
        return out, w, grads, p.get("running_vars", []) + p.get("running_means", [])
    backward.params = p
    return backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("use_scores", [False, True])
@pytest.mark.parametrize("validity", ["lengths", "mask", "both"])
@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ACTS)
def test_matches_reference(act, norm, validity, use_scores, dtype, device):
    check_against_reference(act, norm, validity, use_scores, dtype, device)


def check_against_reference(act, norm, validity, use_scores, dtype, device):
    training = act == "dice-train"
    for i, (B, T, D, hidden) in enumerate(SHAPES):
        prob = make_problem(B, T, D, hidden, act, validity, dtype, device, seed=i)
        q, k, lengths, mask, p, gout, gsc = prob
        args = (q, k, lengths, mask, p)
        fused = run(din_fused.din_attention, *args, dtype, training, norm, use_scores, gout, gsc)
        ref64 = run(din_attention_ref, *args, torch.float64, training, norm, use_scores, gout, gsc)
        names = ["out", "scores"] + [f"grad{j}" for j in range(len(fused[2]))] + ["running"] * len(fused[3])
        got = [fused[0], fused[1], *fused[2], *fused[3]]
        want = [ref64[0], ref64[1], *ref64[2], *ref64[3]]
        if dtype == torch.float64:
            for name, g, w in zip(names, got, want):
                assert max_rel_err(g, w) <= TOL64, (name, (B, T, D, hidden), max_rel_err(g, w))
        else:
            reflp = run(din_attention_ref, *args, dtype, training, norm, use_scores, gout, gsc)
            base = [reflp[0], reflp[1], *reflp[2], *reflp[3]]
            rq, rk, rg, rs = (t.to(dtype).double() for t in (q, k, gout, gsc))
            ex = run(din_attention_ref, rq, rk, lengths, mask, rounded_params(p, dtype), torch.float64,
                     training, norm, use_scores, rg, rs)
            ideal = [ex[0], ex[1], *ex[2], *ex[3]]
            for name, g, w, r, e in zip(names, got, want, base, ideal):
                kind = "out" if name in ("out", "scores") else "grad"
                bound = lowp_bound(kind, dtype, w, r, e)
                assert max_rel_err(g, w) <= bound, (name, (B, T, D, hidden), max_rel_err(g, w), bound)


@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck(act, norm):
    B, T, D, hidden = 3, 4, 3, (4, 3)
    q, k, lengths, mask, p, _, _ = make_problem(B, T, D, hidden, act, "lengths", torch.float64, "cpu", 7)
    training = act == "dice-train"
    tensors = param_tensors(p)
    n_w = len(p["weights"])

    def f(q, k, *params):
        pp = dict(p)
        pp["weights"], pp["biases"] = list(params[:n_w]), list(params[n_w:2 * n_w])
        rest = list(params[2 * n_w:])
        L = n_w - 1
        for key in ("alphas", "bn_weights", "bn_biases"):
            if key in p:
                pp[key], rest = rest[:L], rest[L:]
        return din_fused.din_attention(q, k, lengths, **pp, training=training, normalization=norm,
                                       scale=1.3, return_scores=True)

    inputs = [q.requires_grad_(), k.requires_grad_(), *tensors]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("act", ["sigmoid", "prelu", "dice", "dice-train"])
def test_opcheck(act):
    q, k, lengths, mask, p, _, _ = make_problem(4, 5, 6, (8, 4), act, "both", torch.float64, "cpu", 3)
    dice = act.startswith("dice")
    args = (q.requires_grad_(), k.requires_grad_(), lengths, mask, p["weights"], p["biases"],
            p.get("alphas", []), p.get("bn_weights", []), p.get("bn_biases", []),
            p.get("running_means", []) if dice else [], p.get("running_vars", []) if dice else [],
            p["activation"], "softmax", 0.5, act == "dice-train", 1e-8)
    torch.library.opcheck(torch.ops.din_fused.din_fwd.default, args)


def test_opcheck_backward_with_a_transposed_weight():
    """The backward returns contiguous parameter gradients; its fake implementation promised a
    transposed weight's strides (empty_like), which opcheck and inductor's compiled backward
    refuse. A transposed weight is a valid input (a tied or sliced checkpoint)."""
    q, k, lengths, _, p, _, _ = make_problem(4, 5, 6, (8, 4), "sigmoid", "lengths", torch.float64, "cpu", 3)
    w0 = p["weights"][0].detach().t().contiguous().t()  # the same values, stored transposed
    assert not w0.is_contiguous()
    weights, biases = [w0, *(w.detach() for w in p["weights"][1:])], [b.detach() for b in p["biases"]]
    out, scores, stats = torch.ops.din_fused.din_fwd(q, k, lengths, None, weights, biases, [], [], [], [], [],
                                                     "sigmoid", "none", 1.0, False, 1e-8)
    args = (torch.randn_like(out), None, q, k, lengths, None, weights, biases, [], [], [], stats, scores,
            "sigmoid", "none", 1.0, False)
    torch.library.opcheck(torch.ops.din_fused.din_bwd.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["sigmoid", "dice-train"])
def test_thread_count_does_not_change_results(act, device):
    q, k, lengths, mask, p, gout, gsc = make_problem(33, 17, 9, (10, 6), act, "lengths", torch.float64,
                                                     device, 5)
    results = []
    for n in (1, 2, 3):
        with num_threads(n):
            results.append(run(din_fused.din_attention, q, k, lengths, mask, p, torch.float64,
                               act == "dice-train", "softmax", True, gout, gsc))
    for other in results[1:]:
        for a, b in zip([results[0][0], *results[0][2]], [other[0], *other[2]]):
            assert max_rel_err(a, b) <= TOL64


@pytest.mark.parametrize("act", ["sigmoid", "dice-train"])
def test_cpu_results_are_bitwise_reproducible(act):
    q, k, lengths, mask, p, gout, gsc = make_problem(41, 23, 9, (10, 6), act, "lengths", torch.float32,
                                                     "cpu", 9)
    runs = [run(din_fused.din_attention, q, k, lengths, mask, p, torch.float32, act == "dice-train",
                "softmax", True, gout, gsc) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip([runs[0][0], runs[0][1], *runs[0][2]], [other[0], other[1], *other[2]]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ["avx2", "generic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ACTS)
def test_lower_cpu_isa_paths_match_reference(act, norm, dtype, isa, monkeypatch):
    # The CPU kernel is compiled for AVX-512, AVX2 and baseline x86-64 and picks the
    # best at run time; DIN_FUSED_CPU_ISA (read per call) forces the lower paths.
    monkeypatch.setenv("DIN_FUSED_CPU_ISA", isa)
    check_against_reference(act, norm, "both", True, dtype, "cpu")


# --------------------------------------------------------------------------------------
# DeepCTR's query layout, [B, 1, D]
# --------------------------------------------------------------------------------------
def _query_3d_runs(act, layout, fwd_mode=None, bwd_mode=None):
    """(out, grads, out.grad_fn, query) of a [B, D] and a [B, 1, D] query on the same problem,
    the forward and the backward each under a mode when given (a context manager factory)."""
    training = act == "dice-train"
    if layout == "padded":
        q, k, lengths, _, p, gout, _ = make_problem(5, 6, 37, (12, 7), act, "lengths", torch.float64,
                                                    "cpu", 3)

        def call(qq, kk, pp):
            return din_fused.din_attention(qq, kk, lengths, **pp, training=training)
    else:
        from jagged_cases import make_jagged

        q, k, offsets, row_seq, p, gout = make_jagged([3, 0, 5, 1], [2, 0, 2, 3, 1], 37, (12, 7), act,
                                                      "cpu", 3)

        def call(qq, kk, pp):
            return din_fused.din_attention_jagged(qq, kk, offsets, row_seq, **pp, training=training)
    results = []
    for q_in, g_in in ((q, gout), (q[:, None], gout[:, None])):
        pp = clone_params(p)
        qq, kk = q_in.clone().requires_grad_(), k.clone().requires_grad_()
        with fwd_mode() if fwd_mode else torch.enable_grad():
            out = call(qq, kk, pp)
        with bwd_mode() if bwd_mode else torch.enable_grad():
            grads = torch.autograd.grad((out * g_in).sum(), [qq, kk, *param_tensors(pp)])
        results.append((out, grads, out.grad_fn, qq))
    return results


def _check_same(results):
    """The [B, 1, D] run's out and query gradient have the query's shape; everything equals the
    [B, D] run's bitwise."""
    (o2, g2, _, q2), (o3, g3, _, q3) = results
    assert o3.shape == q3.shape and g3[0].shape == q3.shape
    assert torch.equal(o3[:, 0], o2) and torch.equal(g3[0][:, 0], g2[0])
    for a, b in zip(g2[1:], g3[1:]):
        assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("act", ["sigmoid", "dice-train"])
def test_query_with_a_middle_axis_gives_the_same_results_without_view_nodes(act, layout):
    results = _query_3d_runs(act, layout)
    _check_same(results)
    # The eager call takes the [B, 1, D] query as it is: its leaf feeds the op's node directly
    # and out is the node's own output (a squeeze and an unsqueeze node cost ~45 us a step).
    fn3, q3 = results[1][2], results[1][3]
    assert type(fn3).__name__ == "_EagerGradBackward"
    assert any(type(f).__name__ == "AccumulateGrad" and f.variable is q3 for f, _ in fn3.next_functions)


@pytest.mark.parametrize("during", ["backward", "both"])
def test_query_with_a_middle_axis_under_a_dispatch_mode(during):
    # Under a TorchDispatchMode the call goes through the registered op, which takes [B, D]:
    # call_forward gives it the query's view and returns out as [B, 1, D] ("both").  A direct
    # forward saved the [B, 1, D] query itself; its backward under the mode squeezes for the
    # op ("backward").
    from torch.utils.flop_counter import FlopCounterMode

    def mode():
        return FlopCounterMode(display=False)

    results = _query_3d_runs("sigmoid", "padded", mode if during == "both" else None, mode)
    _check_same(results)
    assert (type(results[1][2]).__name__ == "_EagerGradBackward") == (during == "backward")


def test_query_with_a_middle_axis_other_than_one_is_refused():
    q, k, lengths, _, p, _, _ = make_problem(4, 3, 5, (6,), "sigmoid", "lengths", torch.float64, "cpu", 0)
    with pytest.raises(ValueError, match=r"query must have shape \[R, D\] or \[R, 1, D\]"):
        din_fused.din_attention(q[:, None].expand(4, 2, 5), k, lengths, **p)
    # The registered op itself keeps its [B, D] contract.
    args = (q[:, None], k, lengths, None, p["weights"], p["biases"], [], [], [], [], [], "sigmoid", "none",
            1.0, False, 1e-8)
    with pytest.raises(ValueError, match=r"query must have shape \[R, D\] with D = 5"):
        torch.ops.din_fused.din_fwd(*args)


def test_gradcheck_with_a_middle_axis():
    q, k, lengths, _, p, _, _ = make_problem(4, 3, 5, (6,), "prelu", "lengths", torch.float64, "cpu", 1)
    pp = clone_params(p)

    def f(qq, kk, *ws):
        return din_fused.din_attention(qq, kk, lengths, weights=ws[:2], biases=ws[2:4], activation="prelu",
                                       alphas=ws[4:], normalization="softmax")

    torch.autograd.gradcheck(f, (q[:, None].clone().requires_grad_(), k.clone().requires_grad_(),
                                 *param_tensors(pp)))


def test_reference_takes_the_middle_axis_too():
    # din_attention_ref keeps din_attention's signature, [B, 1, D] query included.
    q, k, lengths, mask, p, _, _ = make_problem(4, 5, 6, (7,), "dice", "both", torch.float64, "cpu", 2)
    o2, w2 = din_attention_ref(q, k, lengths, mask, **p, normalization="softmax", return_scores=True)
    o3, w3 = din_attention_ref(q[:, None], k, lengths, mask, **p, normalization="softmax", return_scores=True)
    assert o3.shape == (4, 1, 6) and torch.equal(o3[:, 0], o2) and torch.equal(w3, w2)
    assert torch.equal(din_attention_ref(q[:, None], k, lengths, mask, **p)[:, 0],
                       din_attention_ref(q, k, lengths, mask, **p))


# ---------------------------------------------------------------------------------------
# torch.autocast: a query from an autocast Linear meets keys from an embedding
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["padded", "jagged", "nested"])
def test_cpu_autocast_casts_to_float32_like_the_eager_layer(layout):
    """Under CPU autocast the query of a Linear is bfloat16 and the keys (an embedding's) float32:
    the fused layer runs on both in float32, as its kernels compute, and gives bitwise the result
    of float32 inputs; gradients flow back through the casts to the Linear.  Outside autocast the
    same mixed call is refused, naming both dtypes."""
    torch.manual_seed(3)
    D = 37
    mod = din_fused.FusedDINAttention(D, (12, 7), "prelu", weight_normalization=True)
    lin = torch.nn.Linear(D, D)
    q0, lengths = torch.randn(5, 1, D), torch.tensor([4, 1, 0, 6, 3])
    keys = torch.randn(5, 6, D).requires_grad_()
    valid = torch.arange(6)[None, :] < lengths[:, None]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])

    def call(q, k):
        if layout == "padded":
            return mod(q, k, lengths)
        if layout == "jagged":
            return mod(q, k[valid], offsets=offsets)
        return mod(q, torch.nested.nested_tensor_from_jagged(k[valid], offsets))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = lin(q0)
        assert q.dtype == torch.bfloat16
        out = call(q, keys)
    assert out.dtype == torch.float32
    want = call(q.detach().float(), keys.detach())
    assert torch.equal(out, want)
    out.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert keys.grad is not None and keys.grad.abs().sum() > 0
    with pytest.raises(TypeError, match=r"query \(torch.bfloat16\) and (keys|values) \(torch.float32\)"):
        call(q.detach(), keys.detach())


@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.bfloat16), (torch.float32, torch.float64)], ids=str)
def test_cpu_autocast_promotes_to_the_wider_dtype(dtypes):
    """CPU autocast: the narrower input is promoted to the wider (autocast's "promote" ops), so
    matching dtypes pass as they are (bfloat16 stays bfloat16, float64 float64) and the result is
    that of the inputs cast by hand."""
    torch.manual_seed(4)
    mod = din_fused.FusedDINAttention(8, (6,), "sigmoid")
    q, k = torch.randn(3, 1, 8).to(dtypes[0]), torch.randn(3, 4, 8).to(dtypes[1])
    lengths = torch.tensor([4, 2, 1])
    wide = torch.promote_types(*dtypes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(q, k, lengths)
    assert out.dtype == wide
    assert torch.equal(out, mod(q.to(wide), k.to(wide), lengths))


def test_cpu_autocast_under_torch_compile_fullgraph():
    torch.manual_seed(5)
    mod = din_fused.FusedDINAttention(16, (8, 4), "sigmoid")
    lin = torch.nn.Linear(16, 16)

    def f(q, k, lengths):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return mod(lin(q), k, lengths)

    q, k, lengths = torch.randn(4, 1, 16), torch.randn(4, 5, 16), torch.tensor([5, 3, 1, 0])
    got = torch.compile(f, fullgraph=True)(q, k, lengths)
    assert got.dtype == torch.float32
    assert torch.equal(got, f(q, k, lengths))


@pytest.mark.parametrize("act", ["sigmoid", "dice"])
def test_inference_mode_matches_no_grad_in_train_and_eval(act):
    """torch.inference_mode, a common serving and evaluation context: the same outputs and the same
    running-statistics update as under no_grad, training-mode Dice included (its tensors have no
    version counter there, which the backward's cache check must not ask for)."""
    import copy
    torch.manual_seed(6)
    q, k, lengths = torch.randn(4, 1, 16), torch.randn(4, 5, 16), torch.tensor([5, 3, 1, 0])
    for train in (True, False):
        a = din_fused.FusedDINAttention(16, (8, 4), act).train(train)
        b = copy.deepcopy(a)
        with torch.inference_mode():
            got = a(q, k, lengths)
        with torch.no_grad():
            want = b(q, k, lengths)
        assert torch.equal(got, want)
        for x, y in zip(a.buffers(), b.buffers()):
            assert torch.equal(x, y)


@pytest.mark.parametrize("layout", ["padded", "jagged", "module"])
def test_double_backward_is_refused_not_silently_zero(layout):
    """The backward kernels have no backward. Under create_graph the first-order gradients come
    back right, and differentiating them again (a gradient penalty) raises: it used to give the
    penalty no gradient at all whenever the incoming gradients did not require grad."""
    q, k, lengths, _, p, _, _ = make_problem(4, 6, 5, (4, 3), "prelu", "lengths", torch.float64, "cpu", 9)
    q.requires_grad_()
    if layout == "padded":
        def f(q):
            return din_fused.din_attention(q, k, lengths, **p)
    elif layout == "jagged":
        values = torch.cat([k[b, :n] for b, n in enumerate(lengths.tolist())])
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])

        def f(q):
            return din_fused.din_attention_jagged(q, values, offsets, **p)
    else:
        mod = din_fused.FusedDINAttention(5, att_hidden_units=(4, 3), att_activation="prelu").double()

        def f(q):
            return mod(q, k, lengths)
    ref = None if layout == "module" else din_attention_ref(q, k, lengths, **p)
    out = f(q)
    g, = torch.autograd.grad(out.sum(), q, create_graph=True)
    g_plain, = torch.autograd.grad(f(q).sum(), q)
    assert torch.equal(g.detach(), g_plain)
    if ref is not None:
        g_ref, = torch.autograd.grad(ref.sum(), q)
        assert max_rel_err(g_plain, g_ref) <= TOL64
    with pytest.raises(RuntimeError, match="no double backward"):
        (out.sum() + g.pow(2).sum()).backward()
