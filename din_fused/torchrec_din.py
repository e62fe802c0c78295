"""DIN on TorchRec: attribute tables in an ``EmbeddingCollection``, jagged behaviour sequences.

Needs the optional extra (see docs/torchrec.md for the pinned torchrec / fbgemm-gpu-cpu pairing)::

    pip install ".[torchrec]" && pip install --no-deps torchrec==1.8.0

Features of the :class:`KeyedJaggedTensor` (``A`` attributes such as item and
category, ``F`` context features; ``b`` rows):

    "<attr>"        the candidate's id, length 1 per row
    "<attr>_hist"   the behaviour sequence, length 0..T per row, no padding
    "<ctx>"         a context feature id, length 1 per row

The candidate and the sequence of one attribute are two features of the same
table, so "this movie" is the same vector on both sides of the attention, as in
:class:`din_fused.model.DIN`.  The pooled behaviours of each attribute reach the
attention as the collection returns them (values [N, E] plus offsets [b+1]);
the MLP, Dice/PReLU and attention units are those of ``din_fused.model.DIN``
with the same state-dict keys, so :meth:`TorchRecDIN.load_din` copies a DIN one
to one.

:func:`run_torchrec` is ``python -m din_fused.train --engine torchrec``: it
wraps the model in ``DistributedModelParallel`` with every table sharded
row-wise (docs/torchrec.md says why) and trains it, in one process or under
``torchrun``.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

try:
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm, which TorchRec's kernels use)
    from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
except (ImportError, OSError) as _e:  # OSError: an fbgemm-gpu build that does not match this torch
    raise ImportError(
        "din_fused.torchrec_din needs torchrec and a CPU fbgemm-gpu that match this torch "
        f"({torch.__version__}); see docs/torchrec.md.  Import failed with: {_e}"
    ) from _e

from . import data as data_mod
from .model import _activation
from .modules import FusedDINAttention

__all__ = [
    "TorchRecDIN",
    "batch_to_kjt",
    "feature_names",
    "run_torchrec",
    "shard_model",
    "train_step",
    "EMBEDDING_LR",
    "SHARDING_TYPE",
]

HIST_SUFFIX = "_hist"
# Sharded tables are updated inside the backward by fbgemm's fused optimizer.  On CPU fbgemm offers
# exact (row-wise) Adagrad and SGD only, not Adam, so the tables use Adagrad with this rate and
# the dense part (MLP, attention) keeps the engine's Adam with --lr.
EMBEDDING_LR = 0.02
# Row-wise: DIN's parameters are dominated by one table (items), which table-wise sharding would
# put whole on one rank; row-wise splits every table evenly, so memory per rank is ~1/W.
SHARDING_TYPE = "row_wise"
_INIT_CHUNK = 1 << 16  # rows per deterministic init chunk


def feature_names(attr_names: Sequence[str], context_names: Sequence[str] = ()) -> list[str]:
    """KJT keys in order: per attribute its candidate and ``_hist`` features, then the context features."""
    keys = [k for a in attr_names for k in (a, a + HIST_SUFFIX)]
    keys += list(context_names)
    if len(set(keys)) != len(keys):
        raise ValueError(f"attribute and context names must be distinct, got {attr_names}, {context_names}")
    return keys


def batch_to_kjt(
    batch: data_mod.Batch, attr_names: Sequence[str], context_names: Sequence[str] = ()
) -> KeyedJaggedTensor:
    """A padded :class:`din_fused.data.Batch` -> the :class:`KeyedJaggedTensor` of :class:`TorchRecDIN`.

    batch.target [b, A], batch.history [b, T, A] (valid: the first ``lengths`` positions),
    batch.lengths [b], batch.context [b, F].  Positions beyond ``lengths`` are dropped, so the
    sequences are jagged: feature ``<attr>_hist`` holds sum(lengths) ids.
    """
    b, t, a = batch.history.shape
    if len(attr_names) != a or batch.target.shape != (b, a):
        raise ValueError(f"batch has {a} attributes, names given for {len(attr_names)}")
    if batch.context.shape != (b, len(context_names)):
        raise ValueError(
            f"batch.context is {tuple(batch.context.shape)}, names given for {len(context_names)}"
        )
    dev = batch.target.device
    lengths = batch.lengths.to(torch.int64)
    valid = torch.arange(t, device=dev)[None, :] < lengths[:, None]
    ones = torch.ones(b, dtype=torch.int64, device=dev)
    values, lens = [], []
    for i in range(a):
        values += [batch.target[:, i], batch.history[:, :, i][valid]]
        lens += [ones, lengths]
    for f in range(len(context_names)):
        values.append(batch.context[:, f])
        lens.append(ones)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=feature_names(attr_names, context_names), values=torch.cat(values), lengths=torch.cat(lens)
    )


def _table_name(feature: str) -> str:
    return "t_" + feature


class TorchRecDIN(nn.Module):
    """DIN over a :class:`KeyedJaggedTensor` (see the module docstring for its features).

    attr_names / attr_vocab: one table per attribute (row 0 is unused, as the
    padding row of ``din_fused.model.DIN``); context_names / context_vocab:
    one table per context feature.  ``device="meta"`` builds the tables without
    memory, for ``DistributedModelParallel`` to allocate only each rank's shard.
    The other arguments are those of ``din_fused.model.DIN``.

    forward(kjt) -> click logits [b].
    """

    def __init__(
        self,
        attr_names: Sequence[str],
        attr_vocab: Sequence[int],
        context_names: Sequence[str] = (),
        context_vocab: Sequence[int] = (),
        embedding_dim: int = 16,
        attention: str = "separate",
        attention_impl: str = "fused",
        att_hidden_units: Sequence[int] = (80, 40),
        att_activation: str | None = None,
        att_weight_normalization: str = "none",
        mlp_hidden_units: Sequence[int] = (200, 80),
        activation: str = "dice",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if len(attr_names) != len(attr_vocab) or not attr_names:
            raise ValueError("attr_names and attr_vocab must name the same, non-zero number of tables")
        if len(context_names) != len(context_vocab):
            raise ValueError("context_names and context_vocab must have the same length")
        if any(v < 2 for v in (*attr_vocab, *context_vocab)):
            raise ValueError("every vocabulary needs at least 2 rows (row 0 is padding)")
        if attention not in ("separate", "concat"):
            raise ValueError(f"attention must be 'separate' or 'concat', got {attention!r}")
        self.keys = feature_names(attr_names, context_names)
        self.attr_names = tuple(attr_names)
        self.context_names = tuple(context_names)
        self.embedding_dim = int(embedding_dim)
        self.attention = attention
        tables = [
            EmbeddingConfig(
                name=_table_name(n), embedding_dim=embedding_dim, num_embeddings=int(v),
                feature_names=[n, n + HIST_SUFFIX],
            )
            for n, v in zip(attr_names, attr_vocab)
        ]
        tables += [
            EmbeddingConfig(name=_table_name(n), embedding_dim=embedding_dim, num_embeddings=int(v),
                            feature_names=[n])
            for n, v in zip(context_names, context_vocab)
        ]
        self.ec = EmbeddingCollection(tables=tables, device=torch.device(device or "cpu"))
        a, e = len(attr_names), embedding_dim
        att_activation = activation if att_activation is None else att_activation
        n_units, dim = (a, e) if attention == "separate" else (1, a * e)
        self.att = nn.ModuleList(
            FusedDINAttention(embedding_dim=dim, att_hidden_units=tuple(att_hidden_units),
                              att_activation=att_activation, weight_normalization=att_weight_normalization,
                              impl=attention_impl)
            for _ in range(n_units)
        )
        in_dim = (len(context_names) + 2 * a) * e
        layers: list[nn.Module] = []
        for width in mlp_hidden_units:
            layers += [nn.Linear(in_dim, width), _activation(activation, width)]
            in_dim = width
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(in_dim, 1)

    @classmethod
    def from_dataset(cls, ds: data_mod.SequenceDataset, **kwargs) -> TorchRecDIN:
        return cls(ds.attr_names, ds.attr_vocab, ds.context_names, ds.context_vocab, **kwargs)

    def table_names(self) -> list[str]:
        """The tables in attribute order, then context order."""
        return [_table_name(n) for n in (*self.attr_names, *self.context_names)]

    @torch.no_grad()
    def load_din(self, din: nn.Module) -> TorchRecDIN:
        """Copy every weight of a ``din_fused.model.DIN`` with the same configuration (unsharded only)."""
        sd = din.state_dict()
        tables = [*din.attr_embeddings, *din.context_embeddings]
        for name, emb in zip(self.table_names(), tables):
            self.ec.embeddings[name].weight.copy_(emb.weight)
        dense = {k: v for k, v in sd.items() if k.split(".")[0] in ("att", "mlp", "out")}
        missing, unexpected = self.load_state_dict(dense, strict=False)
        if unexpected or any(not k.startswith("ec.") for k in missing):
            raise ValueError(f"DIN does not match: missing {missing}, unexpected {unexpected}")
        return self

    def forward(self, kjt: KeyedJaggedTensor) -> Tensor:
        if list(kjt.keys()) != self.keys:
            raise ValueError(f"kjt keys must be {self.keys}, got {list(kjt.keys())}")
        emb = self.ec(kjt)
        queries, keys, offsets = [], [], None
        check_rows = not torch.compiler.is_compiling()  # (a traced graph cannot branch on lengths)
        for n in (*self.attr_names, *self.context_names):
            # One id per row, row by row: lengths [2, 0, 1] have the right total but misalign rows.
            f = emb[n]
            misaligned = check_rows and bool((f.lengths() != 1).any())
            if f.values().shape[0] != f.offsets().numel() - 1 or misaligned:
                raise ValueError(f"feature {n!r} must hold exactly one id per row")
        for n in self.attr_names:
            q = emb[n]
            h = emb[n + HIST_SUFFIX]
            queries.append(q.values())
            keys.append(h.values())
            # Every attribute describes the same behaviours, so all sequences share one layout.
            if offsets is None:
                offsets = h.offsets()
            elif not torch.equal(offsets, h.offsets()):
                raise ValueError("every <attr>_hist feature must have the same lengths")
        if self.attention == "separate":
            pooled = [att(q, k, offsets=offsets) for att, q, k in zip(self.att, queries, keys)]
        else:
            pooled = [self.att[0](torch.cat(queries, 1), torch.cat(keys, 1), offsets=offsets)]
        ctx = [emb[n].values() for n in self.context_names]
        x = torch.cat([*ctx, *queries, *pooled], dim=1)
        return self.out(self.mlp(x)).squeeze(1)


# --------------------------------------------------------------------------- #
# Deterministic table initialisation, independent of the sharding
# --------------------------------------------------------------------------- #
@torch.no_grad()
def init_table_rows(out: Tensor, row0: int, table_index: int, seed: int, std: float = 0.05) -> None:
    """Fill ``out`` [n, E] with rows row0..row0+n-1 of table ``table_index``'s initial weights.

    Rows come in fixed chunks, each from its own generator, so any shard of a table gets the
    rows that the whole table would have, without anyone materialising the whole table.
    Row 0 is zero (the padding row of din_fused.model.DIN).
    """
    n, e = out.shape
    first, last = row0 // _INIT_CHUNK, (row0 + n - 1) // _INIT_CHUNK if n else -1
    for c in range(first, last + 1):
        g = torch.Generator().manual_seed(((seed * 1_000_003 + table_index) * 1_000_003 + c) % (1 << 63))
        chunk = torch.randn(_INIT_CHUNK, e, generator=g, dtype=torch.float32) * std
        if c == 0:
            chunk[0] = 0
        lo, hi = max(row0, c * _INIT_CHUNK), min(row0 + n, (c + 1) * _INIT_CHUNK)
        out[lo - row0 : hi - row0].copy_(chunk[lo - c * _INIT_CHUNK : hi - c * _INIT_CHUNK])


def local_shards(module: nn.Module) -> dict[str, list[tuple[int, Tensor]]]:
    """Per table: this rank's (first row, weight view [rows, E]) pieces, sharded or not."""
    out: dict[str, list[tuple[int, Tensor]]] = {}
    for key, t in module.state_dict(keep_vars=True).items():
        if ".embeddings." not in key or not key.endswith(".weight"):
            continue
        table = key.split(".embeddings.")[1][: -len(".weight")]
        if hasattr(t, "local_shards"):
            out[table] = [(int(s.metadata.shard_offsets[0]), s.tensor) for s in t.local_shards()]
        else:
            out[table] = [(0, t)]
    return out


