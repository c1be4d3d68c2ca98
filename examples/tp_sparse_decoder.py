"""Tensor-parallel inference of a sparse Llama decoder, one process per device.

    torchrun --nproc_per_node 2 examples/tp_sparse_decoder.py [--tiny] [--pattern 2:4]

(`python examples/tp_sparse_decoder.py ...` starts torchrun itself, with 2 processes.)

On the CPU the ranks talk over gloo. On GPUs the same script runs with NCCL, one GPU per
process (`--device cuda`, e.g. torchrun --nproc_per_node 8 ... --device cuda): nothing
else changes, since the activations move through DTensor and the sparse kernels run on
each rank's shard of the compressed weights.

Every rank builds the same model (a Llama from a config, random weights), prunes its
decoder layers (sparsekern.sparsify) and computes the single-process answer; then the
plan shards attention q/k/v and MLP gate/up column-wise, o and down row-wise, with
sparsekern.parallel's styles through torch's own parallelize_module. The script decodes
a few tokens greedily with the sharded model, checks logits and tokens against the
single-process model, and prints how many compressed bytes each rank holds.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import parallelize_module
from transformers import LlamaConfig, LlamaForCausalLM

import sparsekern
from sparsekern.nn import Policy, SparseLinear
from sparsekern.parallel import ColwiseParallel, RowwiseParallel, check_plan


def plan(policy):
    col, row = ColwiseParallel(policy=policy), RowwiseParallel(policy=policy)
    return {"model.layers.*.self_attn.q_proj": col, "model.layers.*.self_attn.k_proj": col,
            "model.layers.*.self_attn.v_proj": col, "model.layers.*.self_attn.o_proj": row,
            "model.layers.*.mlp.gate_proj": col, "model.layers.*.mlp.up_proj": col,
            "model.layers.*.mlp.down_proj": row}


@torch.no_grad()
def greedy(model, ids, steps):
    """Greedy decoding without a cache: (first step's logits, generated ids)."""
    first = None
    for _ in range(steps):
        logits = model(ids).logits
        first = logits if first is None else first
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
    return first, ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a very small model (CI)")
    p.add_argument("--pattern", default="2:4", help="2:4, unstructured or block16 (default 2:4)")
    p.add_argument("--sparsity", type=float, default=0.7, help="for unstructured and block (default 0.7)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (gloo) or cuda (NCCL)")
    p.add_argument("--tokens", type=int, default=4, help="tokens to decode")
    a = p.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:  # not started by torchrun: start it, 2 processes
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)]
        os.execv(sys.executable, cmd)

    dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(a.device, int(os.environ.get("LOCAL_RANK", 0))) if a.device == "cuda" else torch.device("cpu")
    if a.device == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(a.device, (world,))

    size = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256) if a.tiny else \
        dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=128, **size)).eval().to(device)
    policy = Policy("sparse")
    kw = {} if ":" in a.pattern else {"sparsity": a.sparsity}
    sparsekern.sparsify(model, a.pattern, include="model.layers.*", min_features=64, policy=policy,
                        show_progress=False, **kw)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    full_bytes = sum(m.weight_format().nbytes for m in layers.values())
    ids = torch.randint(0, size["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(1)).to(device)
    ref_logits, ref_ids = greedy(model, ids, a.tokens)  # the single-process answer

    check_plan(model, plan(policy), world)  # clear errors before anything is sharded
    parallelize_module(model, mesh, plan(policy))
    logits, out_ids = greedy(model, ids, a.tokens)

    local = sum(m.weight_format().nbytes for m in layers.values())
    for r in range(world):
        if r == rank:
            print(f"rank {rank}/{world}: {len(layers)} sparse layers ({a.pattern}), {local} compressed bytes of "
                  f"{full_bytes} ({100 * local / full_bytes:.1f}%)", flush=True)
        dist.barrier()
    diff = (logits - ref_logits).abs().max()
    same = torch.equal(out_ids, ref_ids)
    ok = torch.tensor([int(bool(diff < 1e-4) and same)], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"decoded {a.tokens} tokens: {out_ids[0, ids.shape[1]:].tolist()}; max |logits TP - single| = "
              f"{float(diff):.2e}")
        print("tensor-parallel output matches the single-process model" if bool(ok) else
              "MISMATCH between the tensor-parallel and the single-process model", flush=True)
    # Both ranks leave together: gloo's transport threads can abort a rank (terminate called
    # without an active exception) whose peer tore its connections down first.
    dist.barrier()
    dist.destroy_process_group()
    if not bool(ok):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
