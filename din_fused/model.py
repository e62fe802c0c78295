"""A thin Deep Interest Network (Zhou et al., KDD 2018) on top of ``FusedDINAttention``.

Inputs of both models (``A`` attributes such as item and category, ``F``
context features, history length ``T``, embedding size ``E`` per attribute):

    target   [B, A] int64   the candidate's attribute ids (>= 1)
    history  [B, T, A] int64 the behaviour sequence's attribute ids, 0 = padding
    lengths  [B] int64      valid behaviours per row (the first ``lengths`` positions)
    context  [B, F] int64   optional user/context feature ids (>= 1), or None when F = 0

    output   [B] float      the click logit (apply ``sigmoid`` for a probability)

Architecture (the paper's Figure 2):

    candidate embedding   c = [emb_a(target[:, a]) for a]          [B, A*E]
    behaviour embeddings  k_a = emb_a(history[:, :, a])             [B, T, E] per attribute
    interest              u = pool(c, k, lengths)                   [B, A*E]
    MLP                   concat(context embeddings, c, u) -> 200 -> act -> 80 -> act -> 1

The candidate and the behaviours of the same attribute share one embedding
table, so "this movie" means the same vector on both sides of the attention.

* :class:`DIN` pools with attention.  ``attention="separate"`` gives every
  attribute its own ``FusedDINAttention`` that scores movie against movies and
  genre against genres (the goods-to-goods, category-to-category design);
  ``attention="concat"`` concatenates the attributes into one [A*E] vector and
  uses one attention unit, as the original DIN code does.
* :class:`BaseModel` is the paper's Embedding&MLP baseline: the same
  embeddings and MLP, with sum (or mean) pooling and no attention.

:class:`MiniBatchAwareL2` is the paper's mini-batch aware regulariser.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from ._atomic import atomic_write
from .data import Batch, JaggedBatch, Vocab
from .modules import Dice, FusedDINAttention

__all__ = [
    "DIN",
    "BaseModel",
    "MiniBatchAwareL2",
    "build_model",
    "save",
    "load",
    "load_checkpoint",
    "Checkpoint",
    "MLP_ACTIVATIONS",
]

MLP_ACTIVATIONS = ("dice", "prelu")


class _LookupIndexAdd(torch.autograd.Function):
    """F.embedding whose table gradient is one pass of ops.embedding_grad instead of
    embedding_dense_backward, which sorts the indices first (26k lookups of a 10k x 16
    table, 2 threads: 1.45 ms; index_add_ 0.30-0.39 ms; this 0.16 ms; a step of
    din_fused.model.DIN's B=1024, T=50 benchmark has four such lookups).  The same sums up
    to their order (here index order); padding_idx's row gets no gradient, as with
    nn.Embedding."""

    @staticmethod
    def forward(ctx, weight: Tensor, idx: Tensor, padding_idx: int | None) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.rows, ctx.padding_idx = weight.shape[0], padding_idx
        return F.embedding(idx, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (idx,) = ctx.saved_tensors
        return ops.embedding_grad(idx.reshape(-1), grad.reshape(-1, grad.shape[-1]), ctx.rows,
                                  ctx.padding_idx), None, None


def _fast_table(emb: nn.Embedding) -> bool:
    """Whether emb's lookups may take the table gradient of ops.embedding_grad: on the CPU in
    plain eager training.  Other devices keep nn.Embedding (CUDA's index_add_ adds with
    atomics, in no fixed order), and so do compiled, exported, traced and functorch calls,
    which should see the plain aten op, and tables with sparse gradients, max_norm or
    scale_grad_by_freq."""
    w = emb.weight
    return (w.device.type == "cpu" and torch.is_grad_enabled() and w.requires_grad and not emb.sparse
            and emb.max_norm is None and not emb.scale_grad_by_freq and ops.plain_eager())


def _lookup(emb: nn.Embedding, idx: Tensor) -> Tensor:
    """emb(idx), with the faster table gradient where _fast_table allows it."""
    if not _fast_table(emb):
        return emb(idx)
    return _LookupIndexAdd.apply(emb.weight, idx, emb.padding_idx)


class _JointLookup(torch.autograd.Function):
    """The candidates' and the behaviours' rows of every attribute table in one node:
    q_ids [R, A] and k_ids [..., A] -> with concat, queries [R, A*E] and keys [..., A*E]
    (attribute a in columns a*E:(a+1)*E, written in place by ops.lookup_rows: no
    torch.cat); without, A queries [R, E] then A keys [..., E].  Each table's gradient is
    one ops.embedding_grad over both lookups, candidates first, instead of two tables'
    worth of gradients that autograd then adds."""

    @staticmethod
    def forward(ctx, q_ids: Tensor, k_ids: Tensor, concat: bool, paddings: tuple, *weights: Tensor):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q_ids, k_ids)
        ctx.concat, ctx.paddings, ctx.rows = concat, paddings, [w.shape[0] for w in weights]
        lead = k_ids.shape[:-1]
        if concat:
            keys = ops.lookup_rows(weights, k_ids.reshape(-1, len(weights)))
            return ops.lookup_rows(weights, q_ids), keys.reshape(*lead, keys.shape[1])
        return (*(F.embedding(q_ids.select(1, a), w) for a, w in enumerate(weights)),
                *(F.embedding(k_ids.select(-1, a), w) for a, w in enumerate(weights)))

    @staticmethod
    def backward(ctx, *grads):
        q_ids, k_ids = ctx.saved_tensors
        A = len(ctx.rows)
        k_ids = k_ids.reshape(-1, A)
        if ctx.concat:
            E = (grads[0] if grads[0] is not None else grads[1]).shape[-1] // A
            gq, gk = grads[0], None if grads[1] is None else grads[1].reshape(-1, A * E)
            gq = [None if gq is None else gq[:, a * E:(a + 1) * E] for a in range(A)]
            gk = [None if gk is None else gk[:, a * E:(a + 1) * E] for a in range(A)]
        else:
            gq = list(grads[:A])
            gk = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads[A:]]
        table_grads = []
        for a in range(A):
            pairs = [(ids.select(1, a), g) for ids, g in ((q_ids, gq[a]), (k_ids, gk[a])) if g is not None]
            table_grads.append(None if not pairs else ops.embedding_grad(
                [i for i, _ in pairs], [g for _, g in pairs], ctx.rows[a], ctx.paddings[a]))
        return None, None, None, None, *table_grads


def _joint_lookup(tables: Sequence[nn.Embedding], q_ids: Tensor, k_ids: Tensor | None,
                  concat: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Candidate rows q_ids [R, A] and, unless k_ids is None, behaviour rows k_ids [..., A]
    of the attribute tables: (queries, keys), per attribute ([R, E], [..., E]) or, with
    concat, one each ([R, A*E], [..., A*E]; attribute a in columns a*E:(a+1)*E).  In
    plain eager CPU training with two lookups this is _JointLookup's single node; otherwise
    one lookup per table and side."""
    if k_ids is not None and all(_fast_table(emb) for emb in tables):
        out = _JointLookup.apply(q_ids, k_ids, concat, tuple(emb.padding_idx for emb in tables),
                                 *(emb.weight for emb in tables))
        return ([out[0]], [out[1]]) if concat else (list(out[:len(tables)]), list(out[len(tables):]))
    # select, not ids[:, a]: the full slice of a dynamic dim makes torch.export 2.5-2.7
    # guard that dim != int_oo and reject it (batch and length as dynamic dims; README, Build).
    queries = [_lookup(emb, q_ids.select(1, a)) for a, emb in enumerate(tables)]
    keys = [] if k_ids is None else [_lookup(emb, k_ids.select(-1, a)) for a, emb in enumerate(tables)]
    if concat:
        return [_cat(queries, 1)], ([_cat(keys, -1)] if keys else [])
    return queries, keys


def _cat(ts: Sequence[Tensor], dim: int) -> Tensor:
    """torch.cat, without the copy that torch.cat makes of a single tensor."""
    return ts[0] if len(ts) == 1 else torch.cat(list(ts), dim)


class _PReLUFn(torch.autograd.Function):
    """torch.prelu on x [N, C] whose backward is one pass of ops.prelu_backward (aten's
    CPU kernel took 0.57 ms on the MLP's [1024, 200], ours 0.09 ms; docs/performance.md,
    "Round 16")."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.prelu(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        return ops.prelu_backward(grad, x, weight)


class PReLU(nn.PReLU):
    """nn.PReLU (same parameter and state-dict key), with _PReLUFn's backward for [N, C]
    inputs in plain eager CPU training; elsewhere (CUDA, compile, export) nn.PReLU's own."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.dim() == 2 and x.device.type == "cpu" and torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad) and ops.plain_eager()):
            return _PReLUFn.apply(x, self.weight)
        return super().forward(x)


def _activation(name: str, width: int) -> nn.Module:
    if name == "dice":
        return Dice(width, dim=2)
    if name == "prelu":
        # One slope per channel; 0.25 is PyTorch's (and the PReLU paper's) default.
        return PReLU(width)
    raise ValueError(f"activation must be one of {MLP_ACTIVATIONS}, got {name!r}")


class _EmbeddingMLP(nn.Module):
    """Embeddings + MLP shared by :class:`DIN` and :class:`BaseModel`; subclasses define ``pool``."""

    # The forward looks the attributes up side by side ([B, A*E] queries, [B, T, A*E] keys)
    # when the pooling would concatenate them anyway.
    _concat_embeddings = False

    def __init__(
        self,
        attr_vocab: Sequence[int],
        context_vocab: Sequence[int] = (),
        embedding_dim: int = 16,
        mlp_hidden_units: Sequence[int] = (200, 80),
        activation: str = "dice",
        init_std: float = 0.05,
    ):
        super().__init__()
        if not attr_vocab:
            raise ValueError("attr_vocab must name at least one attribute table size")
        if any(v < 2 for v in (*attr_vocab, *context_vocab)):
            raise ValueError("every vocabulary needs at least 2 rows (row 0 is padding)")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if not mlp_hidden_units:
            raise ValueError("mlp_hidden_units must have at least one layer")
        self.embedding_dim = int(embedding_dim)
        self.num_attrs = len(attr_vocab)
        self.num_context = len(context_vocab)
        # padding_idx=0: the padding row stays zero and gets no gradient, so a
        # padded history position is exactly zero even before masking.
        self.attr_embeddings = nn.ModuleList(
            nn.Embedding(v, embedding_dim, padding_idx=0) for v in attr_vocab
        )
        self.context_embeddings = nn.ModuleList(
            nn.Embedding(v, embedding_dim, padding_idx=0) for v in context_vocab
        )
        for emb in (*self.attr_embeddings, *self.context_embeddings):
            # nn.Embedding's N(0, 1) would make a 50-item sum pool ~7 per
            # coordinate and saturate the first sigmoid/Dice; start small instead.
            nn.init.normal_(emb.weight, std=init_std)
            with torch.no_grad():
                emb.weight[0].zero_()
        in_dim = (self.num_context + 2 * self.num_attrs) * embedding_dim
        layers: list[nn.Module] = []
        for width in mlp_hidden_units:
            layers += [nn.Linear(in_dim, width), _activation(activation, width)]
            in_dim = width
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(in_dim, 1)
        self.activation = activation

    # -- pieces ------------------------------------------------------------ #
    def embed(
        self, target: Tensor, history: Tensor, concat: bool = False
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per attribute a: query [B, E] and keys [B, T, E] from the same table; with concat,
        one query [B, A*E] and one keys [B, T, A*E] (the attributes side by side)."""
        return _joint_lookup(self.attr_embeddings, target, history, concat)

    def pool(self, queries: list[Tensor], keys: list[Tensor], lengths: Tensor) -> Tensor:
        """queries[a] [B, E], keys[a] [B, T, E], lengths [B] -> interest [B, A*E]."""
        raise NotImplementedError  # defined by DIN and BaseModel

    def _check(self, target: Tensor, history: Tensor, lengths: Tensor, context: Tensor | None) -> None:
        if target.dim() != 2 or target.shape[1] != self.num_attrs:
            raise ValueError(f"target must be [B, {self.num_attrs}], got {tuple(target.shape)}")
        if history is None or lengths is None:
            raise ValueError("forward needs target, history and lengths (or one Batch / JaggedBatch)")
        b = target.shape[0]
        if history.dim() != 3 or history.shape[0] != b or history.shape[2] != self.num_attrs:
            raise ValueError(f"history must be [{b}, T, {self.num_attrs}], got {tuple(history.shape)}")
        if lengths.shape != (b,):
            raise ValueError(f"lengths must be [{b}], got {tuple(lengths.shape)}")
        if lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"lengths must be an int32/int64 tensor [{b}], got {lengths.dtype}")
        self._check_context(context, b)
        self._check_ids(target=target, history=history, context=context)

    def _check_ids(self, **named: Tensor | None) -> None:
        """Every id inside its table: [0, vocabulary size) per attribute (target, history, values)
        or context feature, named in the error (the lookups' own says 'index out of range in
        self').  Eager calls only: a traced graph cannot branch on data."""
        if torch.compiler.is_compiling():
            return
        named = {k: v for k, v in named.items() if v is not None and v.numel()}
        if not named:
            return
        # Every column's min and max in one tensor, read back once: on CUDA one sync a call.
        bounds = torch.cat([torch.stack(torch.aminmax(v.reshape(-1, v.shape[-1]), dim=0)).long()
                            for v in named.values()], dim=1).tolist()
        col = 0
        for name in named:
            tables = self.context_embeddings if name == "context" else self.attr_embeddings
            for a, emb in enumerate(tables):
                l, h = bounds[0][col], bounds[1][col]
                col += 1
                if l < 0 or h >= emb.num_embeddings:
                    raise ValueError(f"{name}[..., {a}] holds ids in [{l}, {h}], outside table {a}'s "
                                     f"[0, {emb.num_embeddings})")

    def _check_context(self, context: Tensor | None, rows: int) -> None:
        if self.num_context and (context is None or context.shape != (rows, self.num_context)):
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"context must be [{rows}, {self.num_context}], got {got}")
        if not self.num_context and context is not None and (
                not isinstance(context, Tensor) or context.dim() != 2 or context.shape[1] != 0):
            got = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"the model was built without context features (context_vocab empty), so "
                             f"context must be None or [{rows}, 0], got {got}")

    def forward(
        self,
        target: Tensor | Batch | JaggedBatch,
        history: Tensor | None = None,
        lengths: Tensor | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """Click logits [B]; see the module docstring for the input shapes.

        ``forward(batch)`` with a :class:`~din_fused.data.Batch` or
        :class:`~din_fused.data.JaggedBatch` runs the padded or the jagged path
        (:meth:`forward_jagged`); that is the form for DistributedDataParallel, which
        only hooks ``forward``.
        """
        if isinstance(target, JaggedBatch):
            return self.forward_jagged(target.target, target.values, target.offsets, target.context)
        if isinstance(target, Batch):
            target, history, lengths, context = target.target, target.history, target.lengths, target.context
        self._check(target, history, lengths, context)
        queries, keys = self.embed(target, history, self._concat_embeddings)
        interest = self.pool(queries, keys, lengths)  # [B, A*E]
        return self._head(queries, interest, context)

    def _head(self, queries: list[Tensor], interest: Tensor, context: Tensor | None) -> Tensor:
        parts = [_lookup(emb, context.select(1, f)) for f, emb in enumerate(self.context_embeddings)]
        x = torch.cat([*parts, *queries, interest], dim=1)
        return self.out(self.mlp(x)).squeeze(1)

    def forward_jagged(
        self,
        target: Tensor,
        values: Tensor,
        offsets: Tensor,
        context: Tensor | None = None,
        row_seq: Tensor | None = None,
    ) -> Tensor:
        """Click logits [R] from unpadded histories; the same model as :meth:`forward`.

        target  [R, A] int64   candidate attribute ids, one row per candidate
        values  [N, A] int64   the behaviours of S histories back to back (no padding)
        offsets [S+1] int64    history s is ``values[offsets[s]:offsets[s+1]]``, oldest first
        context [R, F] int64   or None when F = 0
        row_seq [R] int64      row r is scored against history ``row_seq[r]``; None: S == R and
                               row r uses history r
        Each behaviour is embedded once, however many rows share its history.
        """
        self._check_jagged(target, values, offsets, context, row_seq)
        queries, interest = self._embed_pool_jagged(target, values, offsets, row_seq)  # [R, A*E]
        return self._head(queries, interest, context)

    def _embed_pool_jagged(
        self, target: Tensor, values: Tensor, offsets: Tensor, row_seq: Tensor | None
    ) -> tuple[list[Tensor], Tensor]:
        """(queries, interest [R, A*E]): the candidates' embeddings and the pooled histories."""
        queries, _ = _joint_lookup(self.attr_embeddings, target, None, self._concat_embeddings)
        return queries, self.pool_jagged(queries, values, offsets, row_seq)

    @torch.no_grad()
    def score_shared(
        self,
        target: Tensor,
        values: Tensor,
        offsets: Tensor,
        row_seq: Tensor,
        context: Tensor | None = None,
    ) -> Tensor:
        """Inference: many candidates against histories that rows share (e.g. one user's history
        and all of its candidates): :meth:`forward_jagged` with ``row_seq``, without autograd.
        Each history is embedded and read once, not once per candidate."""
        return self.forward_jagged(target, values, offsets, context, row_seq)

    def pool_jagged(
        self, queries: list[Tensor], values: Tensor, offsets: Tensor, row_seq: Tensor | None
    ) -> Tensor:
        """queries[a] [R, E], behaviour ids values [N, A] (jagged by ``offsets``), row_seq [R] or
        None -> [R, A*E].  Embedding the behaviours is part of pooling, so that a model can fuse it."""
        raise NotImplementedError  # defined by DIN and BaseModel

    def _check_jagged(
        self, target: Tensor, values: Tensor, offsets: Tensor, context: Tensor | None, row_seq: Tensor | None
    ) -> None:
        if target.dim() != 2 or target.shape[1] != self.num_attrs:
            raise ValueError(f"target must be [R, {self.num_attrs}], got {tuple(target.shape)}")
        r = target.shape[0]
        if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"offsets must be [S+1] int32/int64, got {tuple(offsets.shape)} {offsets.dtype}")
        n = values.shape[0] if values.dim() == 2 else -1
        if values.dim() != 2 or values.shape[1] != self.num_attrs:
            raise ValueError(f"values must be [N, {self.num_attrs}], got {tuple(values.shape)}")
        # The values of offsets and row_seq are checked in eager calls only: a traced graph
        # (torch.export, torch.compile) cannot branch on data (docs/serving.md, "Not checked
        # at run time").
        check_data = not torch.compiler.is_compiling()
        if check_data and (int(offsets[0]) != 0 or int(offsets[-1]) != n
                           or bool((offsets[1:] < offsets[:-1]).any())):
            raise ValueError(f"offsets must start at 0, not decrease and end at values.shape[0] = {n}")
        s = offsets.numel() - 1
        if row_seq is None:
            if s != r:
                raise ValueError(f"without row_seq, offsets must be [R+1] = [{r + 1}], got [{s + 1}]")
        elif row_seq.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"row_seq must be an int32/int64 tensor [{r}], got {row_seq.dtype}")
        elif row_seq.shape != (r,) or (check_data and r and (int(row_seq.min()) < 0
                                                            or int(row_seq.max()) >= s)):
            raise ValueError(f"row_seq must be [{r}] with values in [0, {s}), got {tuple(row_seq.shape)}")
        self._check_context(context, r)
        self._check_ids(target=target, values=values, context=context)


    # -- for the regulariser ---------------------------------------------- #
    def embedding_tables(self) -> list[nn.Embedding]:
        """The attribute tables in attribute order, then the context tables."""
        return [*self.attr_embeddings, *self.context_embeddings]

    def batch_ids(
        self, target: Tensor, history: Tensor, lengths: Tensor, context: Tensor | None = None
    ) -> list[Tensor]:
        """Ids used by this batch, one tensor per table of :meth:`embedding_tables` (0 = unused).

        History ids beyond ``lengths`` are padding and are dropped, so only rows
        that the forward pass really read are regularised.
        """
        valid = torch.arange(history.shape[1], device=history.device)[None, :] < lengths[:, None]
        ids = [torch.cat([target[:, a], history[:, :, a][valid]]) for a in range(self.num_attrs)]
        ids += [context[:, f] for f in range(self.num_context)]
        return ids

    def batch_ids_of(self, batch: Batch | JaggedBatch) -> list[Tensor]:
        """:meth:`batch_ids` of a padded or jagged batch (a jagged one has no padding to drop)."""
        if isinstance(batch, JaggedBatch):
            ids = [torch.cat([batch.target[:, a], batch.values[:, a]]) for a in range(self.num_attrs)]
            return ids + [batch.context[:, f] for f in range(self.num_context)]
        return self.batch_ids(batch.target, batch.history, batch.lengths, batch.context)


