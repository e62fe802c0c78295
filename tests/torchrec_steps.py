"""Helper for test_torchrec.py: a few training steps of the sharded TorchRec DIN, per-step losses as JSON.

python tests/torchrec_steps.py GLOBAL_BATCH OUT.json  (one process, or under torchrun)
The tables use SGD here, whose update is linear in the gradient, so that runs with different
process counts can be compared step by step.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from din_fused import data as D
from din_fused import torchrec_din as TR

STEPS = 8


def main() -> None:
    global_batch, out = int(sys.argv[1]), sys.argv[2]
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = D.make_synthetic(num_users=60, max_len=15, seed=2, num_items=500, num_categories=9)
    torch.manual_seed(0)
    model = TR.TorchRecDIN.from_dataset(ds, embedding_dim=8, activation="prelu", device="meta")
    dmp, _ = TR.shard_model(model, torch.device("cpu"), embedding_optimizer=torch.optim.SGD, embedding_lr=2.0)
    TR.init_tables(dmp, model.table_names(), 0)
    dense = [p for n, p in dmp.named_parameters() if ".embeddings." not in n]
    opt = torch.optim.SGD(dense, lr=0.5)
    losses = []
    batches = D.iterate_batches(ds, global_batch // world, shuffle=True, seed=4, rank=rank, world_size=world)
    for _, b in zip(range(STEPS), batches):
        loss = TR.train_step(dmp, opt, dense, TR.batch_to_kjt(b, ds.attr_names, ds.context_names), b.label)
        total = torch.stack([loss.double() * b.label.numel(), torch.tensor(float(b.label.numel()))])
        dist.all_reduce(total)
        losses.append((total[0] / total[1]).item())
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(losses, fh)
    # Every rank past its last collective before any tears the group down.  (The SIGABRT at exit
    # that CI once saw here is a torch bug at interpreter finalization: see
    # din_fused.train.exit_past_process_group, which the script ends with.)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from din_fused.train import exit_past_process_group

    exit_past_process_group(0)  # (a torch bug at interpreter exit after gloo: see there)
