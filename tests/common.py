"""Shared helpers for the tests: random DIN problems and per-dtype error rules."""

from __future__ import annotations

import os
from pathlib import Path

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_params(D, hidden, activation, dtype=torch.float64, device="cpu", gen=None, requires_grad=True):
    """Random activation-unit parameters as keyword arguments of din_attention.

    Scaled by 1/sqrt(fan_in) so that scores are O(1) and every activation regime
    (sigmoid saturation, ReLU/PReLU kinks, Dice gates) is exercised.
    """
    dims = [4 * D, *hidden, 1]

    def rnd(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    p = {
        "weights": [rnd(dims[i + 1], dims[i], scale=dims[i] ** -0.5 * 2) for i in range(len(dims) - 1)],
        "biases": [rnd(dims[i + 1], scale=0.3) for i in range(len(dims) - 1)],
        "activation": activation,
    }
    if activation in ("prelu", "dice"):
        p["alphas"] = [rnd(h, scale=0.3, shift=0.2) for h in hidden]
    if activation == "dice":
        p["bn_weights"] = [rnd(h, scale=0.3, shift=1.0) for h in hidden]
        p["bn_biases"] = [rnd(h, scale=0.3) for h in hidden]
        p["running_means"] = [torch.randn(h, generator=gen, dtype=torch.float64).mul(0.3)
                              .to(device=device, dtype=dtype) for h in hidden]
        p["running_vars"] = [torch.rand(h, generator=gen, dtype=torch.float64).add(0.5)
                             .to(device=device, dtype=dtype) for h in hidden]
    return p


def randomise_(module, gen):
    """O(1) values for every parameter and buffer of a module (DeepCTR initialises with std
    1e-4, which makes every score ~0), Dice's running statistics included."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5)
            elif t.dim() == 2 and "alpha" not in name:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * t.shape[1] ** -0.5 * 2)
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.3
                        + (1.0 if name.endswith("bn.weight") else 0.0))


def param_tensors(p):
    """The differentiable parameters of a random_params dict, in a fixed order."""
    out = list(p["weights"]) + list(p["biases"])
    for key in ("alphas", "bn_weights", "bn_biases"):
        out += list(p.get(key, []))
    return out


def clone_params(p, dtype=None, requires_grad=True):
    """Deep copy (running statistics too) so two runs don't share buffers."""
    q = {}
    for k, v in p.items():
        if isinstance(v, list):
            q[k] = [t.detach().to(dtype or t.dtype).clone().requires_grad_(
                requires_grad and k not in ("running_means", "running_vars")) for t in v]
        else:
            q[k] = v
    return q


def random_lengths(B, T, gen, zeros=True):
    """int64 [B] in 0..T (or 1..T), with the extremes forced in when B allows."""
    lo = 0 if zeros else 1
    lengths = torch.randint(lo, T + 1, (B,), generator=gen)
    if B >= 2:
        lengths[0] = lo
        lengths[1] = T
    return lengths


def max_rel_err(a, b):
    """max |a - b| / max(max |b|, 1): relative for large tensors, absolute for
    small ones (some gradients are exactly zero analytically, e.g. the output
    bias under softmax, where only rounding noise remains)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() if b.numel() else 0.0


# float64 is compared directly; lower precisions are judged against the
# reference's own error in that precision (flash-attention style).
TOL64 = 1e-10
LOWP_FACTOR = {"out": 2.0, "grad": 3.0}
LOWP_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rounded_params(p, dtype):
    """p with every tensor rounded to dtype and held in float64 (the exact answer's inputs)."""
    return clone_params(clone_params(p, dtype), torch.float64)


def lowp_bound(kind, dtype, want, ref, ideal):
    """The error allowed to a fused fp32/fp16/bf16 result against the float64 answer want,
    kind "out" or "grad": LOWP_FACTOR times the error scale of that precision, plus
    LOWP_FLOOR.  The scale is the largest of three estimates of it: the reference in that
    dtype (ref) against want, the exact answer for the rounded inputs (ideal) against want
    (what rounding the inputs alone costs), and ref against ideal (what rounding every
    intermediate costs, as a fp16/bf16 model and the tensor-core kernels do).  One draw of the
    reference alone can land far under the scale by a lucky cancellation: seen on an H200 on
    2-element and scalar Dice gradients, 3x to 6x under the other two."""
    scale = max(max_rel_err(ref, want), max_rel_err(ideal, want), max_rel_err(ref, ideal))
    return LOWP_FACTOR[kind] * scale + LOWP_FLOOR[dtype]


def write_ml(dir_: Path, ratings: str, movies: str) -> Path:
    """A MovieLens-format folder (ratings.csv, movies.csv) with the given CSV texts."""
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "ratings.csv").write_text(ratings)
    (dir_ / "movies.csv").write_text(movies)
    return dir_


def movielens_dir():
    """ml-latest-small from $DIN_FUSED_DATA or ../shared/data beside the checkout, else None."""
    env = os.environ.get("DIN_FUSED_DATA")
    for c in ([Path(env), Path(env) / "ml-latest-small"] if env else []) + [
        Path(__file__).parents[1].parent / "shared/data/ml-latest-small"
    ]:
        if (c / "ratings.csv").is_file() and (c / "movies.csv").is_file():
            return c
    return None


def assert_modules_agree(results, a, b, rtol=1e-5, atol=1e-6):
    """Module a and its copy b after one forward+backward each (eager against compiled): results
    holds one tuple of outputs and input gradients per module; then the parameter gradients and
    the buffers (Dice's running statistics) must agree too."""
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
    for p1, p2 in zip(a.parameters(), b.parameters()):
        assert p1.grad is not None and p2.grad is not None
        torch.testing.assert_close(p1.grad, p2.grad, rtol=rtol, atol=atol)
    for b1, b2 in zip(a.buffers(), b.buffers()):
        torch.testing.assert_close(b1, b2)


class num_threads:
    """torch.set_num_threads(n) inside a with-block (the op passes it to the kernel)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)