class DIN(_EmbeddingMLP):
    """Deep Interest Network: attention pooling of the behaviours against the candidate.

    attention: ``"separate"`` (one attention unit per attribute; default) or
        ``"concat"`` (one unit over the concatenated [A*E] embeddings).
    attention_impl: ``"fused"`` (the C++/CUDA op) or ``"reference"`` (the
        pure-PyTorch oracle with identical parameters), for checks and speed.
    att_activation: activation inside the attention's local activation unit;
        None (default) uses the MLP's ``activation``, as in the paper's Figure 2.
    att_weight_normalization: ``"none"`` (default, the paper: w_t is the raw
        score, so the interest keeps its intensity) or ``"softmax"`` over the
        valid behaviours (what the original DIN code does).
    The other arguments are those of the shared embedding/MLP part:
    ``attr_vocab`` (table size per attribute, row 0 padding), ``context_vocab``,
    ``embedding_dim`` (per attribute), ``mlp_hidden_units``, ``activation``
    (``"dice"`` or ``"prelu"``).
    """

    def __init__(
        self,
        attr_vocab: Sequence[int],
        context_vocab: Sequence[int] = (),
        embedding_dim: int = 16,
        attention: str = "separate",
        attention_impl: str = "fused",
        att_hidden_units: Sequence[int] = (80, 40),
        att_activation: str | None = None,
        att_weight_normalization: str = "none",
        mlp_hidden_units: Sequence[int] = (200, 80),
        activation: str = "dice",
        init_std: float = 0.05,
    ):
        super().__init__(attr_vocab, context_vocab, embedding_dim, mlp_hidden_units, activation, init_std)
        self.config = dict(
            model="din",
            attr_vocab=list(attr_vocab),
            context_vocab=list(context_vocab),
            embedding_dim=int(embedding_dim),
            attention=attention,
            attention_impl=attention_impl,
            att_hidden_units=list(att_hidden_units),
            att_activation=att_activation,
            att_weight_normalization=att_weight_normalization,
            mlp_hidden_units=list(mlp_hidden_units),
            activation=activation,
            init_std=float(init_std),
        )
        if attention not in ("separate", "concat"):
            raise ValueError(f"attention must be 'separate' or 'concat', got {attention!r}")
        if attention_impl not in ("fused", "reference"):
            raise ValueError(f"attention_impl must be 'fused' or 'reference', got {attention_impl!r}")
        self.attention = attention
        self.attention_impl = attention_impl
        self._concat_embeddings = attention == "concat"
        att_activation = activation if att_activation is None else att_activation
        n_units, dim = (
            (self.num_attrs, embedding_dim)
            if attention == "separate"
            else (1, self.num_attrs * embedding_dim)
        )
        self.att = nn.ModuleList(
            FusedDINAttention(
                embedding_dim=dim,
                att_hidden_units=tuple(att_hidden_units),
                att_activation=att_activation,
                weight_normalization=att_weight_normalization,
                impl=attention_impl,
            )
            for _ in range(n_units)
        )

    def pool(self, queries: list[Tensor], keys: list[Tensor], lengths: Tensor) -> Tensor:
        """Attention pooling: queries[a] [B, E], keys[a] [B, T, E] -> [B, A*E] (with ``"concat"``
        attention, one query [B, A*E] and one keys [B, T, A*E] too)."""
        if self.attention == "separate":
            return torch.cat([att(q, k, lengths) for att, q, k in zip(self.att, queries, keys)], dim=1)
        # Concatenating along E keeps, for each position t, the item and its
        # category side by side, which is the original code's joint key.
        return self.att[0](_cat(queries, 1), _cat(keys, 2), lengths)

    def pool_jagged(
        self, queries: list[Tensor], values: Tensor, offsets: Tensor, row_seq: Tensor | None
    ) -> Tensor:
        """Attention pooling of unpadded histories: every behaviour is embedded once ([N, E] per
        attribute), however many rows share its history -> [R, A*E]."""
        keys = [_lookup(emb, values.select(1, a)) for a, emb in enumerate(self.attr_embeddings)]
        return self._attend_jagged(queries, keys, offsets, row_seq)

    def _embed_pool_jagged(
        self, target: Tensor, values: Tensor, offsets: Tensor, row_seq: Tensor | None
    ) -> tuple[list[Tensor], Tensor]:
        queries, keys = _joint_lookup(self.attr_embeddings, target, values, self._concat_embeddings)
        return queries, self._attend_jagged(queries, keys, offsets, row_seq)

    def _attend_jagged(
        self, queries: list[Tensor], keys: list[Tensor], offsets: Tensor, row_seq: Tensor | None
    ) -> Tensor:
        if self.attention == "concat":
            queries, keys = [_cat(queries, 1)], [_cat(keys, 1)]
        pooled = [att(q, k, offsets=offsets, row_seq=row_seq) for att, q, k in zip(self.att, queries, keys)]
        return _cat(pooled, 1)


