"""fp32 accuracy under a sharp softmax: the fused op against the reference's own fp32 error,
with a control (session 13; the numbers behind tests/test_fuzz.py's fp32_bounds).

    python bench/softmax_accuracy.py [--problems 1000] [--seed 2]

Per drawn problem (softmax at scale 20-50, D 1..36, one to four hidden layers, every
activation, Dice in eval mode) it runs forward+backward in float64 (the answer), and in
float32: the fused op, the reference, and the control, which is the reference on the same
problem with D and the hidden units permuted (the same math, rounded in another order; the
permutation is exact and part of the autograd graph, so its gradients map back exactly).
It prints, per CPU ISA path:
  - the error ratio (largest over the example's tensors) against the reference's own fp32
    error plus 1e-7 of the example's largest tensor: median, 90th and 99th percentile, for
    the fused op and for the control;
  - how many problems each fails under the fuzz's float32 rule, with and without its
    softmax-scale terms.
A control that fails a rule about as often as the fused op says the rule is measuring the
problem's conditioning, not the kernel.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import random_params  # noqa: E402
from test_fuzz import fp32_bounds, norm_errs  # noqa: E402

import din_fused  # noqa: E402
from din_fused.reference import din_attention_ref  # noqa: E402

PARAMS = ("weights", "biases", "alphas", "bn_weights", "bn_biases")
HIDDEN = [(12, 3, 12), (12, 3, 4), (16, 3, 6, 8), (80, 40), (32,), (227,), (64, 8), (250, 1)]


def _permuted(leaves: dict, D: int, hidden, pd, ph) -> dict:
    """The parameters of the problem with input features pd and hidden units ph permuted."""
    out = {k: list(v) for k, v in leaves.items()}
    cols = torch.cat([pd + i * D for i in range(4)])  # [q, k, q-k, q*k] blocks
    L = len(hidden)
    for l, w in enumerate(leaves["weights"]):
        w = w[:, cols] if l == 0 else w[:, ph[l - 1]]
        out["weights"][l] = w[ph[l]] if l < L else w
    out["biases"] = [b[ph[l]] if l < L else b for l, b in enumerate(leaves["biases"])]
    for k in ("alphas", "bn_weights", "bn_biases", "running_means", "running_vars"):
        if k in leaves:
            out[k] = [t[ph[l]] for l, t in enumerate(leaves[k])]
    return out


def _run(fn, q, k, lengths, p, gout, dtype, scale, perm=None):
    """[out, dq, dk, dparams...] in float64, for fn on the problem cast to dtype."""
    qq = q.to(dtype).requires_grad_()
    kk = k.to(dtype).requires_grad_()
    leaves = {key: [t.to(dtype).requires_grad_() for t in p[key]] for key in PARAMS if key in p}
    stats = {key: [t.to(dtype) for t in p[key]] for key in ("running_means", "running_vars") if key in p}
    kw = dict(activation=p["activation"], normalization="softmax", scale=scale)
    if perm is None:
        out = fn(qq, kk, lengths, **leaves, **stats, **kw)
    else:
        pd, ph, D, hidden = perm
        args = _permuted({**leaves, **stats}, D, hidden, pd, ph)
        out = fn(qq[:, pd], kk[..., pd], lengths, **args, **kw)[:, torch.argsort(pd)]
    inputs = [qq, kk] + [t for key in PARAMS if key in leaves for t in leaves[key]]
    grads = torch.autograd.grad((out.double() * gout).sum(), inputs, allow_unused=True)
    return [out.double()] + [torch.zeros_like(t, dtype=torch.float64) if g is None else g.double()
                             for g, t in zip(grads, inputs)]


def one(rng: random.Random):
    """(fused ratio, control ratio, {(who, rule): fails}) for one drawn problem."""
    D, hidden = rng.choice([1, 1, 2, 4, 13, 36]), rng.choice(HIDDEN)
    act, scale, seed = rng.choice(["sigmoid", "relu", "prelu", "dice"]), rng.choice([20.0, 30.0, 50.0]), \
        rng.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    B, T = 8, 30
    q = torch.randn(B, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    p = random_params(D, hidden, act, gen=gen, requires_grad=False)
    gout = torch.randn(B, D, generator=gen, dtype=torch.float64)
    perm = (torch.randperm(D, generator=gen), [torch.randperm(h, generator=gen) for h in hidden], D, hidden)
    want = _run(din_attention_ref, q, k, lengths, p, gout, torch.float64, scale)
    base = _run(din_attention_ref, q, k, lengths, p, gout, torch.float32, scale)
    got = {"fused": _run(din_fused.din_attention, q, k, lengths, p, gout, torch.float32, scale),
           "control": _run(din_attention_ref, q, k, lengths, p, gout, torch.float32, scale, perm)}
    rules = {"with": fp32_bounds(want, "softmax", scale),
             "without": fp32_bounds(want, "softmax", scale, scale_terms=False)}
    floor = 1e-7 * max(w.norm().item() for w in want)  # for tensors that are analytically ~0
    ratio, fails = {}, {}
    for who, res in got.items():
        worst = {r: 0.0 for r in rules}
        ratio[who] = 0.0
        for g, w, b in zip(res, want, base):
            err, ref_err, size, root_n = norm_errs(g, w, b)
            ratio[who] = max(ratio[who], err / (ref_err + floor))
            for r, bound in rules.items():
                worst[r] = max(worst[r], err / bound(ref_err, size, root_n))
        fails.update({(who, r): worst[r] > 1 for r in rules})
    return ratio, fails


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=1000, help="problems per CPU ISA path")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--isas", default="avx512,avx2,generic")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    q = lambda v, x: sorted(v)[int(x * (len(v) - 1))]  # noqa: E731
    for isa in args.isas.split(","):
        os.environ["DIN_FUSED_CPU_ISA"] = isa  # a path the CPU lacks runs as the best it has
        ratios = {"fused": [], "control": []}
        fails = {}
        for _ in range(args.problems):
            r, f = one(rng)
            for who in ratios:
                ratios[who].append(r[who])
            for key, v in f.items():
                fails[key] = fails.get(key, 0) + v
        print(f"{isa}, {args.problems} problems (error / the reference's own fp32 error, worst tensor):")
        for who, v in ratios.items():
            print(f"  {who:8s} median {q(v, .5):5.2f}  p90 {q(v, .9):5.2f}  p99 {q(v, .99):6.2f};  fails the "
                  f"rule with its scale terms {fails[(who, 'with')]}, without {fails[(who, 'without')]}")


if __name__ == "__main__":
    main()
