"""Masked fine-tuning with DistributedDataParallel on the CPU (gloo, two processes).

    python examples/ddp_masked_finetune.py [--tiny] [--out model.pt]

Each rank trains on its own shard of a learnable task (labels from a fixed teacher
network); DDP averages the gradients, so the weights and the 2:4 masks stay identical on
every rank and the pruned weights stay zero. Prints the held-out loss before and after,
whether the ranks agree, the largest pruned weight after training (zero), and writes the
frozen model's state dict (compressed 2:4 tensors only) to --out (default: a temporary
folder, deleted), then reloads it and checks every group of 4 keeps at most 2 weights."""
import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sparsekern


def data(gen, n):
    """Inputs and the labels a fixed teacher gives them (the same teacher on every rank)."""
    teacher = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(64, 32, generator=teacher), torch.randn(32, 10, generator=teacher)
    x = torch.randn(n, 64, generator=gen)
    return x, (torch.tanh(x @ w1) @ w2).argmax(1)


def worker(rank, world, init, steps, out):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    model, _ = sparsekern.sparsify(model, "2:4", min_features=8, trainable=True, show_progress=False)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.0)
    x_test, y_test = data(torch.Generator().manual_seed(99), 512)

    def held_out_loss():
        with torch.no_grad():
            return nn.functional.cross_entropy(model(x_test), y_test).item()

    before = held_out_loss()
    gen = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        x, y = data(gen, 64)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    after = held_out_loss()
    layers = [m for m in model.modules() if isinstance(m, sparsekern.nn.SparseLinear)]
    pruned_max = max(float((m.weight * ~m.mask().reshape(m.weight.shape)).abs().max()) for m in layers)
    mine = torch.cat([torch.cat([m.weight.detach().flatten(), m.mask().flatten().float()]) for m in layers])
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    agree = all(torch.equal(everyone[0], t) for t in everyone)
    model.eval()
    for m in layers:
        m.freeze()
    if rank == 0:
        print(f"held-out loss {before:.3f} -> {after:.3f} after {steps} steps on {world} ranks")
        print(f"ranks agree on weights and masks: {agree}; largest pruned weight after training: {pruned_max:.1e}")
        torch.save(model.state_dict(), out)
        print(sparsekern.explain(model))
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", default=None, help="where to write the frozen state dict (default: a temporary folder)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.abspath(a.out) if a.out else os.path.join(d, "model.pt")
        mp.spawn(worker, args=(2, os.path.join(d, "init"), 30 if a.tiny else 300, out), nprocs=2, join=True)
        sd = torch.load(out, weights_only=True)
        # reload as a user would: the same architecture, sparsified, then the state dict
        torch.manual_seed(0)
        fresh = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        fresh, _ = sparsekern.sparsify(fresh, "2:4", min_features=8, show_progress=False)
        fresh.load_state_dict(sd)
        fresh.eval()
        x_test, y_test = data(torch.Generator().manual_seed(99), 512)
        with torch.no_grad():
            loss = nn.functional.cross_entropy(fresh(x_test), y_test).item()
        groups_ok = all(bool(((m.mask().reshape(m.out_features, -1, 4)).sum(-1) <= 2).all())
                        for m in fresh.modules() if isinstance(m, sparsekern.nn.SparseLinear))
        print(f"wrote {out if a.out else 'a temporary file'}: {len(sd)} tensors, layer 0 stored as "
              f"{sorted(k for k in sd if k.startswith('0.'))}")
        print(f"reloaded: held-out loss {loss:.3f}; every group of 4 keeps at most 2: {groups_ok}")


if __name__ == "__main__":
    main()