class BaseModel(_EmbeddingMLP):
    """The paper's Embedding&MLP baseline: sum (default, as in the paper) or mean pooling.

    Same arguments as the shared part of :class:`DIN`, plus ``pooling``.
    """

    def __init__(
        self,
        attr_vocab: Sequence[int],
        context_vocab: Sequence[int] = (),
        embedding_dim: int = 16,
        pooling: str = "sum",
        mlp_hidden_units: Sequence[int] = (200, 80),
        activation: str = "dice",
        init_std: float = 0.05,
    ):
        super().__init__(attr_vocab, context_vocab, embedding_dim, mlp_hidden_units, activation, init_std)
        self.config = dict(
            model="base",
            attr_vocab=list(attr_vocab),
            context_vocab=list(context_vocab),
            embedding_dim=int(embedding_dim),
            pooling=pooling,
            mlp_hidden_units=list(mlp_hidden_units),
            activation=activation,
            init_std=float(init_std),
        )
        if pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}")
        self.pooling = pooling
        self._concat_embeddings = True

    def pool(self, queries: list[Tensor], keys: list[Tensor], lengths: Tensor) -> Tensor:
        """Sum or mean over the valid positions: keys[a] [B, T, E] -> [B, A*E] (queries unused)."""
        k = _cat(keys, 2)  # [B, T, A*E]
        # The lengths as DIN's attention takes them: above T means all T positions, below 0 is an
        # error (the mean would otherwise divide by the raw length, or pool a negative one to 0).
        if not torch.compiler.is_compiling() and lengths.numel() and int(lengths.min()) < 0:
            raise ValueError(f"lengths must be >= 0, got {int(lengths.min())}")
        lengths = lengths.clamp(max=k.shape[1])
        valid = torch.arange(k.shape[1], device=k.device)[None, :] < lengths[:, None]
        # Mask explicitly rather than trusting the padding rows to be zero: the
        # result must not depend on what a caller puts beyond ``lengths``.
        pooled = (k * valid.unsqueeze(-1).to(k.dtype)).sum(dim=1)
        if self.pooling == "mean":
            # A row with no behaviour divides 0 by 1 and stays zero.
            pooled = pooled / lengths.clamp(min=1).to(k.dtype).unsqueeze(1)
        return pooled

    def pool_jagged(
        self, queries: list[Tensor], values: Tensor, offsets: Tensor, row_seq: Tensor | None
    ) -> Tensor:
        """Sum or mean of each history's embeddings -> [R, A*E] (queries unused).

        ``embedding_bag`` looks up and reduces each history in one op, with no [N, E] or
        padded tensor; an empty history pools to zero.  One vector per history, shared by
        the rows of ``row_seq``.
        """
        off = offsets.to(torch.int64)
        # Summed with the tables' padding_idx, as the padded path's lookups: an id 0 among the
        # values adds the zero row and trains nothing, yet counts in the mean's length (so the
        # mean divides by the history's length here, where embedding_bag would not count it).
        pooled = torch.cat(
            [
                F.embedding_bag(values[:, a], emb.weight, off, mode="sum", include_last_offset=True,
                                padding_idx=emb.padding_idx)
                for a, emb in enumerate(self.attr_embeddings)
            ],
            dim=1,
        )  # [S, A*E]
        if self.pooling == "mean":
            pooled = pooled / (off[1:] - off[:-1]).clamp(min=1).to(pooled.dtype).unsqueeze(1)
        return pooled if row_seq is None else pooled[row_seq]


