"""Serving: export a model that uses the fused op for runtimes without din_fused.

Three paths, all starting from ``torch.export``:

* ``torch.export`` as is (:func:`export`): the graph keeps ``torch.ops.din_fused.din_fwd``
  (``din_jagged_fwd`` for the jagged layout); ``torch.export.save``/``load`` round-trip it,
  and the loading process must import din_fused (the op's kernels live there).  Outputs
  are bitwise those of the eager model.
* AOTInductor (:func:`aoti_package`) and ONNX (:func:`onnx_export`): each op is first
  replaced by the same computation written in plain aten ops (:func:`din_fwd_aten`,
  :func:`din_jagged_fwd_aten`, through :func:`to_aten`), so the artifact needs neither
  Python nor din_fused.  A ``.pt2`` runs under ``torch._inductor.aoti_load_package`` or
  libtorch's ``AOTIModelPackageLoader`` (examples/serving_cpp); a ``.onnx`` runs under
  onnxruntime.

Why a decomposition rather than a C++ op registered with libtorch: ONNX cannot call a
torch op at all, so it needs the decomposition anyway, and with it one description of the
op serves every runtime.  A libtorch op would also make din_fused build against libtorch
(an optional second build, ABI-tied to one torch version) and ship a shared library next
to every artifact.  The price is that the served graph runs Inductor's (or onnxruntime's)
kernels instead of the fused one: a served forward in eval mode is a few small GEMMs and
elementwise ops, and its outputs match the fused op within fp32 rounding.

A ``din_fused.model`` model's jagged forward is exported through :class:`JaggedDIN`,
which takes plain tensors rather than a JaggedBatch.

Supported by the decompositions: eval mode (Dice with running statistics), every
activation ("sigmoid", "relu", "prelu", "dice"), both normalisations, lengths and/or
mask, the jagged layout with and without shared sequences (row_seq), float32/float64
(float16/bfloat16 computed in float32, like the CPU kernels).  Not supported:
training-mode Dice (batch statistics couple the whole batch; not a serving concern), for
which they raise.  The data-dependent input checks of the fused op cannot live in an
ahead-of-time compiled graph: out-of-range lengths are clamped to [0, T] (as the kernels
do), values outside [offsets[0], offsets[S]) belong to no sequence; validate offsets
before serving.

Torch versions: the three paths pass their tests from torch 2.7 (the range tested is ``SERVING_TESTED``;
on 2.10.0 a fresh process must ``import torch._inductor.codecache`` before
``aoti_load_package``, pytorch#173706).  Older torch gets an error that names what it
lacks from :func:`onnx_export`, from a jagged :func:`export` and, before 2.6, from
:func:`aoti_package`; :func:`export` of the padded layout works from torch 2.4.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.din_fused.*)

__all__ = ["din_fwd_aten", "din_jagged_fwd_aten", "decompositions", "din_dynamic_shapes",
           "JaggedDIN", "din_jagged_dynamic_shapes", "jagged_dynamic_shapes", "export", "to_aten",
           "aoti_package", "onnx_export"]

# The oldest torch on which every serving path passes its tests: before it, the ONNX exporter
# takes no ExportedProgram (2.4) or fails to translate the MLP's batch norm (2.5, 2.6), and
# torch.export fails inside torch on the jagged op with dynamic rows (2.4, 2.5; 2.6 when rows
# share sequences).  AOTInductor packages exist from 2.6.
SERVING_TORCH = (2, 7)
# The oldest and newest torch on which the serving tests have passed (README, "Build").
SERVING_TESTED = ("2.7.1", "2.15.0")
_TORCH = torch.torch_version.TorchVersion(torch.__version__)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_eval(training: bool, activation: str) -> None:
    if training and activation == "dice":
        raise NotImplementedError("din_fused.serving decompositions serve eval mode only: training-mode "
                                  "Dice uses batch statistics; call model.eval() before exporting")


def _scores(q: Tensor, k: Tensor, per_row, weights, biases, alphas, bn_weights, bn_biases, running_means,
            running_vars, activation: str, eps: float, acc: torch.dtype):
    """Activation-unit scores of keys k [..., P, D] (zero where invalid) against their rows'
    queries q [R, D]; per_row maps a per-row tensor [R, X] onto k's positions.  Also returns
    the Dice statistics [L, 3, Hmax] in the op's layout."""
    D = q.shape[1]
    L = len(weights) - 1
    W = [w.to(acc) for w in weights]
    bs = [b.to(acc) for b in biases]
    # The first layer folded as in the kernels (README "How the fold works"):
    # z1 = (Wk - Wd) k + Wm (q * k) + (Wq + Wd) q + b1, so no [..., 4D] tensor is built.
    Wq, Wk, Wd, Wm = W[0].split(D, dim=1)
    z = F.linear(k, Wk - Wd) + F.linear(per_row(q) * k, Wm) + per_row(F.linear(q, Wq + Wd, bs[0]))
    h = z
    stats = []
    hmax = max(w.shape[0] for w in weights[:L])
    for l in range(L):
        if l > 0:
            z = F.linear(h, W[l], bs[l])
        if activation == "sigmoid":
            h = torch.sigmoid(z)
        elif activation == "relu":
            h = torch.relu(z)
        elif activation == "prelu":
            h = torch.where(z > 0, z, alphas[l].to(acc).reshape(-1) * z)
        elif activation == "dice":
            mean = running_means[l].to(acc).reshape(-1)
            var = running_vars[l].to(acc).reshape(-1)
            invstd = torch.rsqrt(var + eps)
            p = torch.sigmoid((z - mean) * invstd * bn_weights[l].to(acc).reshape(-1)
                              + bn_biases[l].to(acc).reshape(-1))
            h = p * z + (1 - p) * alphas[l].to(acc).reshape(-1) * z
            stats.append(F.pad(torch.stack([mean, invstd, var]), (0, hmax - mean.shape[0])))
        else:
            raise ValueError(f"unknown activation {activation!r}")
    s = F.linear(h, W[L], bs[L]).squeeze(-1)
    stats_t = torch.stack(stats) if stats else torch.zeros(L, 3, hmax, dtype=acc, device=q.device)
    return s, stats_t


