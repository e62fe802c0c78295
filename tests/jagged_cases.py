"""Jagged and shared-history checks, shared by test_jagged.py (CPU), test_cuda_emulated.py
and test_cuda.py: the fused jagged op against the reference on the equivalent padded
(tiled) input, built from the same values so that gradients reach them."""

from __future__ import annotations

import torch
from common import TOL64, clone_params, lowp_bound, max_rel_err, param_tensors, random_params, rounded_params

import din_fused
from din_fused.reference import din_attention_ref, tile_jagged

# name -> (sequence lengths, row_seq or None, D, hidden)
LAYOUTS = {
    "jagged": ([3, 0, 7, 1, 5], None, 37, (12, 7)),            # a zero-length sequence, D = 37
    "shared-one": ([6], [0] * 9, 5, (8, 4)),                   # S = 1 shared by 9 rows
    "shared-mixed": ([4, 0, 9, 2], [2, 0, 2, 1, 3, 2, 0], 6, (5, 3, 2)),  # duplicates + empty
    "permuted": ([2, 5, 1, 4], [3, 1, 0, 2], 4, (4,)),         # row_seq without duplicates
    "long-tiles": ([40, 1, 23], [0, 2, 0, 1], 8, (16, 8)),     # several key tiles per row
    # Enough short rows for the CPU's packed tiles (>= 4 rows per thread, <= 8 positions):
    "packed-jagged": ([3, 0, 8, 1, 5, 2, 6, 4, 0, 7, 2, 1], None, 1, (5,)),  # D = 1
    "packed-shared": ([6, 2, 0, 8, 3], [3, 0, 1, 3, 4, 2, 0, 3, 1, 4, 0, 3, 2, 1, 4, 0], 3, (7, 5, 3, 2)),
    # Enough rows on one sequence for the CPU's lanes forward (whole groups of 16 float or 8 double
    # rows on a sequence of over 8 positions), mixed with rows left over and short sequences.
    "shared-lanes": ([40, 12, 3], [(5 * i) % 3 if i % 4 else 0 for i in range(60)], 7, (12, 5)),
}


def make_jagged(lens, row_seq, D, hidden, act, device, seed):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int64)
    R = len(lens) if row_seq is None else len(row_seq)
    values = torch.randn(int(offsets[-1]), D, generator=gen, dtype=torch.float64)
    query = torch.randn(R, D, generator=gen, dtype=torch.float64)
    p = random_params(D, hidden, act.split("-")[0], dtype=torch.float64, gen=gen)
    gout = torch.randn(R, D, generator=gen, dtype=torch.float64)
    rs = None if row_seq is None else torch.tensor(row_seq, dtype=torch.int64).to(device)
    return query.to(device), values.to(device), offsets.to(device), rs, p, gout.to(device)


def _run(fn, query, keys, idx1, idx2, p, dtype, training, norm, gout, gw_seed, jagged):
    p = clone_params(p, dtype)
    for key in ("running_means", "running_vars"):
        if key in p:
            p[key] = [t.to(query.device) for t in p[key]]
    for key, v in p.items():
        if isinstance(v, list) and key not in ("running_means", "running_vars"):
            p[key] = [t.detach().to(query.device).requires_grad_() for t in v]
    q = query.to(dtype).requires_grad_()
    k = keys.to(dtype).requires_grad_()
    if jagged:
        out, w, row_off = fn(q, k, idx1, idx2, **p, training=training, normalization=norm, scale=0.7,
                             return_scores=True)
    else:
        kp, lengths = tile_jagged(k, idx1, idx2)
        out, wp = fn(q, kp, lengths, **p, training=training, normalization=norm, scale=0.7,
                     return_scores=True)
        valid = torch.arange(kp.shape[1], device=kp.device)[None, :] < lengths[:, None]
        w = wp[valid]
    gw = torch.randn(w.shape, generator=torch.Generator().manual_seed(gw_seed), dtype=torch.float64)
    loss = (out.double() * gout).sum() + (w.double() * gw.to(w.device)).sum()
    grads = torch.autograd.grad(loss, [q, k, *param_tensors(p)])
    running = p.get("running_means", []) + p.get("running_vars", [])
    return [out, w, *grads, *running]


def check_jagged(layout, act, norm, dtype, device, seed=0):
    """Fused jagged op == reference on the tiled input: outputs, weights, every gradient
    (query, values, parameters) and the running statistics.  layout: a LAYOUTS name, or a
    (sequence lengths, row_seq, D, hidden) tuple."""
    lens, row_seq, D, hidden = LAYOUTS[layout] if isinstance(layout, str) else layout
    q, v, off, rs, p, gout = make_jagged(lens, row_seq, D, hidden, act, device, seed)
    training = act == "dice-train"
    args = (q, v, off, rs, p)
    got = _run(din_fused.din_attention_jagged, *args, dtype, training, norm, gout, seed, True)
    want = _run(din_attention_ref, *args, torch.float64, training, norm, gout, seed, False)
    assert len(got) == len(want)
    if dtype == torch.float64:
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape, (i, g.shape, w.shape)
            assert max_rel_err(g, w) <= TOL64, (layout, i, max_rel_err(g, w))
        return got
    base = _run(din_attention_ref, *args, dtype, training, norm, gout, seed, False)
    rq, rv, rg = (t.to(dtype).double() for t in (q, v, gout))  # the fused output's gradient arrives rounded
    ideal = _run(din_attention_ref, rq, rv, off, rs, rounded_params(p, dtype), torch.float64, training, norm,
                 rg, seed, False)
    for i, (g, w, r, e) in enumerate(zip(got, want, base, ideal)):
        bound = lowp_bound("out" if i < 2 else "grad", dtype, w, r, e)
        assert max_rel_err(g, w) <= bound, (layout, i, max_rel_err(g, w), bound)
    return got


def jagged_fwd_bwd(layout, dtype, device, act="dice", norm="softmax", training=True, seed=3):
    """One forward+backward of the jagged op; every result tensor (for bitwise checks)."""
    lens, row_seq, D, hidden = LAYOUTS[layout]
    q, v, off, rs, p, gout = make_jagged(lens, row_seq, D, hidden, act, device, seed)
    return _run(din_fused.din_attention_jagged, q, v, off, rs, p, dtype, training, norm, gout, seed, True)