def build_model(
    name: str,
    attr_vocab: Sequence[int],
    context_vocab: Sequence[int] = (),
    *,
    embedding_dim: int = 16,
    activation: str = "dice",
    attention: str = "separate",
    attention_impl: str = "fused",
    pooling: str = "sum",
    **kwargs,
) -> _EmbeddingMLP:
    """``"din"`` -> :class:`DIN`, ``"base"`` -> :class:`BaseModel`, with the CLI's options."""
    if name == "din":
        return DIN(
            attr_vocab,
            context_vocab,
            embedding_dim,
            attention=attention,
            attention_impl=attention_impl,
            activation=activation,
            **kwargs,
        )
    if name == "base":
        return BaseModel(
            attr_vocab, context_vocab, embedding_dim, pooling=pooling, activation=activation, **kwargs
        )
    raise ValueError(f"model must be 'din' or 'base', got {name!r}")


class MiniBatchAwareL2:
    """Mini-batch aware L2 regularisation (the paper, Section 4.3.1).

    Only the embedding rows that the batch uses are penalised, each weighted by
    1/n_j where n_j is how many training samples contain id j:

        penalty = lam / 2 * sum_k sum_{j in batch ids of table k} ||W_k[j]||^2 / n_kj

    so its gradient on row j is lam * W[j] / n_j, the paper's update rule
    ``w_j <- w_j - eta * (grad + lam * alpha_mj / n_j * w_j)``.  Rare ids are
    pulled towards zero harder than frequent ones, and the cost is proportional
    to the batch, not to the (huge) tables.  Dense (MLP, attention) weights are
    not regularised.  ``lam == 0`` switches it off (the penalty is then a
    constant 0 and nothing is computed).

    counts: one tensor per table of ``model.embedding_tables()``, [V_k] with
        n_kj for every id (``SequenceDataset.id_counts()`` gives the attribute
        tables; context tables can use their id frequencies).  Ids never seen
        in training are treated as n = 1 so a stray id cannot divide by zero.
    """

    def __init__(self, counts: Sequence[Tensor], lam: float):
        try:
            self.lam = float(lam)
        except (TypeError, ValueError):
            raise TypeError(f"lam (the mba lambda) must be a number, got {type(lam).__name__}") from None
        if not (math.isfinite(self.lam) and self.lam >= 0):  # NaN would turn every step's loss to NaN
            raise ValueError(f"lam (the mba lambda) must be a finite number >= 0, got {lam!r}")
        self.inv_counts = [1.0 / c.to(torch.float32).clamp(min=1.0) for c in counts]

    def to(self, device) -> MiniBatchAwareL2:
        self.inv_counts = [c.to(device) for c in self.inv_counts]
        return self

    def __call__(self, tables: Sequence[nn.Embedding], ids: Sequence[Tensor]) -> Tensor:
        """tables[k] with ids[k] (any shape, 0 = padding) -> scalar penalty."""
        if len(tables) != len(self.inv_counts) or len(ids) != len(tables):
            raise ValueError(
                f"expected {len(self.inv_counts)} tables and id tensors, got {len(tables)} and {len(ids)}"
            )
        device = tables[0].weight.device
        total = torch.zeros((), device=device)
        if self.lam == 0.0:
            return total
        for table, inv, idx in zip(tables, self.inv_counts, ids):
            # Each used row counts once per batch (alpha_mj is 0/1 in the paper).
            idx = torch.unique(idx.reshape(-1))
            idx = idx[idx != 0]
            if idx.numel() == 0:
                continue
            rows = table.weight[idx]  # [n, E]; gradient reaches only these rows
            total = total + (rows.pow(2).sum(dim=1) * inv[idx]).sum()
        return 0.5 * self.lam * total