def din_fwd_aten(query: Tensor, keys: Tensor, lengths: Tensor, mask: Tensor | None,
                 weights: Sequence[Tensor], biases: Sequence[Tensor], alphas: Sequence[Tensor],
                 bn_weights: Sequence[Tensor], bn_biases: Sequence[Tensor],
                 running_means: Sequence[Tensor], running_vars: Sequence[Tensor], activation: str,
                 normalization: str, scale: float, training: bool, eps: float):
    """``din_fused::din_fwd`` in plain aten ops, inference only (same arguments and outputs).

    query [B, D], keys [B, T, D], lengths [B] int, mask [B, T] bool or None; parameters as
    ``din_fused.functional.din_attention``.  Returns out [B, D] (query dtype), the weights
    [B, T] (accumulation dtype, zero where invalid) and the Dice statistics [L, 3, Hmax]
    (running mean, 1/sqrt(var + eps), var; zeros for other activations).

    Every shape is static in D and the layer widths and symbolic in B and T, with no
    data-dependent shape, so it traces under ``torch.export`` with dynamic B and T.
    """
    _check_eval(training, activation)
    B, T, D = keys.shape
    acc = _acc_dtype(query.dtype)
    valid = torch.arange(T, device=keys.device)[None, :] < lengths.reshape(-1, 1)
    if mask is not None:
        valid = valid & mask
    # where, not a multiply: NaN/Inf stored at an invalid position must not reach anything.
    k = torch.where(valid[..., None], keys.to(acc), 0.0)
    s, stats = _scores(query.to(acc), k, lambda t: t[:, None, :], weights, biases, alphas, bn_weights,
                       bn_biases, running_means, running_vars, activation, eps, acc)
    s = torch.where(valid, s, 0.0)                                          # [B, T]
    if normalization == "softmax":
        # As the reference: softmax over valid positions; an empty row gets zero weights.
        logits = torch.where(valid, scale * s, float("-inf"))
        logits = torch.where(valid.any(dim=1, keepdim=True), logits, 0.0)
        s = torch.where(valid, torch.softmax(logits, dim=1), 0.0)
    elif normalization != "none":
        raise ValueError(f"unknown normalization {normalization!r}")
    out = torch.bmm(s[:, None, :], k).squeeze(1)                            # [B, D]
    return out.to(query.dtype), s, stats


