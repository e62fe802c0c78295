"""Functional API: DIN attention pooling with explicit parameters, padded or jagged."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch._C._functorch as _functorch
import torch.autograd.forward_ad as _fwAD
from torch import Tensor

from .ops import _to, call_forward, check_inputs, check_jagged_inputs, din_fwd, din_jagged_fwd
from .params import MLPParams


def _check_transforms(*tensors) -> None:
    # The custom ops register a backward only.  Under forward-mode AD (forward_ad
    # dual tensors or torch.func.jvp) torch would treat them as constants and hand
    # back zero tangents (issue 14): refuse instead of answering wrongly.  torch.func.grad
    # and vmap fail inside torch on the op (no setup_context, no batching rule): refuse
    # them by name.  The common case (no dual level, no functorch transform) costs two lookups.
    if torch.compiler.is_compiling():
        return
    dual = _fwAD._current_level >= 0 and any(
        isinstance(t, Tensor) and _fwAD.unpack_dual(t).tangent is not None for t in tensors)
    kinds = set()
    if _functorch.peek_interpreter_stack() is not None \
            and any(isinstance(t, Tensor) and _functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        kinds = {i.key() for i in retrieve_all_functorch_interpreters()}
    if dual or _functorch.TransformType.Jvp in kinds:
        raise NotImplementedError(
            "din_fused's fused op has no forward-mode AD (torch.func.jvp, torch.autograd.forward_ad): "
            "use reverse mode (loss.backward(), torch.autograd.grad), or din_attention_ref for forward mode")
    for kind, name in ((_functorch.TransformType.Grad, "torch.func.grad / vjp"),
                       (_functorch.TransformType.Vmap, "torch.func.vmap")):
        if kind in kinds:
            raise NotImplementedError(
                f"din_fused's fused op does not run under {name}: use torch.autograd (loss.backward(), "
                f"torch.autograd.grad) and batch by hand, or din_attention_ref under torch.func")


def _param_tensors(params: MLPParams) -> list:
    """Every tensor of the bundle the op reads (alphas, BatchNorm affines and statistics too)."""
    return [t for group in params.op_args() for t in group]


def _autocast(query, keys):
    """query and keys inside an autocast region for their device, in one dtype, as autocast
    treats its own ops: on CUDA, whose kernels read float16/bfloat16, cast to the autocast dtype
    like a matmul; on the CPU, whose kernels compute in float32 whatever they are given,
    promoted to the wider of the two like autocast's "promote" ops (a bfloat16 copy of float32
    keys would only round).  A query from an autocast Linear (bfloat16) and keys from an
    embedding (float32) then work together, as they do in the eager ops the layer replaces.
    float64 is left alone on CUDA, as autocast leaves it; outside autocast both pass as given."""
    if not (isinstance(query, Tensor) and isinstance(keys, Tensor)) \
            or not (query.is_floating_point() and keys.is_floating_point()):
        return query, keys  # (check_inputs names what is wrong)
    dev = keys.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return query, keys
    if dev == "cuda":
        if torch.float64 in (query.dtype, keys.dtype):
            return query, keys
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = torch.promote_types(query.dtype, keys.dtype)
    return query.to(dtype), keys.to(dtype)


def _run(op, query, keys, idx1, idx2, p: MLPParams, training, normalization, scale):
    dice = p.activation == "dice"
    if dice and training and p.momentum is None:
        raise ValueError("momentum=None (a cumulative average) needs the number of batches seen: pass "
                         "momentum=1/num_batches (FusedDINAttention does this from its BatchNorm)")
    out, w, stats = call_forward(op, query, keys, idx1, idx2, *p.op_args(), p.activation, normalization,
                                 float(scale), bool(training and dice), float(p.eps))
    if dice and training:
        p.update_running_stats(stats)
    return out, w


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
        query [B, D] or [B, 1, D], keys [B, T, D] (float32/float64; float16/bfloat16 are computed
        in float32 on CPU); lengths [B] int32/int64 in 0..T and/or mask [B, T] bool
        (a position is valid when both allow it; neither means all valid).
        weights/biases: L hidden nn.Linear layers (1 <= L <= 4, widths 1..256) then the
        output Linear: weights[0] [H1, 4D] over [q, k, q-k, q*k], weights[l] [H_{l+1}, H_l],
        weights[L] [1, H_L]; biases likewise.
        activation "sigmoid" | "relu" | "prelu" (alphas[l]: 1 or H_l values) | "dice"
        (alphas, bn_weights, bn_biases, running_means, running_vars: H_l values per layer).
        normalization "none" (w = score) or "softmax" (w = softmax(scale * score) over
        valid positions).  scale: a number (a tensor that requires grad is refused).
    Returns:
        out shaped like query, or (out, w) with the weights w [B, T] (zero where invalid) when
        return_scores.

    Inside torch.autocast, query and keys are first brought to one dtype (_autocast): the
    autocast dtype on CUDA, the wider of the two on the CPU; out comes back in that dtype.

    Dice in training mode uses BatchNorm statistics over the valid positions and
    updates running_means/running_vars in place (momentum, unbiased variance), like
    nn.BatchNorm1d.  Gradients flow to query, keys and every parameter (reverse mode
    only: forward-mode AD raises NotImplementedError).
    """
    p = MLPParams(weights, biases, activation, alphas, bn_weights, bn_biases, running_means, running_vars,
                  momentum, eps)
    return din_attention_p(query, keys, lengths, mask, params=p, training=training,
                           normalization=normalization, scale=scale, return_scores=return_scores)


