"""Shapes and helpers shared by the sparse-linear op tests."""
import torch

import sparsekern.reference as reference

# (leading shape of x, in_features, out_features): batch 1, odd batches, the direct
# kernels' batch limits (4, 8, 16) and beyond (GEMM path), K not a multiple of 64,
# 3-D inputs, an empty batch.
SHAPES = [
    ((1,), 64, 32),
    ((3,), 200, 67),
    ((5,), 96, 40),
    ((8,), 128, 33),
    ((16,), 72, 16),
    ((17,), 48, 64),
    ((2, 3), 80, 24),
    ((1, 1, 1), 16, 8),
    ((0,), 32, 16),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def lowp_torch_linear(x, dense_w, bias):
    """torch's own linear on the same low-precision tensors (the error yardstick)."""
    return torch.nn.functional.linear(x, dense_w, bias)


def ref64(x, dense_w, bias):
    return torch.nn.functional.linear(x.double(), dense_w.double(), None if bias is None else bias.double())


def random_nm_mask(shape, n, m):
    return reference.nm_mask(torch.rand(shape), n, m)
