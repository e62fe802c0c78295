"""Pure-PyTorch oracle for DIN attention pooling.

It follows the semantics literally and is written for reading, not speed: the
[B, T, 4D] activation-unit input and every hidden activation are materialised.
Every other implementation in this package (CPU and CUDA kernels) is tested
against it in float64.

Semantics (the differences from DeepCTR-Torch's AttentionSequencePoolingLayer):
- A position is valid when ``t < lengths[b]`` and ``mask[b, t]`` (either may be
  omitted).  Values stored in invalid positions never affect anything, even
  NaN or Inf: they are never fed to the MLP and contribute exactly zero.
- Training-mode Dice takes BatchNorm statistics over valid positions only
  (DeepCTR-Torch counts padding too).
- A row with no valid position gets all-zero weights and a zero output
  (DeepCTR-Torch's softmax gives such a row uniform weights over padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("sigmoid", "relu", "prelu", "dice")
NORMALIZATIONS = ("none", "softmax")


def valid_positions(max_len: int, lengths: Tensor | None = None, mask: Tensor | None = None,
                    batch: int | None = None, device=None) -> Tensor:
    """Bool [B, T]: True where position t of row b is valid.

    lengths: [B] integers in 0..T, or None.  mask: [B, T] bool, or None.
    """
    if lengths is None and mask is None:
        return torch.ones(batch, max_len, dtype=torch.bool, device=device)
    valid = None
    if lengths is not None:
        valid = torch.arange(max_len, device=lengths.device)[None, :] < lengths.reshape(-1, 1)
    if mask is not None:
        valid = mask.bool() if valid is None else valid & mask.bool()
    return valid


def dice_ref(z: Tensor, alpha: Tensor, bn_weight: Tensor, bn_bias: Tensor, running_mean: Tensor,
             running_var: Tensor, training: bool, momentum: float = 0.1, eps: float = 1e-8) -> Tensor:
    """Dice on z [N, H]: p = sigmoid(BN(z)), f = p*z + (1-p)*alpha*z.

    In training, BN uses the statistics of the N rows given and updates the
    running statistics in place (unbiased variance), like nn.BatchNorm1d.
    """
    p = torch.sigmoid(F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training,
                                   momentum, eps))
    return p * z + (1 - p) * alpha.reshape(-1) * z


def din_attention_ref(
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
    """DIN attention pooling, reference implementation.

    query [B, D] or [B, 1, D], keys [B, T, D], lengths [B] (optional), mask [B, T]
    bool (optional).  weights/biases: the L hidden nn.Linear layers followed by the
    output layer, in nn.Linear layout: weights[0] [H1, 4D] (input blocks
    q | k | q-k | q*k), weights[l] [H_{l+1}, H_l], weights[L] [1, H_L].
    alphas[l]: PReLU/Dice slope ([1] or [H_l] or [H_l, 1]).  Dice also takes
    bn_weights/bn_biases/running_means/running_vars [H_l] per layer.

    Returns out shaped like query, and the weights [B, T] (zero at invalid positions)
    when return_scores.
    """
    q = query.squeeze(1) if query.dim() == 3 else query  # DeepCTR's [B, 1, D] too
    B, T, D = keys.shape
    L = len(weights) - 1
    valid = valid_positions(T, lengths, mask, batch=B, device=keys.device)
    kv = keys[valid]                                      # [N, D], valid keys only
    qv = q[:, None, :].expand(B, T, D)[valid]             # [N, D]
    h = torch.cat([qv, kv, qv - kv, qv * kv], dim=-1)     # [N, 4D]
    for l in range(L):
        z = F.linear(h, weights[l], biases[l])
        if activation == "sigmoid":
            h = torch.sigmoid(z)
        elif activation == "relu":
            h = torch.relu(z)
        elif activation == "prelu":
            h = torch.where(z > 0, z, alphas[l].reshape(-1) * z)
        elif activation == "dice":
            h = dice_ref(z, alphas[l], bn_weights[l], bn_biases[l], running_means[l], running_vars[l],
                         training, momentum, eps)
        else:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    s = F.linear(h, weights[L], biases[L]).squeeze(-1)    # [N]
    scores = s.new_zeros(B, T).index_put((valid.nonzero(as_tuple=True)), s)
    if normalization == "softmax":
        logits = (scale * scores).masked_fill(~valid, float("-inf"))
        # An empty row would be all -inf (NaN softmax); give it finite logits and
        # zero its weights below.
        logits = logits.masked_fill(~valid.any(dim=1, keepdim=True), 0.0)
        w = torch.softmax(logits, dim=1).masked_fill(~valid, 0.0)
    elif normalization == "none":
        w = scores
    else:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    out = torch.einsum("bt,btd->bd", w, keys.masked_fill(~valid[..., None], 0.0)).reshape(query.shape)
    return (out, w) if return_scores else out


def tile_jagged(values: Tensor, offsets: Tensor, row_seq: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The padded (tiled) equivalent of a jagged input, differentiable in values.

    values [N, D], offsets [S+1] (sequence s = values[offsets[s]:offsets[s+1]]), row_seq [R]
    or None (row r uses sequence r).  Returns keys [R, T, D] (T = the longest row; entries
    past a row's length are arbitrary values, never read as valid) and lengths [R] int64.
    This is what din_attention_jagged means: din_attention on (query, keys, lengths).
    """
    offsets = offsets.to(torch.int64)
    seq_len = offsets[1:] - offsets[:-1]
    seq = torch.arange(len(seq_len), device=values.device) if row_seq is None else row_seq.to(torch.int64)
    lengths = seq_len[seq]
    T = int(lengths.max()) if lengths.numel() else 0
    if values.shape[0] == 0:
        return values.new_zeros(len(seq), T, values.shape[1]), lengths
    idx = offsets[seq][:, None] + torch.arange(T, device=values.device)[None, :]
    return values[idx.clamp(max=values.shape[0] - 1)], lengths