def din_attention_p(query: Tensor, keys: Tensor, lengths: Tensor | None = None, mask: Tensor | None = None,
                    *, params: MLPParams, training: bool = False, normalization: str = "none",
                    scale: float = 1.0, return_scores: bool = False):
    """din_attention with the parameters as one MLPParams bundle."""
    query, keys = _autocast(query, keys)
    check_inputs(query, keys, lengths, mask, params, normalization, scale, query_3d=True)
    _check_transforms(query, keys, lengths, mask, *_param_tensors(params))
    B, T, _ = keys.shape
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=keys.device)
    out, scores = _run(din_fwd, query, keys, lengths, mask, params, training, normalization, scale)
    if return_scores:
        return out, _to(scores, query.dtype)
    return out


def din_attention_jagged(
    query: Tensor,
    values: Tensor,
    offsets: Tensor,
    row_seq: Tensor | None = None,
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
    """Fused DIN attention pooling over jagged (and shared) histories, no padding.

    Shapes:
        query [R, D] or [R, 1, D]: one row per candidate.
        values [N, D]: the behaviours of all sequences back to back.
        offsets [S+1] int32/int64: sequence s is values[offsets[s]:offsets[s+1]]
        (offsets[0] == 0, non-decreasing, offsets[S] == N).
        row_seq [R] int32/int64 in [0, S), or None (then S == R and row r uses sequence r):
        row r attends over sequence row_seq[r]; many rows may share one sequence.
        The parameters and options are those of din_attention.
    Returns:
        out shaped like query; with return_scores, (out, w, row_offsets): w [row_offsets[R]] holds the
        weights of row r at w[row_offsets[r]:row_offsets[r+1]], one per position of its
        sequence, and row_offsets [R+1] int64 is the cumulative sum of the rows' lengths.

    Every result equals din_attention on the padded (or, for shared sequences, tiled)
    input: keys[r, t] = values[offsets[s] + t] with s = row_seq[r], lengths[r] = len(s).
    Training-mode Dice counts every valid (row, position) pair, as tiling would.  A shared
    sequence's gradient is the sum over its rows, taken in a fixed order on CPU.
    """
    p = MLPParams(weights, biases, activation, alphas, bn_weights, bn_biases, running_means, running_vars,
                  momentum, eps)
    return din_attention_jagged_p(query, values, offsets, row_seq, params=p, training=training,
                                  normalization=normalization, scale=scale, return_scores=return_scores)


def din_attention_jagged_p(query: Tensor, values: Tensor, offsets: Tensor, row_seq: Tensor | None = None,
                           *, params: MLPParams, training: bool = False, normalization: str = "none",
                           scale: float = 1.0, return_scores: bool = False):
    """din_attention_jagged with the parameters as one MLPParams bundle."""
    query, values = _autocast(query, values)
    check_jagged_inputs(query, values, offsets, row_seq, params, normalization, scale, query_3d=True)
    _check_transforms(query, values, offsets, row_seq, *_param_tensors(params))
    out, w = _run(din_jagged_fwd, query, values, offsets, row_seq, params, training, normalization, scale)
    if not return_scores:
        return out
    lens = offsets[1:] - offsets[:-1]
    if row_seq is not None:
        lens = lens[row_seq]
    row_offsets = torch.cat([lens.new_zeros(1), torch.cumsum(lens, 0)]).to(torch.int64)
    return out, _to(w, query.dtype), row_offsets
