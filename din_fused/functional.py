"""Functional API: DIN attention pooling with explicit parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .ops import check_inputs, din_fwd


def din_attention(
    query: Tensor,
    keys: Tensor,
    lengths: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    activation: str = "sigmoid",
    alphas: Sequence[Tensor] | None = None,
    bn_weights: Sequence[Tensor] | None = None,
    bn_biases: Sequence[Tensor] | None = None,
    running_means: Sequence[Tensor] | None = None,
    running_vars: Sequence[Tensor] | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-8,
    normalization: str = "none",
    scale: float = 1.0,
    return_scores: bool = False,
):
    """Fused DIN attention pooling: out[b] = sum_t w[b,t] * keys[b,t].

    Shapes:
        query [B, D], keys [B, T, D] (float32/float64; float16/bfloat16 are computed
        in float32 on CPU); lengths [B] int32/int64 in 0..T and/or mask [B, T] bool
        (a position is valid when both allow it; neither means all valid).
        weights/biases: L hidden nn.Linear layers (1 <= L <= 4, widths 1..256) then the
        output Linear: weights[0] [H1, 4D] over [q, k, q-k, q*k], weights[l] [H_{l+1}, H_l],
        weights[L] [1, H_L]; biases likewise.
        activation "sigmoid" | "relu" | "prelu" (alphas[l]: 1 or H_l values) | "dice"
        (alphas, bn_weights, bn_biases, running_means, running_vars: H_l values per layer).
        normalization "none" (w = score) or "softmax" (w = softmax(scale * score) over
        valid positions).
    Returns:
        out [B, D], plus the weights [B, T] (zero where invalid) when return_scores.

    Dice in training mode uses BatchNorm statistics over the valid positions and
    updates running_means/running_vars in place (momentum, unbiased variance), like
    nn.BatchNorm1d.  Gradients flow to query, keys and every parameter.
    """
    check_inputs(query, keys, lengths, mask, weights, biases, activation, alphas, bn_weights,
                 bn_biases, running_means, running_vars, normalization)
    B, T, _ = keys.shape
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=keys.device)
    dice = activation == "dice"
    uses_alpha = activation in ("prelu", "dice")
    out, scores, stats = din_fwd(
        query, keys, lengths, mask, list(weights), list(biases),
        list(alphas) if uses_alpha else [],
        list(bn_weights) if dice else [], list(bn_biases) if dice else [],
        list(running_means) if dice else [], list(running_vars) if dice else [],
        activation, normalization, float(scale), bool(training and dice), float(eps))
    if dice and training:
        with torch.no_grad():
            for l, (rm, rv) in enumerate(zip(running_means, running_vars)):
                h = rm.numel()
                rm.mul_(1 - momentum).add_(stats[l, 0, :h].reshape(rm.shape).to(rm.dtype), alpha=momentum)
                rv.mul_(1 - momentum).add_(stats[l, 2, :h].reshape(rv.shape).to(rv.dtype), alpha=momentum)
    if return_scores:
        return out, scores.to(query.dtype)
    return out