def din_jagged_fwd_aten(query: Tensor, values: Tensor, offsets: Tensor, row_seq: Tensor | None,
                        weights: Sequence[Tensor], biases: Sequence[Tensor], alphas: Sequence[Tensor],
                        bn_weights: Sequence[Tensor], bn_biases: Sequence[Tensor],
                        running_means: Sequence[Tensor], running_vars: Sequence[Tensor], activation: str,
                        normalization: str, scale: float, training: bool, eps: float):
    """``din_fused::din_jagged_fwd`` in plain aten ops, inference only (same arguments and outputs).

    query [R, D], values [N, D], offsets [S+1], row_seq [R] or None (then S == R); see
    ``din_fused.functional.din_attention_jagged``.  Returns out [R, D], the weights of every
    (row, position) pair row by row (accumulation dtype) and the Dice statistics.

    Without row_seq each value belongs to exactly one row, so the unit runs once per value
    (N positions; the weights output has N entries) and the per-row sums are index_adds:
    no shape depends on the data.  With row_seq (shared histories) every row is scored
    against all N values under a [R, N] validity mask, i.e. the padded computation with
    T = N: exact for a request that scores many candidates against one user's history,
    quadratic when one graph holds many users' histories (use the padded layout or
    unshared sequences for those).  The weights output then has a data-dependent length.
    """
    _check_eval(training, activation)
    N, D = values.shape
    R = query.shape[0]
    acc = _acc_dtype(query.dtype)
    S = offsets.shape[0] - 1
    # Sequence of each value: the number of sequence ends offsets[1..S] at or before it,
    # as a cumulative count (searchsorted has no ONNX translation).  Values outside
    # [offsets[0], offsets[S]) belong to none; out-of-range offsets are clamped.
    ends = torch.zeros(N + 1, dtype=torch.int64, device=values.device).index_add(
        0, offsets[1:].to(torch.int64).clamp(0, N), torch.ones(S, dtype=torch.int64, device=values.device))
    seq = torch.cumsum(ends[:N], dim=0)
    pos = torch.arange(N, device=values.device)
    in_seq = (pos >= offsets[0]) & (seq < S)
    if row_seq is not None:
        valid = in_seq[None, :] & (seq[None, :] == row_seq.reshape(-1, 1))          # [R, N]
        out, w, stats = din_fwd_aten(query, values.expand(R, N, D), torch.full_like(row_seq, N), valid,
                                     weights, biases, alphas, bn_weights, bn_biases, running_means,
                                     running_vars, activation, normalization, scale, training, eps)
        return out, w[valid], stats
    seq = seq.clamp(max=S - 1)
    k = torch.where(in_seq[:, None], values.to(acc), 0.0)
    s, stats = _scores(query.to(acc), k, lambda t: t[seq], weights, biases, alphas, bn_weights, bn_biases,
                       running_means, running_vars, activation, eps, acc)
    s = torch.where(in_seq, s, 0.0)                                              # [N]
    if normalization == "softmax":
        logits = torch.where(in_seq, scale * s, float("-inf"))
        row_max = torch.full((R,), float("-inf"), dtype=acc, device=values.device)
        row_max = row_max.scatter_reduce(0, seq, logits, "amax")
        e = torch.where(in_seq, torch.exp(logits - row_max[seq]), 0.0)
        denom = torch.zeros(R, dtype=acc, device=values.device).index_add(0, seq, e)
        s = torch.where(in_seq, e / denom[seq], 0.0)
    elif normalization != "none":
        raise ValueError(f"unknown normalization {normalization!r}")
    out = torch.zeros(R, D, dtype=acc, device=values.device).index_add(0, seq, s[:, None] * k)
    return out.to(query.dtype), s, stats


def decompositions(core_aten: bool = False) -> dict:
    """Decomposition table for ``ExportedProgram.run_decompositions``: every din_fused op
    mapped to its aten implementation.  core_aten also lowers the rest of the graph to
    the core aten opset (``torch.export.default_decompositions()``); the default leaves
    the other ops alone."""
    table = dict(torch.export.default_decompositions()) if core_aten else {}
    table[torch.ops.din_fused.din_fwd.default] = din_fwd_aten
    table[torch.ops.din_fused.din_jagged_fwd.default] = din_jagged_fwd_aten
    return table


def din_dynamic_shapes(context: bool = False, min_batch: int = 1, min_len: int = 1) -> tuple:
    """``dynamic_shapes`` for ``din_fused.model.DIN.forward(target, history, lengths[, context])``:
    batch B and history length T dynamic (a row without history is served with T >= 1 and
    lengths 0).  Pass context=True when the model has context features (its example inputs
    then have four tensors)."""
    batch = torch.export.Dim("batch", min=min_batch)
    seq = torch.export.Dim("seq", min=min_len)
    shapes = ({0: batch}, {0: batch, 1: seq}, {0: batch})
    return (*shapes, {0: batch}) if context else shapes