def init_tables(module: nn.Module, table_names: Sequence[str], seed: int) -> None:
    """Initialise this rank's rows of every table with :func:`init_table_rows`."""
    shards = local_shards(module)
    for i, name in enumerate(table_names):
        for row0, w in shards.get(name, []):
            init_table_rows(w, row0, i, seed)


# --------------------------------------------------------------------------- #
# Training: python -m din_fused.train --engine torchrec
# --------------------------------------------------------------------------- #
def _plan_to_json(plan) -> dict:
    out = {}
    for module_path, params in plan.plan.items():
        for table, ps in params.items():
            shards = ps.sharding_spec.shards if ps.sharding_spec is not None else []
            out[f"{module_path}.{table}" if module_path else table] = {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": list(ps.ranks or []),
                "shards": [
                    {"rank": s.placement.rank(), "offsets": list(s.shard_offsets),
                     "sizes": list(s.shard_sizes)}
                    for s in shards
                ],
            }
    return out


def check_shardable(embedding_dim: int) -> None:
    """fbgemm's table-batched kernels, which every sharded table runs on, need E % 4 == 0."""
    if embedding_dim % 4:
        raise ValueError(f"sharded TorchRec tables need an embedding dim that is a multiple of 4, "
                         f"got {embedding_dim}")


