"""The fused op: a torch.library custom op with a fake implementation and a
registered backward, over the raw-pointer kernels in ``din_fused._C``.

Python owns allocation, validation and autograd; ``_C`` only sees pointers,
sizes and the current CUDA stream.  The ops are opaque to torch.compile, so the
data-dependent checks (length ranges) live here, in the real implementations.

Op signature (all tensors are on one device):
    din_fused::din_fwd(query [B,D], keys [B,T,D], lengths int64 [B], mask bool [B,T]?,
                       weights[L+1], biases[L+1], alphas[], bn_weights[], bn_biases[],
                       running_means[], running_vars[], activation, normalization, scale,
                       training, eps)
      -> out [B,D] (query dtype), scores [B,T] (accumulation dtype), stats [L,3,Hmax]
    stats rows: mean, 1/sqrt(var+eps), unbiased var of the Dice BatchNorm statistics in
    use (batch statistics in training, running ones in eval; zeros for other
    activations).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C
from .reference import ACTIVATIONS, NORMALIZATIONS

MAX_LAYERS = 4
MAX_WIDTH = 256
_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
_NORM_CODE = {name: i for i, name in enumerate(NORMALIZATIONS)}
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


# --------------------------------------------------------------------------------------
# Validation: written once, called by every public entry point.
# --------------------------------------------------------------------------------------
def check_inputs(query, keys, lengths, mask, weights, biases, activation, alphas, bn_weights,
                 bn_biases, running_means, running_vars, normalization) -> None:
    """Shape, dtype and device checks; raise ValueError/TypeError naming the argument."""
    for name, t in (("query", query), ("keys", keys)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if keys.dim() != 3:
        raise ValueError(f"keys must have shape [B, T, D], got {tuple(keys.shape)}")
    B, T, D = keys.shape
    if query.dim() != 2:
        raise ValueError(f"query must have shape [B, D] = [{B}, {D}], got {tuple(query.shape)}")
    if query.shape[0] != B:
        raise ValueError(f"query has batch {query.shape[0]} but keys has batch {B}")
    if query.shape[1] != D:
        raise ValueError(f"query has dim {query.shape[1]} but keys has dim {D}")
    if query.dtype != keys.dtype:
        raise TypeError(f"query ({query.dtype}) and keys ({keys.dtype}) must have the same dtype")
    dev = keys.device
    if query.device != dev:
        raise ValueError(f"query is on {query.device} but keys is on {dev}")
    if lengths is not None:
        if not isinstance(lengths, Tensor):
            raise TypeError(f"lengths must be a torch.Tensor, got {type(lengths).__name__}")
        if lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"lengths must be int32 or int64, got {lengths.dtype}")
        if lengths.dim() != 1 or lengths.shape[0] != B:
            raise ValueError(f"lengths must have shape [B] = [{B}], got {tuple(lengths.shape)}")
        if lengths.device != dev:
            raise ValueError(f"lengths is on {lengths.device} but keys is on {dev}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != (B, T):
            raise ValueError(f"mask must have shape [B, T] = [{B}, {T}], got {tuple(mask.shape)}")
        if mask.device != dev:
            raise ValueError(f"mask is on {mask.device} but keys is on {dev}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    L = len(weights) - 1
    if not 1 <= L <= MAX_LAYERS:
        raise ValueError(f"weights must hold 1..{MAX_LAYERS} hidden layers plus the output layer, "
                         f"got {len(weights)} matrices")
    if len(biases) != L + 1:
        raise ValueError(f"biases must have {L + 1} entries (one per Linear), got {len(biases)}")
    fan_in = 4 * D
    for l, (w, b) in enumerate(zip(weights, biases)):
        out = 1 if l == L else (w.shape[0] if w.dim() == 2 else -1)
        if l < L and not 1 <= out <= MAX_WIDTH:
            raise ValueError(f"hidden layer {l} width must be in 1..{MAX_WIDTH}, got weights[{l}] "
                             f"of shape {tuple(w.shape)}")
        if tuple(w.shape) != (out, fan_in):
            raise ValueError(f"weights[{l}] must have shape [{out}, {fan_in}], got {tuple(w.shape)}")
        if tuple(b.shape) != (out,):
            raise ValueError(f"biases[{l}] must have shape [{out}], got {tuple(b.shape)}")
        for name, t in ((f"weights[{l}]", w), (f"biases[{l}]", b)):
            if not t.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {t.dtype}")
            if t.device != dev:
                raise ValueError(f"{name} is on {t.device} but keys is on {dev}")
        fan_in = out
    hidden = [w.shape[0] for w in weights[:L]]
    per_layer = []
    if activation in ("prelu", "dice"):
        per_layer.append(("alphas", alphas))
    if activation == "dice":
        per_layer += [("bn_weights", bn_weights), ("bn_biases", bn_biases),
                      ("running_means", running_means), ("running_vars", running_vars)]
    for name, seq in per_layer:
        if seq is None or len(seq) != L:
            got = "None" if seq is None else f"{len(seq)} entries"
            raise ValueError(f"{activation} needs {name} with one tensor per hidden layer ({L}), got {got}")
        for l, t in enumerate(seq):
            n = t.numel()
            ok = n == hidden[l] or (name == "alphas" and activation == "prelu" and n == 1)
            if not ok or not t.is_floating_point():
                raise ValueError(f"{name}[{l}] must be a float tensor with {hidden[l]} elements"
                                 f"{' (or 1 for prelu)' if name == 'alphas' else ''}, "
                                 f"got shape {tuple(t.shape)} dtype {t.dtype}")
            if t.device != dev:
                raise ValueError(f"{name}[{l}] is on {t.device} but keys is on {dev}")


def _check_lengths_values(lengths: Tensor, T: int) -> None:
    # A data-dependent check: on CUDA it synchronises, so it is skipped while a
    # CUDA graph is being captured (the kernels clamp lengths to [0, T] anyway).
    if lengths.numel() == 0:
        return
    if lengths.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = torch.aminmax(lengths)
    if int(lo) < 0 or int(hi) > T:
        raise ValueError(f"lengths must lie in [0, T] = [0, {T}], got values in [{int(lo)}, {int(hi)}]")


# --------------------------------------------------------------------------------------
# Building the params dict for _C
# --------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compute_dtype(t: Tensor) -> torch.dtype:
    # CPU kernels compute in fp32/fp64; CUDA kernels read fp16/bf16 natively.
    if t.dtype == torch.float64:
        return torch.float64
    if t.is_cuda:
        return t.dtype
    return torch.float32


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _ptrs(ts) -> list:
    return [None if t is None else t.data_ptr() for t in ts]


class _Prepared:
    """Inputs converted to the kernels' layouts, plus the common cfg dict."""

    def __init__(self, query, keys, lengths, mask, weights, biases, alphas, bn_weights, bn_biases,
                 activation, normalization, scale):
        B, T, D = keys.shape
        self.B, self.T, self.D, self.L = B, T, D, len(weights) - 1
        self.out_dtype = query.dtype
        cdt = _compute_dtype(keys)
        self.acc = acc = _acc_dtype(cdt)
        self.q = query.to(cdt).contiguous()
        self.k = keys.to(cdt).contiguous()
        self.lengths = lengths.to(torch.int64).contiguous()
        self.mask = None if mask is None else mask.contiguous()
        self.weights = [w.detach().to(acc).contiguous() for w in weights]
        self.biases = [b.detach().to(acc).contiguous() for b in biases]
        hidden = [w.shape[0] for w in weights[:-1]]
        self.hidden = hidden
        # PReLU's single alpha is broadcast per channel; the backward sums it back.
        self.alphas = [a.detach().to(acc).reshape(-1).expand(h).contiguous()
                       for a, h in zip(alphas, hidden)] if alphas else []
        self.gammas = [g.detach().to(acc).reshape(-1).contiguous() for g in bn_weights] if bn_weights else []
        self.betas = [b.detach().to(acc).reshape(-1).contiguous() for b in bn_biases] if bn_biases else []
        dev = keys.device
        self.seq_start = torch.arange(B, device=dev, dtype=torch.int64) * (T * D)
        self.cfg = {
            "rows": B, "dim": D, "max_len": T, "hidden": hidden,
            "act": _ACT_CODE[activation], "norm": _NORM_CODE[normalization], "scale": float(scale),
            "dtype": _DTYPE_CODE[cdt], "num_threads": torch.get_num_threads(),
            "deterministic": True,
            "q": _ptr(self.q), "ldq": D, "k": _ptr(self.k), "ldk": D,
            "seq_start": _ptr(self.seq_start), "seq_len": _ptr(self.lengths),
            "mask": _ptr(self.mask), "ld_mask": T,
            "W": _ptrs(self.weights), "b": _ptrs(self.biases),
            "alpha": _ptrs(self.alphas), "bn_gamma": _ptrs(self.gammas), "bn_beta": _ptrs(self.betas),
            "is_cuda": keys.is_cuda,
        }
        if keys.is_cuda:
            self.cfg["device"] = keys.device.index
            self.cfg["stream"] = torch.cuda.current_stream(keys.device).cuda_stream

    def workspace(self, phase: str) -> Tensor:
        nbytes = _C.workspace_bytes(self.cfg, phase)
        ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.k.device)
        self.cfg["workspace"] = ws.data_ptr()
        self.cfg["workspace_bytes"] = nbytes
        self._ws = ws  # keep it alive for the kernel call
        return ws

    def set_stats(self, stats: Tensor) -> None:
        """stats [L, 3, Hmax]: point the kernels at the mean and invstd rows."""
        self.cfg["bn_mean"] = [stats[l, 0].data_ptr() for l in range(self.L)]
        self.cfg["bn_invstd"] = [stats[l, 1].data_ptr() for l in range(self.L)]

    def valid_count(self) -> Tensor:
        valid = torch.arange(self.T, device=self.k.device)[None, :] < self.lengths[:, None]
        if self.mask is not None:
            valid = valid & self.mask
        return valid.sum()