# --------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------- #
CHECKPOINT_FORMAT = "din_fused.model/1"


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    model    the rebuilt :class:`DIN` or :class:`BaseModel`, in eval mode, on CPU
    vocab    the raw-id :class:`~din_fused.data.Vocab` of the training data (None if not saved)
    max_len  the history length the model was trained with (latest ``max_len`` behaviours)
    metrics  the training run's metrics dict (may be empty)
    attr_names, context_names: the attribute and context feature names, in column order
    """

    model: _EmbeddingMLP
    vocab: Vocab | None
    max_len: int
    metrics: dict
    attr_names: tuple[str, ...] = ()
    context_names: tuple[str, ...] = ()


def save(
    model: _EmbeddingMLP,
    path: str | os.PathLike,
    *,
    vocab: Vocab | None,
    max_len: int,
    metrics: dict | None = None,
    attr_names: Sequence[str] = (),
    context_names: Sequence[str] = (),
) -> None:
    """Write one file with everything needed to score: weights, model config, id vocabularies,
    max length and metrics.

    Only tensors, numbers, strings, lists and dicts go in, so :func:`load` reads it with
    ``torch.load(weights_only=True)`` (no pickled code runs on load).  The file is written to a
    temporary name and renamed, so a reader never sees half a checkpoint.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"save: expected a DIN or BaseModel, got {type(model).__name__}")
    _check_names(model, vocab, attr_names, context_names)
    if metrics is not None:
        metrics = _plain(metrics)
    blob = {
        "format": CHECKPOINT_FORMAT,
        "config": dict(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vocab": None if vocab is None else vocab.state_dict(),
        "max_len": int(max_len),
        "metrics": metrics or {},
        "attr_names": list(attr_names),
        "context_names": list(context_names),
    }
    with atomic_write(path, "wb") as fh:
        torch.save(blob, fh)


def _check_names(model: _EmbeddingMLP, vocab: Vocab | None, attr_names: Sequence[str],
                 context_names: Sequence[str]) -> None:
    """The names and the vocabulary describe the model's columns: predict maps a request's context
    by these names, and the vocabulary's item attributes and context tables by position."""
    a, f = model.num_attrs, model.num_context
    if len(context_names) != f:
        raise ValueError(f"context_names must name the model's {f} context feature(s), "
                         f"got {list(context_names)}")
    if attr_names and len(attr_names) != a:
        raise ValueError(f"attr_names must name the model's {a} attribute(s) (or be empty), "
                         f"got {list(attr_names)}")
    if vocab is not None and (vocab.item_attrs.shape[1] != a or len(vocab.context_raw) != f):
        raise ValueError(f"vocab has {vocab.item_attrs.shape[1]} item attribute(s) and "
                         f"{len(vocab.context_raw)} context table(s); the model has {a} and {f}")


def _plain(obj):
    """JSON-like copy of a metrics dict (tuples -> lists, NumPy scalars -> Python), for weights_only."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, str):
        return str(obj)  # also str subclasses such as torch.__version__'s TorchVersion
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> Checkpoint:
    """Read a file written by :func:`save` (or ``python -m din_fused.train --save``)."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{path}: not a din_fused checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        got = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(
            f"{path}: not a din_fused checkpoint (format {got!r}, expected {CHECKPOINT_FORMAT!r})"
        )
    try:
        config = dict(blob["config"])
        name = config.pop("model")
        model = (DIN if name == "din" else BaseModel)(**config)
        model.load_state_dict(blob["state_dict"])
        model.eval()
        vocab = None if blob["vocab"] is None else Vocab.from_state_dict(blob["vocab"])
        ckpt = Checkpoint(
            model,
            vocab,
            int(blob["max_len"]),
            blob["metrics"],
            tuple(blob["attr_names"]),
            tuple(blob["context_names"]),
        )
        _check_names(model, vocab, ckpt.attr_names, ckpt.context_names)
        return ckpt
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a missing entry, a wrong tensor
        raise ValueError(f"{path}: a damaged din_fused checkpoint ({type(e).__name__}: {e})") from None


def load(path: str | os.PathLike, map_location="cpu") -> _EmbeddingMLP:
    """Rebuild the model saved at ``path``, in eval mode (see :func:`load_checkpoint` for the rest)."""
    return load_checkpoint(path, map_location).model
