"""Masked fine-tuning with DistributedDataParallel on the CPU (gloo, two processes).

    python examples/ddp_masked_finetune.py [--tiny]

Each rank trains on its shard; gradients are averaged; the 2:4 masks stay identical on
every rank and the pruned weights stay zero."""
import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sparsekern


def worker(rank, world, init, steps, out):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    model, _ = sparsekern.sparsify(model, "2:4", min_features=8, trainable=True, show_progress=False)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        x, y = torch.randn(32, 64, generator=gen), torch.randint(0, 10, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    model.eval()
    for m in model.modules():
        if isinstance(m, sparsekern.nn.SparseLinear):
            m.freeze()
    if rank == 0:
        torch.save(model.state_dict(), out)
        print(sparsekern.explain(model))
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "model.pt")
        mp.spawn(worker, args=(2, os.path.join(d, "init"), 3 if a.tiny else 100, out), nprocs=2, join=True)
        sd = torch.load(out, weights_only=True)
        print(f"saved {len(sd)} tensors; first layer stored as {sorted(k for k in sd if k.startswith('0.'))}")


if __name__ == "__main__":
    main()