def _mask_lengths(mask: Tensor, lengths: Tensor | None) -> Tensor:
    # With a mask, the kernels need only scan up to the last valid position.
    T = mask.shape[1]
    last = torch.where(mask, torch.arange(1, T + 1, device=mask.device), 0).amax(dim=1) if T else \
        torch.zeros(mask.shape[0], dtype=torch.int64, device=mask.device)
    return last if lengths is None else torch.minimum(last, lengths.to(torch.int64))


def _bn_stats(prep: _Prepared, running_means, running_vars, training: bool, eps: float) -> Tensor:
    """[L, 3, Hmax] acc dtype: mean, invstd and unbiased var used by each Dice layer."""
    L, Hmax = prep.L, max(prep.hidden)
    stats = torch.zeros(L, 3, Hmax, dtype=prep.acc, device=prep.k.device)
    if not training:
        for l, (m, v) in enumerate(zip(running_means, running_vars)):
            h = prep.hidden[l]
            stats[l, 0, :h] = m.detach().reshape(-1).to(prep.acc)
            stats[l, 1, :h] = torch.rsqrt(v.detach().reshape(-1).to(prep.acc) + eps)
            stats[l, 2, :h] = v.detach().reshape(-1).to(prep.acc)
        prep.set_stats(stats)
        return stats
    n = prep.valid_count()
    nf = n.to(torch.float64)
    if not (n.is_cuda and torch.cuda.is_current_stream_capturing()) and int(n) < 2:
        raise ValueError(f"dice in training mode needs at least 2 valid positions in the batch for "
                         f"BatchNorm statistics, got {int(n)}")
    prep.set_stats(stats)
    prep.workspace("stats")
    for l in range(L):
        h = prep.hidden[l]
        # The kernels return the mean and M2 = sum((z - mean)^2), merged with Chan's
        # formula: no E[z^2] - E[z]^2, which cancels when |mean| >> std.
        mean_m2 = torch.empty(2, h, dtype=torch.float64, device=prep.k.device)
        _C.stats({**prep.cfg, "stats_layer": l, "stats_out": mean_m2.data_ptr()})
        mean = mean_m2[0]
        var = mean_m2[1] / nf
        stats[l, 0, :h] = mean.to(prep.acc)
        stats[l, 1, :h] = torch.rsqrt(var + eps).to(prep.acc)
        stats[l, 2, :h] = (var * nf / (nf - 1).clamp_min(1.0)).to(prep.acc)
    return stats