class JaggedDIN(torch.nn.Module):
    """A ``din_fused.model`` model's jagged forward (:meth:`~din_fused.model.DIN.forward_jagged`)
    as the forward of a module of plain tensors, the form that torch.export, a saved program
    and a runtime without Python take (a :class:`~din_fused.data.JaggedBatch` is a Python
    type)::

        forward(target [R, A], values [N, A], offsets [S+1], row_seq [R] or None,
                context [R, F] or None) -> logits [R]

    shared=False: one history per row (S == R, row_seq None); shared=True: rows pick their
    history with row_seq (many candidates against one user's history, scored with each
    history embedded once).  It shares the model's parameters; serving.export reads the
    model's mode."""

    def __init__(self, model: torch.nn.Module, shared: bool = False):
        super().__init__()
        from .model import _EmbeddingMLP
        if not isinstance(model, _EmbeddingMLP):
            raise TypeError(f"model must be a din_fused.model DIN or BaseModel, got {type(model).__name__}")
        self.model, self.shared = model, bool(shared)
        self.train(model.training)

    def forward(self, target: Tensor, values: Tensor, offsets: Tensor, row_seq: Tensor | None = None,
                context: Tensor | None = None) -> Tensor:
        if (row_seq is not None) != self.shared:
            raise ValueError(f"row_seq must be {'given' if self.shared else 'None'} for "
                             f"JaggedDIN(shared={self.shared})")
        return self.model.forward_jagged(target, values, offsets, context, row_seq)


def din_jagged_dynamic_shapes(shared: bool = False, context: bool = False, min_rows: int = 1,
                              min_values: int = 1) -> tuple:
    """``dynamic_shapes`` for :class:`JaggedDIN`'s ``(target, values, offsets, row_seq,
    context)``: rows R and values N dynamic, and with shared, the histories S too (offsets
    [S+1]); without, offsets [R+1].  row_seq and context are None unless shared / context."""
    rows = torch.export.Dim("rows", min=min_rows)
    seqs = torch.export.Dim("sequences", min=1) if shared else rows
    return ({0: rows}, {0: torch.export.Dim("values", min=min_values)}, {0: seqs + 1},
            {0: rows} if shared else None, {0: rows} if context else None)


def jagged_dynamic_shapes(shared: bool, min_rows: int = 1, min_values: int = 1) -> dict:
    """``dynamic_shapes`` for ``FusedDINAttention``'s explicit jagged forward
    ``(query [R, E], keys=values [N, E], offsets=[S+1], row_seq=[R])``: rows R, values N and
    (shared) sequences S >= 1 dynamic; without row_seq S == R, so offsets has R + 1 entries."""
    rows = torch.export.Dim("rows", min=min_rows)
    shapes = {"query": {0: rows}, "keys": {0: torch.export.Dim("values", min=min_values)}}
    if shared:
        shapes["offsets"] = {0: torch.export.Dim("sequences", min=1) + 1}
        shapes["row_seq"] = {0: rows}
    else:
        shapes["offsets"] = {0: rows + 1}
    return shapes


def export(model: torch.nn.Module, args: tuple, dynamic_shapes=None, kwargs: dict | None = None):
    """``torch.export.export`` of an eval-mode model (the graph keeps the fused op).

    dynamic_shapes: as torch.export's; None picks :func:`din_dynamic_shapes` for a
    ``din_fused.model.DIN``-like model (a 3- or 4-tuple of inputs) and
    :func:`din_jagged_dynamic_shapes` for a :class:`JaggedDIN`; else all static
    (:func:`jagged_dynamic_shapes` serves the jagged forward of FusedDINAttention).
    """
    if (model.model if isinstance(model, JaggedDIN) else model).training:
        raise ValueError("export an eval-mode model (model.eval()): training-mode Dice updates "
                         "running statistics and uses batch statistics")
    from .data import JaggedBatch
    if any(isinstance(a, JaggedBatch) for a in args or ()):
        raise TypeError("export serving.JaggedDIN(model) with (target, values, offsets, row_seq, context) "
                        "instead of a JaggedBatch: a program's inputs must be tensors for a runtime "
                        "without Python")
    if (isinstance(model, JaggedDIN) or (kwargs and "offsets" in kwargs)) and _TORCH < SERVING_TORCH:
        _needs_newer_torch("serving.export of the jagged layout", "torch.export fails inside torch on "
                           "the jagged op with dynamic rows (2.4, 2.5; 2.6 when rows share sequences)")
    if dynamic_shapes is None and isinstance(model, JaggedDIN):
        context = len(args) > 4 and args[4] is not None
        dynamic_shapes = din_jagged_dynamic_shapes(model.shared, context)[:len(args)]
    elif dynamic_shapes is None and _is_din_like(model, args):
        context = len(args) == 4 and args[3] is not None
        dynamic_shapes = din_dynamic_shapes(context=context)
        if len(args) == 4 and not context:
            dynamic_shapes += (None,)  # context=None: no input, no dims
        args = _widened(args)
    return torch.export.export(model, tuple(args), kwargs=kwargs, dynamic_shapes=dynamic_shapes)


