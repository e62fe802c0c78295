"""Train and evaluate DIN or the BaseModel: ``python -m din_fused.train [flags]``.

With no flags it trains DIN (Dice, separate attention, fused op) on the
embedded synthetic data set and prints a results table.  ``--dataset
movielens --data-dir DIR`` follows the paper's MovieLens protocol (see
``din_fused.data``).

Users are split into train, validation and test (``--val-frac``,
``--test-frac``).  After every epoch the validation AUC is measured; the best
epoch's weights are kept, training stops after ``--patience`` epochs without a
better one, and those weights are evaluated on test once (and written by
``--save``).  Batches are jagged (no padding) unless ``--layout padded``.

Under ``torchrun --nproc_per_node=N`` it trains with DistributedDataParallel
(gloo on CPU, nccl on CUDA).  Every rank builds the same data deterministically
from ``--seed``; training batches are sharded so that the DDP gradient equals
the gradient of the global batch (``--batch-size`` is per process), and the
test predictions of all ranks are gathered so rank 0 reports metrics over the
whole test set.

Exit status: 0 on success, 2 on bad flags or bad data (with a one-line message
on stderr and nothing written), 1 if training diverges.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import data as data_mod
from . import metrics as M
from ._atomic import atomic_write
from .model import MiniBatchAwareL2, build_model, save

__all__ = ["EarlyStopping", "build_parser", "main", "run"]

PROG = "python -m din_fused.train"


class ConfigError(ValueError):
    """A flag combination that cannot work here (bad device, unwritable --metrics-out, ...)."""


class TrainError(RuntimeError):
    """Training could not finish (e.g. the loss became NaN); the message says what to try."""


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #
def _int_at_least(lo: int, what: str, below: int | None = None):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lo or (below is not None and v >= below):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
# Seeds are mixed into generator seeds (seed * 100003 + epoch for the shuffle), which must fit
# in int64: a seed above ~9e13 overflowed there, after the data was built.
seed_type = _int_at_least(0, "an integer in [0, 2**32)", below=2**32)


def _float_in(lo: float, lo_open: bool):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(v) or v < lo or (lo_open and v == lo):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if lo_open else '>='} {lo}, got {s!r}")
        return v

    return parse


def _fraction(s: str, lo_open: bool = True) -> float:
    v = _float_in(0.0, lo_open)(s)
    if v >= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in {'(' if lo_open else '['}0, 1), got {s!r}")
    return v


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every flag's help, except where there is no default value (None,
    off switches): those flags' help says what happens without them."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train DIN (or the paper's BaseModel) and report AUC, GAUC and throughput.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--dataset", choices=("synthetic", "movielens"), default="synthetic", help="data source")
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="MovieLens directory with ratings.csv and movies.csv; if not given, $DIN_FUSED_DATA "
        "(the directory itself or one that contains ml-latest-small)",
    )
    p.add_argument(
        "--model", choices=("din", "base"), default="din", help="DIN or the Embedding&MLP BaseModel"
    )
    p.add_argument(
        "--activation", choices=("dice", "prelu"), default="dice", help="MLP and attention activation"
    )
    p.add_argument(
        "--attention",
        choices=("separate", "concat"),
        default="separate",
        help="one attention unit per attribute, or one over the concatenated attributes",
    )
    p.add_argument(
        "--attention-impl",
        choices=("fused", "reference"),
        default="fused",
        help="the fused op or the pure-PyTorch reference",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=3,
        metavar="N",
        help="most epochs; training stops earlier when validation AUC has not improved for --patience epochs",
    )
    p.add_argument(
        "--patience",
        type=_positive_int,
        default=2,
        metavar="N",
        help="early stopping: stop after N epochs without a better validation AUC",
    )
    p.add_argument("--batch-size", type=_positive_int, default=256, metavar="N", help="per process")
    p.add_argument(
        "--max-len", type=_positive_int, default=50, metavar="N", help="behaviours kept per sample"
    )
    p.add_argument("--lr", type=_float_in(0.0, True), default=1e-3, metavar="F", help="Adam learning rate")
    p.add_argument(
        "--mba-lambda",
        type=_float_in(0.0, False),
        default=0.0,
        metavar="F",
        help="mini-batch aware L2 strength (0 = off)",
    )
    p.add_argument("--seed", type=seed_type, default=0, metavar="S",
                   help="data, split, init and shuffle seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: cuda if available)")
    p.add_argument("--metrics-out", metavar="FILE.json", default=None, help="write metrics JSON here")
    # Knobs beyond the list, with defaults that keep its behaviour.
    p.add_argument("--embedding-dim", type=_positive_int, default=16, metavar="N", help="per attribute")
    p.add_argument("--pooling", choices=("sum", "mean"), default="sum", help="BaseModel pooling")
    p.add_argument(
        "--val-frac",
        type=lambda v: _fraction(v, lo_open=False),
        default=0.1,
        metavar="F",
        help="fraction of users for validation (early stopping, model choice); 0: none, train all --epochs",
    )
    p.add_argument("--test-frac", type=_fraction, default=0.1, metavar="F", help="fraction of users for test")
    p.add_argument(
        "--save",
        metavar="PATH",
        default=None,
        help="write a checkpoint (weights, config, id vocabularies, max length, metrics) for "
        "din_fused.model.load and din_fused.predict",
    )
    p.add_argument(
        "--synthetic-users", type=_positive_int, default=3000, metavar="N", help="users of the synthetic data"
    )
    p.add_argument(
        "--layout",
        choices=("jagged", "padded"),
        default="jagged",
        help="histories as unpadded values+offsets, or padded to --max-len (same model, same results "
        "up to float rounding)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument(
        "--engine",
        choices=("native", "torchrec"),
        default="native",
        help="native: nn.Embedding tables, replicated by DDP; torchrec: TorchRec tables sharded row-wise "
        "(needs the torchrec extra, see docs/torchrec.md)",
    )
    return p


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device: expected auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA devices")
        if dev.index is None:
            # Under torchrun each process takes its own GPU.
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ConfigError(f"--device: expected auto, cpu, cuda or cuda:N, got {spec!r}")
    return dev


def train_steps(n: int, batch_size: int, world_size: int) -> int:
    """Training batches per epoch and rank (data.num_train_steps); ConfigError when there are none."""
    steps = data_mod.num_train_steps(n, batch_size, world_size)
    if steps == 0:
        raise ConfigError(f"the training split has {n} samples: too few for one batch of "
                          f"{min(2, batch_size)} per process ({world_size} processes)")
    return steps


def _check_writable(flag: str, path: str | None) -> Path | None:
    """Fail before training, not after, if an output file cannot be written."""
    if path is None:
        return None
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    try:
        if not parent.is_dir():
            raise ConfigError(f"{flag}: directory {parent} does not exist")
        if p.is_dir():
            raise ConfigError(f"{flag}: {p} is a directory")
        # A file made and removed where the output will go: os.access says yes to root on a
        # read-only or special file system (/proc), where the write would fail after training.
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name[:64]}.", suffix=".check", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:  # a name too long, a directory not writable, a file system that refuses
        raise ConfigError(f"{flag}: {path} cannot be written ({e.strerror or e})") from None
    return p


def _check_metrics_out(path: str | None) -> Path | None:
    return _check_writable("--metrics-out", path)


def _json_value(x):
    """x with every NaN or infinite float (an AUC of a one-class set, a std of one seed) as None:
    JSON has no NaN, and json.dump would write a token that strict readers refuse."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_value(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_value(v) for v in x]
    return x


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` to ``path`` so readers see the old file or the whole new one, never a part.
    Non-finite floats are written as null."""
    with atomic_write(path) as fh:
        json.dump(_json_value(obj), fh, indent=2, sort_keys=True, allow_nan=False)
        fh.write("\n")


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam, fused (one kernel over every tensor) where torch has it for the parameters'
    device: the same update up to rounding, 2.4 -> 0.5 ms a step for DIN's ~30 tensors on
    2 CPU threads (issue 12).  Falls back to the default implementation elsewhere."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def _model_name(args) -> str:
    act = {"dice": "Dice", "prelu": "PReLU"}[args.activation]
    if args.model == "base":
        return f"BaseModel+{act}" + ("" if args.pooling == "sum" else f" ({args.pooling})")
    extra = "" if args.attention == "separate" else " (concat)"
    return f"DIN+{act}{extra}"


def load_dataset(args) -> data_mod.SequenceDataset:
    if args.dataset == "synthetic":
        return data_mod.make_synthetic(num_users=args.synthetic_users, max_len=args.max_len, seed=args.seed)
    data_dir = args.data_dir if args.data_dir is not None else data_mod.default_movielens_dir()
    if data_dir is None:
        raise data_mod.DataError(
            "--dataset movielens needs --data-dir DIR (a directory with ratings.csv and movies.csv, "
            "e.g. ml-latest-small) or $DIN_FUSED_DATA"
        )
    return data_mod.load_movielens(data_dir, max_len=args.max_len)


def _context_counts(ds: data_mod.SequenceDataset) -> list[torch.Tensor]:
    """Per context feature f: [V_f] number of samples with each id (a context id occurs once per sample)."""
    return [
        torch.bincount(ds.context[:, f], minlength=v).to(torch.float64)
        for f, v in enumerate(ds.context_vocab)
    ]


@torch.no_grad()
def predict(model, ds, batch_size: int, device, rank: int, world_size: int, layout: str = "jagged"):
    """This rank's shard of ``ds``: (probabilities [n], labels [n], users [n]) as NumPy arrays.
    Under DDP, rank 0's buffers are copied to every rank first: each rank's last training forward
    left its own Dice running statistics, and every shard must be scored by the model rank 0
    keeps and saves."""
    if world_size > 1:
        for buf in model.buffers():
            dist.broadcast(buf, 0)
    model.eval()
    probs, labels, users = [], [], []
    batches = data_mod.iterate_batches(
        ds, batch_size, shuffle=False, rank=rank, world_size=world_size, layout=layout
    )
    for b in batches:
        b = b.to(device)
        logits = model(b)
        probs.append(torch.sigmoid(logits.float()).cpu())
        labels.append(b.label.cpu())
        users.append(b.user.cpu())
    cat = lambda xs, dt: torch.cat(xs).numpy() if xs else np.zeros(0, dtype=dt)  # noqa: E731
    return cat(probs, np.float32), cat(labels, np.float32), cat(users, np.int64)


def _ids_of_all_ranks(ids: list[torch.Tensor], model) -> list[torch.Tensor]:
    """Per embedding table, the ids of every rank's batch (one all_reduce of a used-row mask).
    Each rank then adds the mini-batch aware penalty of the whole global batch, so DDP's average
    of the gradients is the one-process gradient of that batch; with each rank's own ids, a row
    used on one rank of W got 1/W of its penalty."""
    sizes = [t.num_embeddings for t in model.embedding_tables()]
    used = torch.zeros(sum(sizes), dtype=torch.int32, device=ids[0].device)
    for idx, start in zip(ids, np.cumsum([0, *sizes[:-1]])):
        used[int(start) + idx.reshape(-1)] = 1
    dist.all_reduce(used, op=dist.ReduceOp.MAX)
    return [part.nonzero().squeeze(1) for part in used.split(sizes)]


def _gather(arrays, world_size: int):
    """Concatenate per-rank NumPy arrays on every rank (a no-op without DDP)."""
    if world_size == 1:
        return arrays
    out = [None] * world_size
    dist.all_gather_object(out, arrays)
    return tuple(np.concatenate([o[i] for o in out]) for i in range(len(arrays)))


class EarlyStopping:
    """Keeps the weights of the epoch with the best validation AUC; says when to stop.

    ``step(auc, model)`` after every epoch returns True once ``patience`` epochs in a row
    brought no higher AUC.  A NaN AUC (a one-class validation set) never counts as better,
    except that the first epoch is always kept.  ``restore_best(model)`` loads the kept
    weights and returns their 1-based epoch (0 if ``step`` was never called).
    """

    def __init__(self, patience: int):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.epoch = 0
        self.best_epoch = 0
        self.best_auc = float("nan")
        self.stale = 0
        self._state: dict | None = None

    def step(self, auc: float, model: torch.nn.Module) -> bool:
        self.epoch += 1
        better = auc > self.best_auc or (math.isnan(self.best_auc) and not math.isnan(auc))
        if better or self._state is None:
            self.best_epoch, self.best_auc, self.stale = self.epoch, auc, 0
            self._state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.stale += 1
        return self.stale >= self.patience

    def restore_best(self, model: torch.nn.Module) -> int:
        if self._state is not None:
            model.load_state_dict(self._state)
        return self.best_epoch


def _results_table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    v = max(len(x) for _, x in rows)
    line = f"+-{'-' * w}-+-{'-' * v}-+"
    body = [f"| {k:<{w}} | {x:>{v}} |" for k, x in rows]
    return "\n".join([title, line, *body, line])


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
def run(args: argparse.Namespace) -> dict:
    """Train and evaluate as configured by parsed ``args``; returns the metrics dict.

    Raises :class:`ConfigError` / ``DataError`` for bad configuration or data and
    :class:`TrainError` if the loss diverges.  Must be called after the process
    group is initialised when running distributed.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(args.device, local_rank)
    metrics_path = _check_metrics_out(args.metrics_out)
    save_path = _check_writable("--save", args.save)
    if metrics_path is not None and save_path is not None and metrics_path.resolve() == save_path.resolve():
        raise ConfigError(f"--metrics-out and --save name the same file ({args.save}): the checkpoint "
                          "would overwrite the metrics")
    if args.model == "din" and args.attention_impl == "fused" and device.type == "cuda":
        import din_fused

        if not din_fused.build_info().get("cuda", False):
            raise ConfigError(
                "--attention-impl fused on CUDA: din_fused was built without CUDA "
                "(rebuild with nvcc available, or use --attention-impl reference / --device cpu)"
            )
    show = rank == 0 and not args.no_progress

    t_data = time.perf_counter()
    full = load_dataset(args)
    train_ds, val_ds, test_ds = data_mod.split_by_user(full, args.val_frac, args.test_frac, args.seed)
    data_seconds = time.perf_counter() - t_data

    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_model(
        args.model,
        full.attr_vocab,
        full.context_vocab,
        embedding_dim=args.embedding_dim,
        activation=args.activation,
        attention=args.attention,
        attention_impl=args.attention_impl,
        pooling=args.pooling,
    ).to(device)
    reg = None
    if args.mba_lambda > 0:
        reg = MiniBatchAwareL2([*train_ds.id_counts(), *_context_counts(train_ds)], args.mba_lambda).to(
            device
        )
    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = adam(model.parameters(), args.lr)

    steps = train_steps(len(train_ds), args.batch_size, world_size)
    epoch_losses: list[float] = []
    val_auc_per_epoch: list[float] = []
    stopper = EarlyStopping(args.patience)
    train_seconds = 0.0
    samples_seen = 0
    eval_bs = max(args.batch_size, 1024)
    for epoch in range(args.epochs):
        net.train()
        bar = tqdm(
            data_mod.iterate_batches(
                train_ds,
                args.batch_size,
                shuffle=True,
                seed=args.seed * 100_003 + epoch,
                rank=rank,
                world_size=world_size,
                layout=args.layout,
            ),
            total=steps,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=not show,
            dynamic_ncols=True,
            mininterval=0.5,
            file=sys.stderr,
        )
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_seen = 0
        t0 = time.perf_counter()
        for i, b in enumerate(bar):
            b = b.to(device)
            try:
                logits = net(b)
            except ValueError as e:
                # Training-mode Dice takes BatchNorm statistics over the batch's behaviours, and one
                # behaviour has no variance (the op, like nn.BatchNorm1d, refuses it).
                jagged = isinstance(b, data_mod.JaggedBatch)
                behaviours = b.values.shape[0] if jagged else int(b.lengths.sum())
                if args.model == "din" and args.activation == "dice" and behaviours == 1:
                    raise TrainError(
                        f"epoch {epoch + 1}, batch {i + 1} holds one behaviour in all, and Dice's batch "
                        "statistics need 2: use a larger --batch-size or --max-len, or --activation prelu"
                    ) from e
                raise
            loss = F.binary_cross_entropy_with_logits(logits, b.label)
            total = loss
            if reg is not None:
                ids = model.batch_ids_of(b)
                if distributed:
                    ids = _ids_of_all_ranks(ids, model)
                total = loss + reg(model.embedding_tables(), ids)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            loss_sum += loss.detach().double() * b.label.numel()
            n_seen += b.label.numel()
            if show and (i % 20 == 0 or i == steps - 1):
                # .item() synchronises, so it is only done when the bar is redrawn.
                running = loss_sum.item() / max(n_seen, 1)
                # Under DDP only rank 0 shows the bar: it stops at the epoch's end with the others
                # (the all-reduced loss below), not here, alone, leaving them in a collective.
                if not math.isfinite(running) and not distributed:
                    raise TrainError(
                        f"the training loss became {running} in epoch {epoch + 1}; try a lower --lr"
                    )
                bar.set_postfix(loss=f"{running:.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds += time.perf_counter() - t0
        bar.close()
        # Epoch loss over all ranks' samples.
        stats = torch.tensor([loss_sum.item(), float(n_seen)], dtype=torch.float64, device=device)
        if distributed:
            dist.all_reduce(stats)
        epoch_loss = stats[0].item() / max(stats[1].item(), 1.0)
        if not math.isfinite(epoch_loss):
            raise TrainError(f"the training loss became {epoch_loss} in epoch {epoch + 1}; try a lower --lr")
        epoch_losses.append(epoch_loss)
        samples_seen += int(stats[1].item())
        msg = f"epoch {epoch + 1}: train logloss {epoch_loss:.4f}"
        if len(val_ds):
            # Every rank scores its shard; all ranks see the gathered arrays, so they agree on when to stop.
            vp, vl, _ = _gather(
                predict(model, val_ds, eval_bs, device, rank, world_size, args.layout), world_size
            )
            val_auc = M.auc(vl, vp)
            val_auc_per_epoch.append(val_auc)
            msg += f", validation AUC {val_auc:.4f}"
            stop = stopper.step(val_auc, model)
        else:
            stop = False
        if rank == 0 and not args.no_progress:
            print(msg, file=sys.stderr)
        if stop:
            if rank == 0 and not args.no_progress:
                print(f"early stop: no better validation AUC for {stopper.stale} epochs", file=sys.stderr)
            break
    # The weights of the best validation epoch are the ones evaluated (and saved); without a
    # validation set, the last epoch's.
    best_epoch = stopper.restore_best(model) or len(epoch_losses)

    # Every rank predicts its shard; gather so rank 0 scores the whole test set.
    t_eval = time.perf_counter()
    probs, labels, users = _gather(
        predict(model, test_ds, eval_bs, device, rank, world_size, args.layout), world_size
    )
    g = M.group_auc(labels, probs, users)
    val_auc = val_gauc = None  # no validation set (--val-frac 0): null in the metrics, not NaN
    if len(val_ds):
        val = _gather(predict(model, val_ds, eval_bs, device, rank, world_size, args.layout), world_size)
        val_auc, val_gauc = M.auc(val[1], val[0]), M.group_auc(val[1], val[0], val[2]).weighted
    result = {
        "name": _model_name(args),
        "dataset": args.dataset,
        "model": args.model,
        "activation": args.activation,
        "attention": args.attention if args.model == "din" else None,
        "attention_impl": args.attention_impl if args.model == "din" else None,
        "best_epoch": best_epoch,
        "epochs_run": len(epoch_losses),
        "val_auc": val_auc,
        "val_gauc": val_gauc,
        "val_auc_per_epoch": val_auc_per_epoch,
        "test_auc": M.auc(labels, probs),
        "test_gauc": g.weighted,
        "test_gauc_unweighted": g.unweighted,
        "test_logloss": M.log_loss(labels, probs),
        "gauc_users": g.users,
        "gauc_users_skipped": g.skipped,
        "n_train": len(train_ds),
        "n_val": len(val_ds),
        "n_test": int(labels.shape[0]),
        "n_train_users": train_ds.num_users,
        "n_val_users": val_ds.num_users,
        "n_test_users": test_ds.num_users,
        "train_loss_per_epoch": epoch_losses,
        "train_seconds": train_seconds,
        "samples_per_second": samples_seen / train_seconds if train_seconds > 0 else float("nan"),
        "eval_seconds": time.perf_counter() - t_eval,
        "data_seconds": data_seconds,
        "world_size": world_size,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k not in ("no_progress",)},
    }
    if rank == 0:
        if metrics_path is not None:
            write_json_atomic(metrics_path, result)
        if save_path is not None:
            save(
                model,
                save_path,
                vocab=full.vocab,
                max_len=args.max_len,
                metrics=result,
                attr_names=full.attr_names,
                context_names=full.context_names,
            )
    return result


def format_results(r: dict) -> str:
    """The end-of-run table printed by the CLI (the TorchRec engine and --val-frac 0 have no
    validation part)."""
    val = r.get("val_auc") is not None
    title = (
        f"{r['name']} on {r['dataset']}"
        + (f", {r['attention']} attention, {r['attention_impl']} op" if r["model"] == "din" else "")
        + f": {r['n_train']:,} train / " + (f"{r['n_val']:,} validation / " if val else "")
        + f"{r['n_test']:,} test samples, {r['n_test_users']:,} test users"
    )
    rows = [
        ("best epoch (validation AUC) / epochs run", f"{r['best_epoch']} / {r['epochs_run']}"),
        ("validation AUC", f"{r['val_auc']:.4f}"),
    ] if val else []
    rows += [
        ("test AUC", f"{r['test_auc']:.4f}"),
        ("test GAUC (impression-weighted)", f"{r['test_gauc']:.4f}"),
        ("test per-user AUC (unweighted)", f"{r['test_gauc_unweighted']:.4f}"),
        ("test logloss", f"{r['test_logloss']:.4f}"),
        ("GAUC users scored / skipped", f"{r['gauc_users']} / {r['gauc_users_skipped']}"),
        ("train logloss (last epoch)", f"{r['train_loss_per_epoch'][-1]:.4f}"),
        ("train seconds", f"{r['train_seconds']:.1f}"),
        ("train samples / second", f"{r['samples_per_second']:,.0f}"),
        ("processes (world size)", f"{r['world_size']}"),
        ("device", r["device"]),
    ]
    return _results_table(title, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a message on an unknown flag or value
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed and not dist.is_initialized():
        want_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        PROCESS_GROUP_USED[0] = True
    done = False
    try:
        check_config(args)
        if args.engine == "torchrec":
            try:
                from .torchrec_din import run_torchrec  # torchrec is an optional extra
            except ImportError as e:
                raise ConfigError(str(e)) from e
            result = run_torchrec(args)
        else:
            result = run(args)
        done = True
    except (data_mod.DataError, ConfigError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except TrainError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        # NumPy raises MemoryError; torch a RuntimeError from its CPU allocator, or OutOfMemoryError.
        oom = isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in str(e)
        if not oom:
            raise
        print(f"{PROG}: error: out of memory; reduce --synthetic-users, --max-len, --embedding-dim or "
              f"--batch-size", file=sys.stderr)
        return 1
    finally:
        if distributed and dist.is_initialized():
            if done:
                # Every rank past its last collective before any tears the group down (a rank that
                # failed skips it: torchrun stops the others).  The SIGABRT at exit that CI saw is
                # not this: see exit_past_process_group.
                dist.barrier()
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_results(result))
        if args.metrics_out:
            print(f"metrics written to {args.metrics_out}")
    return 0


def check_config(args: argparse.Namespace) -> None:
    """What the parser cannot check flag by flag; ConfigError (the sweep checks its runs with it)."""
    if args.activation == "dice" and args.batch_size < 2:
        raise ConfigError("--batch-size 1 with --activation dice: Dice's BatchNorm needs at least 2 "
                          "samples a batch (or use --activation prelu)")


def _reexec_with_passive_openmp() -> None:
    """Re-run this command with OMP_WAIT_POLICY=passive unless the user chose a policy.

    torch's OpenMP threads spin after each of its parallel ops; on a machine shared with
    busy processes that made the main job ~7x slower (bench/loaded.py, docs/performance.md).
    OpenMP reads the variable when torch loads, before this module runs: hence the re-exec."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "passive"
    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: running with OMP_WAIT_POLICY=passive (set OMP_WAIT_POLICY to override)",
              file=sys.stderr, flush=True)
    argv = getattr(sys, "orig_argv", None) or [sys.executable, "-m", "din_fused.train", *sys.argv[1:]]
    os.execv(sys.executable, argv)  # sys.orig_argv (Python >= 3.10) keeps interpreter flags


# A process group (gloo or nccl) was made in this process: see exit_past_process_group.
PROCESS_GROUP_USED = [False]


def exit_past_process_group(code: int):
    """Exit with ``code`` without Python's finalization, once a process group has been used.

    Why: a torch bug.  Gloo's runloop threads release a finished collective's work, and with it
    tensors that Python has seen (all_gather_object's), after the caller has returned; releasing
    them takes the GIL.  When the interpreter is finalizing by then, the thread is ended inside
    take_gil, and the forced unwind through a noexcept destructor calls std::terminate: SIGABRT,
    "terminate called without an active exception", after all the work is done (a gdb backtrace:
    ProcessGroupGloo::runLoop -> ~AsyncAllgatherWork -> decref_pyobject -> take_gil ->
    pthread_exit).  destroy_process_group does not join those threads.  It hit 1 run in ~55 of
    bench/torchrec_scale.py, and CI several times.  Output is flushed first; nothing else is left."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _reexec_with_passive_openmp()
    # main() of the module the package's other modules import (torchrec_din raises its
    # ConfigError): under -m this file is also __main__, whose ConfigError is another class, and
    # theirs escaped as a traceback instead of exiting 2.
    from din_fused import train as _train

    code = _train.main()
    if _train.PROCESS_GROUP_USED[0]:
        _train.exit_past_process_group(code)
    sys.exit(code)