# --------------------------------------------------------------------------------------
# Forward op
# --------------------------------------------------------------------------------------
@torch.library.custom_op("din_fused::din_fwd", mutates_args=())
def din_fwd(query: Tensor, keys: Tensor, lengths: Tensor, mask: Tensor | None,
            weights: list[Tensor], biases: list[Tensor], alphas: list[Tensor],
            bn_weights: list[Tensor], bn_biases: list[Tensor], running_means: list[Tensor],
            running_vars: list[Tensor], activation: str, normalization: str, scale: float,
            training: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    B, T, D = keys.shape
    _check_lengths_values(lengths, T)
    if mask is not None:
        lengths = _mask_lengths(mask, lengths)
    prep = _Prepared(query, keys, lengths, mask, weights, biases, alphas, bn_weights, bn_biases,
                     activation, normalization, scale)
    if activation == "dice":
        stats = _bn_stats(prep, running_means, running_vars, training, eps)
    else:
        stats = torch.zeros(prep.L, 3, max(prep.hidden), dtype=prep.acc, device=keys.device)
    out = torch.empty(B, D, dtype=prep.q.dtype, device=keys.device)
    scores = torch.empty(B, T, dtype=prep.acc, device=keys.device)
    if B > 0:
        prep.workspace("forward")
        _C.forward({**prep.cfg, "out": out.data_ptr(), "ldo": D, "scores": scores.data_ptr(),
                    "ld_scores": T})
    return out.to(query.dtype), scores, stats


@din_fwd.register_fake
def _(query, keys, lengths, mask, weights, biases, alphas, bn_weights, bn_biases, running_means,
      running_vars, activation, normalization, scale, training, eps):
    B, T, D = keys.shape
    acc = _acc_dtype(query.dtype)
    L, Hmax = len(weights) - 1, max(w.shape[0] for w in weights[:-1])
    return (query.new_empty(B, D), query.new_empty(B, T, dtype=acc),
            query.new_empty(L, 3, Hmax, dtype=acc))


# --------------------------------------------------------------------------------------
# Backward op
# --------------------------------------------------------------------------------------
@torch.library.custom_op("din_fused::din_bwd", mutates_args=())
def din_bwd(grad_out: Tensor, grad_scores: Tensor | None, query: Tensor, keys: Tensor,
            lengths: Tensor, mask: Tensor | None, weights: list[Tensor], biases: list[Tensor],
            alphas: list[Tensor], bn_weights: list[Tensor], bn_biases: list[Tensor], stats: Tensor,
            scores: Tensor, activation: str, normalization: str, scale: float,
            training: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Returns dq [B,D], dk [B,T,D] and the parameter gradients in the order
    weights, biases, alphas, bn_weights, bn_biases (each list as given)."""
    B, T, D = keys.shape
    if mask is not None:
        lengths = _mask_lengths(mask, lengths)
    prep = _Prepared(query, keys, lengths, mask, weights, biases, alphas, bn_weights, bn_biases,
                     activation, normalization, scale)
    acc, dev, L = prep.acc, keys.device, prep.L
    g = grad_out.to(prep.q.dtype).contiguous()
    gs = None if grad_scores is None else grad_scores.to(acc).contiguous()
    scores = scores.contiguous()
    prep.cfg.update({"dout": g.data_ptr(), "ld_dout": D, "scores": scores.data_ptr(), "ld_scores": T,
                     "dscores": _ptr(gs), "ld_dscores": T})
    dq = torch.empty(B, D, dtype=prep.q.dtype, device=dev)
    dk = torch.zeros(B, T, D, dtype=prep.q.dtype, device=dev)
    dW = [torch.empty_like(w) for w in prep.weights]
    db = [torch.empty_like(b) for b in prep.biases]
    dalpha = [torch.empty_like(a) for a in prep.alphas]
    dgamma = [torch.empty_like(a) for a in prep.gammas]
    dbeta = [torch.empty_like(a) for a in prep.betas]
    if B == 0:
        for t in dW + db + dalpha + dgamma + dbeta:
            t.zero_()
    else:
        stats = stats.contiguous()
        prep.set_stats(stats)
        # One workspace serves the reduce passes and the full backward (CUDA sizes
        # it for both; the CPU only uses it in the full pass).
        prep.workspace("backward")
        if activation == "dice" and training:
            # Batch statistics couple all positions: from the top layer down, reduce
            # mean(dxhat) and mean(dxhat*xhat) with the corrections above known.
            nf = prep.valid_count().to(torch.float64)
            corr = torch.zeros(L, 2, max(prep.hidden), dtype=acc, device=dev)
            prep.cfg["bn_corr_a"] = [corr[l, 0].data_ptr() for l in range(L)]
            prep.cfg["bn_corr_c"] = [corr[l, 1].data_ptr() for l in range(L)]
            for l in reversed(range(L)):
                h = prep.hidden[l]
                sums = torch.empty(2, h, dtype=torch.float64, device=dev)
                _C.backward({**prep.cfg, "reduce_layer": l, "reduce_out": sums.data_ptr()})
                corr[l, :, :h] = (sums / nf).to(acc)
        _C.backward({**prep.cfg, "dq": dq.data_ptr(), "lddq": D, "dk": dk.data_ptr(),
                     "dW": _ptrs(dW), "db": _ptrs(db), "dalpha": _ptrs(dalpha),
                     "dgamma": _ptrs(dgamma), "dbeta": _ptrs(dbeta)})
    # Back to the callers' dtypes and shapes (PReLU's scalar alpha sums its channels).
    grads = [d.to(w.dtype) for d, w in zip(dW, weights)] + [d.to(b.dtype) for d, b in zip(db, biases)]
    grads += [(d.sum() if a.numel() == 1 else d).reshape(a.shape).to(a.dtype) for d, a in zip(dalpha, alphas)]
    grads += [d.reshape(a.shape).to(a.dtype) for d, a in zip(dgamma, bn_weights)]
    grads += [d.reshape(a.shape).to(a.dtype) for d, a in zip(dbeta, bn_biases)]
    return dq.to(query.dtype), dk.to(keys.dtype), grads


@din_bwd.register_fake
def _(grad_out, grad_scores, query, keys, lengths, mask, weights, biases, alphas, bn_weights,
      bn_biases, stats, scores, activation, normalization, scale, training):
    params = list(weights) + list(biases) + list(alphas) + list(bn_weights) + list(bn_biases)
    return query.new_empty(query.shape), keys.new_empty(keys.shape), [torch.empty_like(p) for p in params]


# --------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    (query, keys, lengths, mask, weights, biases, alphas, bn_weights, bn_biases, _rm, _rv,
     activation, normalization, scale, training, _eps) = inputs
    _out, scores, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(query, keys, lengths, mask, scores, stats, *weights, *biases, *alphas,
                          *bn_weights, *bn_biases)
    ctx.sizes = (len(weights), len(alphas), len(bn_weights))
    ctx.attrs = (activation, normalization, scale, training)


def _backward(ctx, grad_out, grad_scores, _grad_stats):
    query, keys, lengths, mask, scores, stats, *params = ctx.saved_tensors
    nw, na, nb = ctx.sizes
    weights, biases = params[:nw], params[nw:2 * nw]
    alphas = params[2 * nw:2 * nw + na]
    bn_weights = params[2 * nw + na:2 * nw + na + nb]
    bn_biases = params[2 * nw + na + nb:]
    activation, normalization, scale, training = ctx.attrs
    if grad_out is None:
        grad_out = torch.zeros_like(query)
    dq, dk, grads = din_bwd(grad_out, grad_scores, query, keys, lengths, mask, list(weights),
                            list(biases), list(alphas), list(bn_weights), list(bn_biases), stats,
                            scores, activation, normalization, scale, training)
    i = 0
    split = []
    for n in (nw, nw, na, nb, nb):
        split.append(grads[i:i + n])
        i += n
    no_grad_stats = [None] * nb  # running statistics are buffers
    return (dq, dk, None, None, *split, no_grad_stats, no_grad_stats, None, None, None, None, None)


torch.library.register_autograd("din_fused::din_fwd", _backward, setup_context=_setup_context)