def shard_model(model: TorchRecDIN, device: torch.device, sharding: str = SHARDING_TYPE, *,
                embedding_lr: float = EMBEDDING_LR, embedding_optimizer=torch.optim.Adagrad):
    """Wrap ``model`` (tables on meta) in DistributedModelParallel; returns (dmp, plan).

    Every table gets ``sharding`` ("row_wise", "table_wise" or "data_parallel") and an in-backward
    ``embedding_optimizer`` (exact Adagrad; on CPU fbgemm also has SGD); DMP wraps the dense part in DDP.
    """
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.comm_ops import get_gradient_division
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    check_shardable(model.embedding_dim)
    if not get_gradient_division():
        raise RuntimeError("torchrec.distributed.comm_ops gradient division is off; train_step relies on "
                           "it to average the table gradients over ranks as DDP does for the dense ones")
    apply_optimizer_in_backward(embedding_optimizer, model.ec.parameters(), {"lr": embedding_lr})
    world_size = dist.get_world_size()
    constraints = {t: ParameterConstraints(sharding_types=[sharding]) for t in model.table_names()}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device.type), constraints=constraints
    )
    sharders = [EmbeddingCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    return dmp, plan


def _eval_batches(ds: data_mod.SequenceDataset, batch_size: int, rank: int, world_size: int):
    """(Batch, keep) pairs: rank r's samples r, r+W, ...; every rank yields the same number of
    batches, because each sharded lookup is a collective that all ranks must join.  A rank that has
    run out of samples joins with one dummy sample (keep=False)."""
    mine = torch.arange(rank, len(ds), world_size)
    per_rank = math.ceil(len(ds) / world_size)
    for i in range(math.ceil(per_rank / batch_size)):
        idx = mine[i * batch_size : (i + 1) * batch_size]
        if idx.numel():
            yield ds.batch(idx), True
        else:
            yield ds.batch(torch.zeros(1, dtype=torch.int64)), False


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train_step(dmp: nn.Module, opt: torch.optim.Optimizer, dense: Sequence[Tensor], kjt: KeyedJaggedTensor,
               label: Tensor) -> Tensor:
    """One step on this rank's share of a global batch; returns this rank's mean loss (detached).

    The tables are updated inside the backward, the ``dense`` parameters by ``opt``.
    """
    loss = F.binary_cross_entropy_with_logits(dmp(kjt), label)
    opt.zero_grad(set_to_none=True)
    # No rescaling: DDP averages the dense gradients over the W ranks, and TorchRec's all-to-all
    # backward divides the table gradients by W (comm_ops gradient division, on by default), so
    # both see the gradient of the global batch mean, as one process with the whole batch would.
    loss.backward()
    opt.step()
    return loss.detach()


def run_torchrec(args, *, sharding: str = SHARDING_TYPE) -> dict:
    """Train and evaluate TorchRecDIN as configured by the parsed ``din_fused.train`` flags.

    In one process it makes a one-rank group (gloo, or nccl on CUDA), so that one and several
    processes run the same sharded code and the same fused optimizer.  Returns the metrics dict of
    ``din_fused.train.run`` plus the sharding plan and the local table rows of every rank.
    """
    from . import metrics as M
    from .train import (
        PROCESS_GROUP_USED,
        ConfigError,
        TrainError,
        _check_metrics_out,
        _gather,
        _resolve_device,
        load_dataset,
        train_steps,
        write_json_atomic,
    )

    if args.model != "din":
        raise ConfigError("--engine torchrec trains --model din only")
    if args.mba_lambda > 0:
        raise ConfigError("--engine torchrec: --mba-lambda is not supported (the tables use Adagrad)")
    if args.save:
        raise ConfigError("--engine torchrec: --save is not supported (the tables are sharded; train "
                          "with the default engine to write a checkpoint)")
    try:
        check_shardable(args.embedding_dim)
    except ValueError as e:
        raise ConfigError(f"--engine torchrec: --embedding-dim: {e}") from None
    device = _resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    own_group = not (dist.is_available() and dist.is_initialized())
    if own_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        PROCESS_GROUP_USED[0] = True
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        metrics_path = _check_metrics_out(args.metrics_out)
        show = rank == 0 and not args.no_progress

        t_data = time.perf_counter()
        full = load_dataset(args)
        # The same users as the native engine's split; this engine trains for --epochs
        # without early stopping, so the validation users are left out.
        train_ds, _val, test_ds = data_mod.split_by_user(full, args.val_frac, args.test_frac, args.seed)
        data_seconds = time.perf_counter() - t_data

        torch.manual_seed(args.seed)  # the dense part: identical on every rank and run
        model = TorchRecDIN.from_dataset(
            full, embedding_dim=args.embedding_dim, attention=args.attention,
            attention_impl=args.attention_impl, activation=args.activation, device="meta",
        )
        dmp, plan = shard_model(model, device, sharding)
        init_tables(dmp, model.table_names(), args.seed)
        dense = [p for n, p in dmp.named_parameters() if ".embeddings." not in n]
        opt = torch.optim.Adam(dense, lr=args.lr)
        names = (full.attr_names, full.context_names)

        train_steps(len(train_ds), args.batch_size, world_size)  # ConfigError when there is no batch
        epoch_losses: list[float] = []
        train_seconds, samples_seen = 0.0, 0
        for epoch in range(args.epochs):
            dmp.train()
            loss_sum = torch.zeros((), dtype=torch.float64)
            n_seen = 0
            t0 = time.perf_counter()
            batches = data_mod.iterate_batches(train_ds, args.batch_size, shuffle=True,
                                               seed=args.seed * 100_003 + epoch, rank=rank,
                                               world_size=world_size)
            for b in batches:
                loss = train_step(dmp, opt, dense, batch_to_kjt(b, *names).to(device), b.label.to(device))
                loss_sum += loss.detach().double().cpu() * b.label.numel()
                n_seen += b.label.numel()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - t0
            stats = torch.tensor([loss_sum.item(), float(n_seen)], dtype=torch.float64)
            dist.all_reduce(stats)
            epoch_loss = stats[0].item() / max(stats[1].item(), 1.0)
            if not math.isfinite(epoch_loss):
                raise TrainError(
                    f"the training loss became {epoch_loss} in epoch {epoch + 1}; try a lower --lr"
                )
            epoch_losses.append(epoch_loss)
            samples_seen += int(stats[1].item())
            if show:
                print(f"epoch {epoch + 1}: train logloss {epoch_loss:.4f}", file=sys.stderr)

        t_eval = time.perf_counter()
        dmp.eval()
        probs, labels, users = [], [], []
        with torch.no_grad():
            for b, keep in _eval_batches(test_ds, max(args.batch_size, 1024), rank, world_size):
                p = torch.sigmoid(dmp(batch_to_kjt(b, *names).to(device)).float()).cpu()
                if keep:
                    probs.append(p)
                    labels.append(b.label)
                    users.append(b.user)
        cat = lambda xs: torch.cat(xs).numpy()  # noqa: E731
        probs, labels, users = _gather((cat(probs), cat(labels), cat(users)), world_size)
        g = M.group_auc(labels, probs, users)
        local_rows = {t: sum(w.shape[0] for _, w in pieces) for t, pieces in local_shards(dmp).items()}
        all_rows = [None] * world_size
        dist.all_gather_object(all_rows, local_rows)
        result = {
            "name": "DIN+" + {"dice": "Dice", "prelu": "PReLU"}[args.activation] + " (TorchRec)",
            "engine": "torchrec",
            "dataset": args.dataset,
            "model": "din",
            "activation": args.activation,
            "attention": args.attention,
            "attention_impl": args.attention_impl,
            "test_auc": M.auc(labels, probs),
            "test_gauc": g.weighted,
            "test_gauc_unweighted": g.unweighted,
            "test_logloss": M.log_loss(labels, probs),
            "gauc_users": g.users,
            "gauc_users_skipped": g.skipped,
            "n_train": len(train_ds),
            "n_test": int(labels.shape[0]),
            "n_train_users": train_ds.num_users,
            "n_test_users": test_ds.num_users,
            "train_loss_per_epoch": epoch_losses,
            "train_seconds": train_seconds,
            "samples_per_second": samples_seen / train_seconds if train_seconds > 0 else float("nan"),
            "eval_seconds": time.perf_counter() - t_eval,
            "data_seconds": data_seconds,
            "world_size": world_size,
            "backend": dist.get_backend(),
            "sharding_type": sharding,
            "sharding_plan": _plan_to_json(plan),
            "local_table_rows": all_rows,
            "embedding_optimizer": f"in-backward exact Adagrad, lr {EMBEDDING_LR}",
            "peak_rss_mib_rank0": _peak_rss_mib(),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "config": {k: v for k, v in vars(args).items() if k not in ("no_progress",)},
        }
        if rank == 0 and metrics_path is not None:
            write_json_atomic(metrics_path, result)
        return result
    finally:
        if own_group:
            dist.destroy_process_group()
