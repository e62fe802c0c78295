"""Batches for training and evaluation: sample indices -> padded or jagged tensors, single process or
DDP shards.

Two layouts of the same samples:

* :class:`Batch` (``layout="padded"``): histories padded to ``max_len``, [b, T, A], 0 beyond
  ``lengths``;
* :class:`JaggedBatch` (``layout="jagged"``): histories back to back with no padding, ``values``
  [N, A] with N = sum of the lengths, and ``offsets`` [b+1] (row i's history is
  ``values[offsets[i]:offsets[i+1]]``, oldest first).
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:  # protocol imports this module, so only for annotations
    from .protocol import SequenceDataset

__all__ = ["Batch", "JaggedBatch", "gather_padded", "gather_jagged", "iterate_batches", "num_train_steps"]

LAYOUTS = ("padded", "jagged")


class Batch(NamedTuple):
    """One mini-batch, all tensors on the same device.

    user     [b] int64    user index (for GAUC only; never a model input)
    target   [b, A] int64 candidate attribute ids
    history  [b, T, A] int64 behaviour attribute ids, 0 beyond ``lengths``
    lengths  [b] int64    valid behaviours per row, 0..T
    context  [b, F] int64 context feature ids (F may be 0)
    label    [b] float32
    """

    user: torch.Tensor
    target: torch.Tensor
    history: torch.Tensor
    lengths: torch.Tensor
    context: torch.Tensor
    label: torch.Tensor

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self))


class JaggedBatch(NamedTuple):
    """One mini-batch with unpadded histories, all tensors on the same device.

    user     [b] int64    user index (for GAUC only; never a model input)
    target   [b, A] int64 candidate attribute ids
    values   [N, A] int64 every row's behaviours back to back, N = offsets[-1]
    offsets  [b+1] int64  row i's behaviours are values[offsets[i]:offsets[i+1]]; offsets[0] = 0
    context  [b, F] int64 context feature ids (F may be 0)
    label    [b] float32
    """

    user: torch.Tensor
    target: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    context: torch.Tensor
    label: torch.Tensor

    def to(self, device) -> JaggedBatch:
        return JaggedBatch(*(t.to(device, non_blocking=True) for t in self))

    @property
    def lengths(self) -> torch.Tensor:
        """[b] int64 behaviours per row."""
        return self.offsets[1:] - self.offsets[:-1]


def gather_padded(
    seq: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor, max_len: int
) -> torch.Tensor:
    """Windows ``seq[start[i] : start[i] + lengths[i]]`` of a store [M, A] -> padded [b, max_len, A],
    0 beyond."""
    steps = torch.arange(max_len, dtype=torch.int64, device=seq.device)
    valid = steps.unsqueeze(0) < lengths.unsqueeze(1)  # [b, T]
    # Clamp padded positions to a real row (0) and zero them afterwards, so
    # the gather never reads out of bounds and padding is exactly 0.
    pos = torch.where(valid, start.unsqueeze(1) + steps.unsqueeze(0), torch.zeros((), dtype=torch.int64))
    return seq[pos] * valid.unsqueeze(-1)


def gather_jagged(
    seq: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows ``seq[start[i] : start[i] + lengths[i]]`` of a store [M, A] -> (values [sum(lengths), A],
    offsets [b+1] int64), no padding.  Raises ValueError on a negative length or a window outside
    the store (repeat_interleave with output_size checks neither, and reads out of bounds)."""
    if lengths.numel():
        end = start + lengths
        if int(lengths.min()) < 0 or int(start.min()) < 0 or int(end.max()) > seq.shape[0]:
            raise ValueError(f"lengths must be >= 0 and every window seq[start : start + lengths] inside "
                             f"the store of {seq.shape[0]} rows; got lengths in [{int(lengths.min())}, "
                             f"{int(lengths.max())}], windows in [{int(start.min())}, {int(end.max())})")
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=seq.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    n = int(offsets[-1])
    # Position j of the output belongs to row i = the one whose window covers it:
    # seq index = start[i] + (j - offsets[i]).
    shift = torch.repeat_interleave(start - offsets[:-1], lengths, output_size=n)
    return seq[torch.arange(n, device=seq.device) + shift], offsets


def iterate_batches(
    ds: SequenceDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    layout: str = "padded",
):
    """Yield this rank's :class:`Batch` es (``layout="padded"``) or :class:`JaggedBatch` es
    (``layout="jagged"``) for one pass over ``ds``; both layouts hold the same samples in the same order.

    ``batch_size`` is per rank.  Training (``shuffle=True``): every rank draws the
    same permutation from ``seed``; step i uses the global slice
    ``perm[i*B*W:(i+1)*B*W]`` and rank r takes every W-th sample of it from r.
    DDP's gradient average over ranks then equals the gradient of that whole
    global batch, and every rank runs the same number of steps (DDP requires
    it).  The last global batch is cut to a multiple of W, dropping at most W-1
    samples per epoch (none when W=1), and dropped when that leaves each rank a
    single sample while batches hold more (BatchNorm, in Dice, cannot train on one).

    Evaluation (``shuffle=False``): rank r takes samples r, r+W, ... in order, so
    the shards cover every sample exactly once; ranks may differ by one batch.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    # Checked here, not at the first batch: a rank outside [0, world_size) would read another
    # rank's shard (or, negative, start from the end), and a batch_size < 1 would yield nothing.
    for name, v, lo in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size) = [0, {world_size}), got {rank}")
    return _batches(ds, batch_size, shuffle, seed, rank, world_size, layout)


def _batches(ds: SequenceDataset, batch_size: int, shuffle: bool, seed: int, rank: int, world_size: int,
             layout: str):
    n = len(ds)
    if shuffle:
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(n, generator=g)
        step = batch_size * world_size
        for lo in range(0, n, step):
            glob = perm[lo : lo + step]
            usable = glob.numel() - glob.numel() % world_size
            if usable // world_size < min(2, batch_size):
                break
            yield ds.batch(glob[:usable][rank::world_size], layout)
    else:
        mine = torch.arange(rank, n, world_size)
        for lo in range(0, mine.numel(), batch_size):
            yield ds.batch(mine[lo : lo + batch_size], layout)


def num_train_steps(n: int, batch_size: int, world_size: int) -> int:
    """Number of batches :func:`iterate_batches` yields per rank with ``shuffle=True``."""
    step = batch_size * world_size
    full, rem = divmod(n, step)
    return full + (1 if rem // world_size >= min(2, batch_size) else 0)