def _widened(args: tuple) -> tuple:
    """A padded DIN example of at least 2 rows and 2 positions.  torch.export specialises a
    dynamic dim whose example size is 0 or 1, so a one-row or one-behaviour example would fail
    with an error about marking dims dynamic.  The example only guides tracing: the rows and
    positions added are padding (id 0, length 0) and change nothing in the program."""
    target, history, lengths, *rest = args
    b, t = history.shape[0], history.shape[1]
    if t < 2:
        history = torch.cat([history, history.new_zeros(b, 2 - t, history.shape[2])], dim=1)
    if b < 2:
        def pad(x):
            return None if x is None else torch.cat([x, x.new_zeros(2 - b, *x.shape[1:])])
        target, history, lengths, *rest = (pad(x) for x in (target, history, lengths, *rest))
    return (target, history, lengths, *rest)


def _is_din_like(model, args) -> bool:
    from .model import _EmbeddingMLP
    return isinstance(model, _EmbeddingMLP) and args is not None and len(args) in (3, 4)


def to_aten(ep: torch.export.ExportedProgram, core_aten: bool = False) -> torch.export.ExportedProgram:
    """The same program with every din_fused op replaced by aten ops (see :func:`decompositions`)."""
    return ep.run_decompositions(decompositions(core_aten))


def _program(model_or_ep, args, dynamic_shapes) -> torch.export.ExportedProgram:
    if isinstance(model_or_ep, torch.export.ExportedProgram):
        return model_or_ep
    if args is None:
        raise ValueError("args (example inputs) are required when exporting a module; export a "
                         "module with keyword inputs with serving.export and pass the program")
    return export(model_or_ep, args, dynamic_shapes)


def _needs_newer_torch(what: str, why: str) -> None:
    raise RuntimeError(f"{what} needs a newer torch than {_TORCH}: {why} (the serving paths are "
                       f"tested with torch {SERVING_TESTED[0]} to {SERVING_TESTED[1]}; the op, the modules, "
                       f"the model and serving.export of the padded layout work from torch 2.4)")


def aoti_package(model_or_ep, path: str | Path, args: tuple | None = None, dynamic_shapes=None) -> str:
    """Compile an eval-mode model (or an ExportedProgram of one) into an AOTInductor
    package at ``path`` (.pt2) that loads without din_fused:
    ``torch._inductor.aoti_load_package(path)(*inputs)`` in Python, or
    ``torch::inductor::AOTIModelPackageLoader`` in C++.  Returns the path."""
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        _needs_newer_torch("serving.aoti_package", "it has no torch._inductor.aoti_compile_and_package")
    ep = to_aten(_program(model_or_ep, args, dynamic_shapes))
    return torch._inductor.aoti_compile_and_package(ep, package_path=str(path))


def onnx_export(model_or_ep, path: str | Path, args: tuple | None = None, dynamic_shapes=None,
                input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None):
    """Export an eval-mode model (or an ExportedProgram of one) to ONNX at ``path`` with
    ``torch.onnx.export(..., dynamo=True)``, the fused op translated to standard ONNX
    operators through :func:`to_aten`; dynamic dims stay dynamic.  For a DIN module
    the inputs default to the names target, history, lengths[, context] and the output to
    logit.  Returns the ``torch.onnx.ONNXProgram``."""
    if _TORCH < SERVING_TORCH:
        _needs_newer_torch("serving.onnx_export", "the ONNX exporter of older torch takes no ExportedProgram "
                           "(2.4) or fails on the model's batch norm (2.5, 2.6)")
    if _is_din_like(model_or_ep, args):
        input_names = input_names or [n for n, a in zip(("target", "history", "lengths", "context"), args)
                                      if a is not None]
        output_names = output_names or ["logit"]
    elif isinstance(model_or_ep, JaggedDIN):  # its inputs take forward's names already
        output_names = output_names or ["logit"]
    ep = to_aten(_program(model_or_ep, args, dynamic_shapes))
    prog = torch.onnx.export(ep, dynamo=True, input_names=input_names, output_names=output_names)
    prog.save(str(path))
    return prog
