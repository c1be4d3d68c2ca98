"""Data-parallel masked fine-tuning: DistributedDataParallel, gloo, two CPU processes.
Masks stay identical across ranks and the weights equal a single-process run on the
whole batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS, BATCH = 4, 8


def build():
    import sparsekern

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    model, _ = sparsekern.sparsify(model, "2:4", min_features=8, trainable=True, show_progress=False)
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2 * BATCH, 32, generator=g), torch.randn(2 * BATCH, 16, generator=g)) for _ in range(STEPS)]


def train(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = nn.parallel.DistributedDataParallel(build())
    shard = [(x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]) for x, y in data()]
    train(model, shard)
    torch.save({k: v for k, v in model.module.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_masks_identical_and_weights_match_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single = train(build(), data()).state_dict()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
        if k.endswith("weight_mask_bits"):
            assert torch.equal(r0[k], single[k])
        else:
            torch.testing.assert_close(r0[k], single[k], rtol=1e-5, atol=1e-6, msg=k)
    for name in ("0", "2"):
        w, bits = r0[f"{name}.weight"], r0[f"{name}.weight_mask_bits"]
        import sparsekern.reference as ref

        assert (w[~ref.unpack_bitmask(bits, w.shape[1])] == 0).all(), "pruned weights moved"
