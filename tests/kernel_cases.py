"""Kernel checks shared by test_cuda.py (real GPU) and test_cuda_emulated.py
(the CUDA sources compiled for CPU, see tests/cuda_emu).

Low-precision rule (issue 3; tests/common.py: lowp_bound): the fused result's error
against the float64 answer must be at most 2x (outputs, scores) / 3x (gradients) the
error scale of that precision, plus a small floor.  The scale is the largest of the
reference run in that precision against float64, the exact answer for the rounded inputs
(query, keys, parameters and incoming gradients rounded, then computed in float64)
against float64, and the one against the other.  The second term covers ReLU/PReLU kinks:
rounding an input by 2^-11 can move a pre-activation across one, which changes a gradient
by percents for every implementation, and whether the reference is "lucky" there is noise.
"""

from __future__ import annotations

import torch
from common import TOL64, clone_params, lowp_bound, max_rel_err, param_tensors, random_params, rounded_params

import din_fused
from din_fused import ops
from din_fused.reference import din_attention_ref

LOWP = (torch.float16, torch.bfloat16)


def make_problem(B, T, D, hidden, act, validity, device, seed, nan_padding=True):
    """Random problem in float64 on device.  Padding holds NaN (it must never leak)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    lengths = None
    if validity in ("lengths", "both"):
        lengths = torch.randint(0, T + 1, (B,), generator=gen)
        if B >= 2:
            lengths[0], lengths[1] = 0, T
    mask = None
    if validity in ("mask", "both"):
        mask = torch.rand(B, T, generator=gen) < 0.6
        mask[-1] = False  # an empty row
    if nan_padding:
        valid = torch.ones(B, T, dtype=torch.bool)
        if lengths is not None:
            valid &= torch.arange(T)[None] < lengths[:, None]
        if mask is not None:
            valid &= mask
        k[~valid] = float("nan")
    p = random_params(D, hidden, act.split("-")[0], dtype=torch.float64, gen=gen)
    gout = torch.randn(B, D, generator=gen, dtype=torch.float64)
    gsc = torch.randn(B, T, generator=gen, dtype=torch.float64)

    def dev(t):
        return None if t is None else t.to(device)

    p = {k_: ([dev(t.detach()) for t in v] if isinstance(v, list) else v) for k_, v in p.items()}
    return dev(q), dev(k), dev(lengths), dev(mask), p, dev(gout), dev(gsc)


def run(fn, q, k, lengths, mask, p, dtype, training, norm, use_scores, gout, gsc, scale=0.7):
    """Forward + backward with inputs cast to dtype: (out, scores, grads, running stats)."""
    p = clone_params(p, dtype)
    qq = q.to(dtype).requires_grad_()
    kk = k.to(dtype).requires_grad_()
    out, w = fn(qq, kk, lengths, mask, **p, training=training, normalization=norm, scale=scale,
                return_scores=True)
    loss = (out.double() * gout).sum()
    if use_scores:
        loss = loss + (w.double() * gsc).sum()
    grads = torch.autograd.grad(loss, [qq, kk, *param_tensors(p)], allow_unused=False)
    running = p.get("running_means", []) + p.get("running_vars", [])
    return [out, w, *grads, *running]


def names_of(n_grads, n_running):
    params = [f"dparam{j}" for j in range(n_grads - 2)]
    return ["out", "scores", "dq", "dk", *params] + ["running"] * n_running


def check_case(B, T, D, hidden, act, norm, validity, use_scores, dtype, device, seed=0, scale=0.7):
    """Fused (on device) vs the float64 reference; raises AssertionError with details."""
    training = act == "dice-train"
    q, k, lengths, mask, p, gout, gsc = make_problem(B, T, D, hidden, act, validity, device, seed)
    got = run(din_fused.din_attention, q, k, lengths, mask, p, dtype, training, norm, use_scores, gout,
              gsc, scale)
    n_run = len(p.get("running_means", [])) * 2
    names = names_of(len(got) - 2 - n_run, n_run)
    for name, g in zip(names, got):
        assert torch.isfinite(g).all(), (name, "non-finite values")
    want = run(din_attention_ref, q, k, lengths, mask, p, torch.float64, training, norm, use_scores,
               gout, gsc, scale)
    if dtype == torch.float64:
        for name, g, w in zip(names, got, want):
            err = max_rel_err(g, w)
            assert err <= TOL64, (name, dtype, (B, T, D, hidden), act, norm, validity, err)
        return
    # fp32/fp16/bf16: the reference's own error, and that of the exact answer for the rounded inputs
    rq, rk, rg, rs = (t.to(dtype).double() for t in (q, k, gout, gsc))
    ideal = run(din_attention_ref, rq, rk, lengths, mask, rounded_params(p, dtype), torch.float64, training,
                norm, use_scores, rg, rs, scale)
    base = run(din_attention_ref, q, k, lengths, mask, p, dtype, training, norm, use_scores, gout, gsc,
               scale)
    for name, g, w, r, e in zip(names, got, want, base, ideal):
        bound = lowp_bound("out" if name in ("out", "scores") else "grad", dtype, w, r, e)
        err = max_rel_err(g, w)
        assert err <= bound, (name, dtype, (B, T, D, hidden), act, norm, validity, err, bound)


# --------------------------------------------------------------------------------------
# Rows sharing sequences (row_seq): not reachable from the public API, so _C is
# driven directly with the same params dict ops.py builds.
# --------------------------------------------------------------------------------------
def check_row_seq(C, device, dtype, norm="softmax", act="sigmoid", seed=0):
    gen = torch.Generator().manual_seed(seed)
    S, R, T, D, hidden = 3, 7, 11, 5, (6, 4)
    keys = torch.randn(S, T, D, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([T, 0, 4])
    row_seq = torch.tensor([0, 2, 0, 1, 2, 0, 2])
    query = torch.randn(R, D, generator=gen, dtype=torch.float64)
    p = random_params(D, hidden, act, dtype=torch.float64, gen=gen, requires_grad=False)
    gout = torch.randn(R, D, generator=gen, dtype=torch.float64)

    # reference on the expanded problem
    qr = query.clone().requires_grad_()
    kr = keys.clone().requires_grad_()
    ref_out, ref_w = din_attention_ref(qr, kr[row_seq], lengths[row_seq], normalization=norm, scale=0.9,
                                       return_scores=True, **p)
    ref_dq, ref_dk = torch.autograd.grad((ref_out * gout).sum(), [qr, kr])

    dev = torch.device(device)
    q_d = query.to(dev, dtype)
    k_d = keys.to(dev, dtype)
    prep = ops._Prepared(q_d[:S], k_d, lengths.to(dev), None, [w.to(dev) for w in p["weights"]],
                         [b.to(dev) for b in p["biases"]], [], [], [], act, norm, 0.9)
    rs = row_seq.to(dev)
    acc = prep.acc
    cfg = prep.cfg
    cfg.update({"rows": R, "q": q_d.data_ptr(), "ldq": D, "row_seq": rs.data_ptr()})
    out = torch.empty(R, D, dtype=dtype, device=dev)
    scores = torch.empty(R, T, dtype=acc, device=dev)
    prep.workspace("forward")
    C.forward({**cfg, "out": out.data_ptr(), "ldo": D, "scores": scores.data_ptr(), "ld_scores": T})
    g = gout.to(dev, dtype)
    cfg.update({"dout": g.data_ptr(), "ld_dout": D, "scores": scores.data_ptr(), "ld_scores": T})
    dq = torch.empty(R, D, dtype=dtype, device=dev)
    dk = torch.zeros(S, T, D, dtype=dtype, device=dev)
    dW = [torch.empty_like(w) for w in prep.weights]
    db = [torch.empty_like(b) for b in prep.biases]
    prep.workspace("backward")
    C.backward({**cfg, "dq": dq.data_ptr(), "lddq": D, "dk": dk.data_ptr(),
                "dW": [t.data_ptr() for t in dW], "db": [t.data_ptr() for t in db]})
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    pairs = (("out", out, ref_out), ("scores", scores, ref_w), ("dq", dq, ref_dq), ("dk", dk, ref_dk))
    for name, a, b in pairs:
        err = max_rel_err(a.cpu(), b.detach())
        assert err <= tol, (name, err)
    return dW, db


def fwd_bwd(q, k, lengths, mask, p, norm="softmax", training=False):
    """One forward+backward of the public API; returns every result tensor.  Keys that
    already require grad are used as they are (not copied), storage offset included."""
    p = clone_params(p)
    qq = q.clone().requires_grad_()
    kk = k if k.requires_grad else k.clone().requires_grad_()
    out, w = din_fused.din_attention(qq, kk, lengths, mask, **p, training=training, normalization=norm,
                                     return_scores=True)
    grads = torch.autograd.grad((out.float() ** 2).sum() + w.float().sum(), [qq, kk, *param_tensors(p)])
    return [out, w, *grads]


def check_unaligned_keys(device, dtype=torch.bfloat16):
    """The tensor-core kernels load eight keys' elements at once where a key row is 16-byte
    aligned (D % 8 == 0) and one at a time where it is not: keys that are contiguous but
    start 2 bytes into their storage take the second path and must give bitwise the results
    of the same keys aligned."""
    q, k, lengths, mask, p, _, _ = make_problem(5, 11, 16, (16, 8), "prelu", "lengths", device, seed=4)
    q, k = q.to(dtype), k.to(dtype)
    pp = clone_params(p, torch.float32)
    store = torch.zeros(k.numel() + 8, dtype=dtype, device=k.device)
    store[1:1 + k.numel()] = k.flatten()
    shifted = store.requires_grad_()[1:1 + k.numel()].view(k.shape)  # the op sees this very pointer
    aligned = k.clone().requires_grad_()
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0 and aligned.data_ptr() % 16 == 0
    for a, b in zip(fwd_bwd(q, aligned, lengths, None, pp), fwd_bwd(q, shifted, lengths, None, pp)):
        assert torch.equal(a, b)


# (B, T, scale, seed): rows with one softmax weight within 1e-6 of 1.  The last case is
# one row, which the CPU splits over two threads when it has them.
DOMINANT_SOFTMAX_CASES = [(16, 30, 40.0, 0), (16, 30, 40.0, 1), (1, 1500, 400.0, 0)]


def check_dominant_softmax(B, T, scale, seed, device="cpu"):
    """fp32 dq of rows whose softmax has one weight ~1, per row within 1e-4 of float64.  The
    softmax backward's row term sum_u w_u dL/dw_u cancels against dL/dw_t there: formed in
    fp32 it put such rows' dq off by more than their own size (torch's own fp32 softmax
    backward too); the kernels form it in double, normalised by the weights' sum, and land
    within ~2e-5."""
    q, k, _, _, p, gout, _ = make_problem(B, T, 8, (16,), "sigmoid", "none", device, seed)
    def dq_and_weights(fn, dtype):
        _, w, dq, *_ = run(fn, q, k, None, None, p, dtype, False, "softmax", False, gout, None, scale)
        return dq, w

    dq32, _ = dq_and_weights(din_fused.din_attention, torch.float32)
    want, w = dq_and_weights(din_attention_ref, torch.float64)
    assert (1 - w.max(dim=1).values).min() < 1e-6  # the case this check is about
    err = (dq32.double() - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-300)
    assert err.max() <= 1e-4, err.max()
