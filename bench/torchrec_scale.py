"""Memory per rank and training speed: TorchRec row-wise sharded tables vs DDP-replicated tables.

Run one configuration per launch, 1 or 2 processes (gloo on CPU):

    torchrun --nproc_per_node=2 bench/torchrec_scale.py --mode sharded    --items 2000000 --dim 64
    torchrun --nproc_per_node=2 bench/torchrec_scale.py --mode replicated --items 2000000 --dim 64
    python bench/torchrec_scale.py --mode sharded ...                     # one process

Both train the same DIN (PReLU, separate attention, fused op) on the synthetic click log with a
vocabulary of ``--items`` items for ``--steps`` steps of ``--batch-size`` samples per rank:

* sharded: din_fused.torchrec_din (EmbeddingCollection, row-wise shards, in-backward Adagrad);
* replicated: din_fused.model.DIN (nn.Embedding) in DistributedDataParallel with Adam, as
  ``python -m din_fused.train`` does: every rank holds every table, its gradient and Adam state.

Rank 0 prints one JSON line: per-rank peak RSS, local table bytes, samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from din_fused import data as D  # noqa: E402
from din_fused.model import DIN  # noqa: E402


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _table_bytes_sharded(dmp) -> int:
    from din_fused.torchrec_din import local_shards

    return sum(w.numel() * w.element_size() for pieces in local_shards(dmp).values() for _, w in pieces)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("sharded", "replicated"), required=True)
    p.add_argument("--items", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=256, help="per rank")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()

    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = D.make_synthetic(num_users=a.users, max_len=50, seed=0, num_items=a.items)
    train, _, _ = D.split_by_user(ds, 0.0, 0.2, 0)  # 80% of the users train, as before validation existed
    names = (ds.attr_names, ds.context_names)
    rss_data = _rss_mib()
    torch.manual_seed(0)
    if a.mode == "sharded":
        from din_fused import torchrec_din as TR

        model = TR.TorchRecDIN.from_dataset(ds, embedding_dim=a.dim, activation="prelu", device="meta")
        net, _ = TR.shard_model(model, torch.device("cpu"))
        TR.init_tables(net, model.table_names(), 0)
        dense = [q for n, q in net.named_parameters() if ".embeddings." not in n]
        opt = torch.optim.Adam(dense, lr=1e-3)
        table_bytes = _table_bytes_sharded(net)
        state_per_table_byte = 1  # exact Adagrad: one accumulator per weight

        def step(b):
            return net(TR.batch_to_kjt(b, *names))
    else:
        model = DIN(ds.attr_vocab, ds.context_vocab, a.dim, activation="prelu")
        net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        dense = list(model.parameters())
        opt = torch.optim.Adam(dense, lr=1e-3)
        table_bytes = sum(t.weight.numel() * t.weight.element_size() for t in model.embedding_tables())
        state_per_table_byte = 3  # dense gradient + Adam's two moments

        def step(b):
            return net(b.target, b.history, b.lengths, b.context)

    batches = D.iterate_batches(train, a.batch_size, shuffle=True, seed=1, rank=rank, world_size=world)
    t0, n = None, 0
    for i, b in enumerate(batches):
        if i == a.warmup:
            dist.barrier()
            t0, n = time.perf_counter(), 0
        if i >= a.warmup + a.steps:
            break
        loss = F.binary_cross_entropy_with_logits(step(b), b.label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += b.label.numel()
    dist.barrier()
    seconds = time.perf_counter() - t0
    mine = {"rank": rank, "peak_rss_mib": _rss_mib(), "rss_after_data_mib": rss_data,
            "table_mib": table_bytes / 2**20,
            "table_plus_state_mib": table_bytes * (1 + state_per_table_byte) / 2**20, "samples": n}
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        total = sum(e["samples"] for e in every)
        print(json.dumps({"mode": a.mode, "world_size": world, "items": a.items, "dim": a.dim,
                          "batch_per_rank": a.batch_size, "steps": a.steps,
                          "samples_per_second": total / seconds, "threads_per_rank": torch.get_num_threads(),
                          "ranks": every}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from din_fused.train import exit_past_process_group

    exit_past_process_group(0)  # (a torch bug at interpreter exit after gloo: see there)
