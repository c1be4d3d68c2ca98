"""torchvision ResNet: prune channels for real, fold BatchNorm, then 2:4 on what is left.

    python examples/resnet_channels_24.py [--tiny]

Prints the parameters before and after channel pruning, how much folding BatchNorm changed
the output (round-off only), how many layers became 2:4, and the relative error of the
2:4 model against the dense model with the same zeros (the check that the swap is exact).
"""
import argparse
import copy

import torch
import torchvision

import sparsekern
from sparsekern import simplify


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32) if a.tiny else torch.randn(8, 3, 224, 224)
    # BatchNorm statistics as a trained model has them (a fresh one's are mean 0, variance 1,
    # which any folding, right or wrong, leaves unchanged)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *x.shape[1:]) * 2 + 0.5)
    model.eval()
    before = sum(t.numel() for t in model.parameters())
    result = simplify.prune_channels(model, 0.5, x)
    print(f"channels removed in {sum('skipped' not in r for r in result['report'])} layers "
          f"(residual-tied layers left alone: {len(result['skipped'])}); "
          f"parameters {before} -> {sum(t.numel() for t in model.parameters())}")
    with torch.no_grad():
        y = model(x)
        folded = simplify.fold_batchnorm(model)
        change = ((model(x) - y).norm() / y.norm()).item()
    print(f"folded {len(folded)} BatchNorm layers; relative change of the output {change:.1e}")
    sparse, report = sparsekern.sparsify(copy.deepcopy(model), "2:4", min_features=32, show_progress=False)
    reference = copy.deepcopy(model)  # the folded model with the very same zeros
    reference.load_state_dict(sparsekern.dense_state_dict(sparse))
    with torch.no_grad():
        ys, yr = sparse(x).double(), reference(x).double()
    print(f"2:4 on {sum(r['status'] == 'sparse' for r in report)} of {len(report)} layers; output shape "
          f"{tuple(ys.shape)}; relative error against the dense model with the same zeros "
          f"{((ys - yr).norm() / yr.norm()).item():.1e}")
    return sparse


if __name__ == "__main__":
    main()
