"""torchvision ResNet: fold BatchNorm, prune channels for real, then 2:4 on what is left.

    python examples/resnet_channels_24.py [--tiny]
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
    before = sum(t.numel() for t in model.parameters())
    result = simplify.prune_channels(model, 0.5, x)
    print(f"channels removed in {sum('skipped' not in r for r in result['report'])} layers "
          f"(residual-tied layers left alone: {len(result['skipped'])}); "
          f"parameters {before} -> {sum(t.numel() for t in model.parameters())}")
    with torch.no_grad():
        y = model(x)
    simplify.fold_batchnorm(model)
    sparse, report = sparsekern.sparsify(copy.deepcopy(model), "2:4", min_features=32, show_progress=False)
    with torch.no_grad():
        print(f"2:4 on {sum(r['status'] == 'sparse' for r in report)} layers; output shape {tuple(sparse(x).shape)}, "
              f"channel-pruned output shape {tuple(y.shape)}")
    return sparse


if __name__ == "__main__":
    main()
