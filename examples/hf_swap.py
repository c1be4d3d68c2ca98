"""Swap a Hugging Face model's Linear layers for sparse ones, check it, and time it against dense.

    python examples/hf_swap.py [--tiny]

The model is built from a config (random weights, no download). With --tiny it is small
enough for CI. Prints how many Linear layers were swapped and the fraction of their weights
kept, the relative error of the sparse model against the dense model with the same zeros
(the check that the swap is exact), and one short timing of each (noisy: the benchmarks in
bench/ time properly)."""
import argparse
import copy
import time

import torch
import transformers

import sparsekern


def timed(model, batch, reps):
    with torch.no_grad():
        model(**batch)
        t = time.perf_counter()
        for _ in range(reps):
            model(**batch)
    return (time.perf_counter() - t) / reps * 1e3


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2) if a.tiny else \
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12)
    dense = transformers.BertModel(transformers.BertConfig(vocab_size=1000, **size)).eval()
    batch = {"input_ids": torch.randint(0, 1000, (1, 32)), "attention_mask": torch.ones(1, 32, dtype=torch.long)}
    sparse, report = sparsekern.sparsify(copy.deepcopy(dense), "unstructured", sparsity=0.7, min_features=32,
                                         show_progress=False)
    swapped = [m for m in sparse.modules() if isinstance(m, sparsekern.nn.SparseLinear)]
    linears = sum(isinstance(m, torch.nn.Linear) for m in dense.modules())
    kept = sum(m.weight_format().density * m.in_features * m.out_features for m in swapped) / \
        max(1, sum(m.in_features * m.out_features for m in swapped))
    print(f"swapped {len(swapped)} of {linears} Linear layers (unstructured, kept {kept:.1%} of their weights)")
    reference = copy.deepcopy(dense)  # the dense model with the very same zeros
    reference.load_state_dict(sparsekern.dense_state_dict(sparse))
    with torch.no_grad():
        y, ref = sparse(**batch).last_hidden_state.double(), reference(**batch).last_hidden_state.double()
    print(f"relative error against the dense model with the same zeros: {((y - ref).norm() / ref.norm()).item():.1e}")
    print(f"dense {timed(dense, batch, 5):.2f} ms, sparse {timed(sparse, batch, 5):.2f} ms per forward "
          f"(one short run; see bench/ for measurements)")
    print(sparsekern.explain(sparse))
    return sparse


if __name__ == "__main__":
    main()
