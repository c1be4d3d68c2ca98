"""SparseGPT: one-shot pruning with reconstruction (Frantar & Alistarh, 2023).

Per layer, with H = X^T X over the layer's calibration inputs X (accumulated by the
compiled `hessian_accumulate` op, in float64): dampen H's diagonal, take the upper
Cholesky factor of H^-1, and walk the input columns in blocks; each column's pruned
weights are zeroed and the error they leave, divided by the factor's diagonal, is pushed
onto the columns not yet visited (the optimal-brain-surgeon update), so the layer's output
on the calibration data changes as little as possible. Masks are chosen on the way:
unstructured (a fraction per column block, by w^2 / [H^-1]_jj^2), N:M (the m-n smallest of
each group as the group is reached) or whole blocks (bh x bw).

Sequential calibration (`sparsegpt_prune_model`): layers are pruned in forward order and
each one's Hessian comes from a fresh forward pass over the calibration batches through
the already-pruned earlier layers, stopped right after the layer's input is seen. Only one
layer's Hessian (and the activations of one batch) is held at a time. The masks are
recorded like torch.nn.utils.prune's (`prune.apply_mask`), so `sparsekern.from_torch_prune`
or `prune.remove` take it from there.

Reconstruction sits above pruning: this module uses ops, patterns and prune, never the
sparse modules (`sparsekern.sparsify(method="sparsegpt")` calls it).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from . import kinds, ops, precisions
from .patterns import as_2d, from_2d
from .prune import apply_mask, prunable_layers, prune_count, run_batch


class _StopForward(Exception):
    pass


def _iter_batches(calibration):
    batches = calibration() if callable(calibration) else calibration
    if batches is None:
        raise ValueError("sparsegpt: calibration data is required")
    return batches


def layer_inputs_hessian(model: nn.Module, layer: nn.Module, calibration, cols2d: Callable | None = None,
                         dtype=torch.float64) -> tuple[torch.Tensor, int]:
    """H = X^T X of `layer`'s inputs over the calibration batches (one forward each,
    stopped after the layer's input is seen). cols2d maps the input to [rows, K]."""
    H = None
    count = 0

    def hook(mod, inputs):
        nonlocal H, count
        x = inputs[0].detach()
        x2 = cols2d(x) if cols2d is not None else x.reshape(-1, x.shape[-1])
        if H is None:
            H = torch.zeros(x2.shape[1], x2.shape[1], dtype=dtype, device=x2.device)
        ops.hessian_accumulate(H, x2)
        count += x2.shape[0]
        raise _StopForward

    h = layer.register_forward_pre_hook(hook)
    seen = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(_iter_batches(calibration)):
                seen += 1
                try:
                    run_batch(model, batch)
                except _StopForward:
                    pass
                except Exception as e:  # noqa: BLE001 - say which batch and layer, keep the cause
                    raise ValueError(f"sparsegpt: the model cannot take calibration batch {i} "
                                     f"({type(e).__name__}: {e})") from e
    finally:
        h.remove()
    if seen == 0:
        raise ValueError("sparsegpt: the calibration set is empty")
    if H is None:
        raise ValueError("sparsegpt: the calibration batches never reached this layer")
    return H, count


def sparsegpt_weight(weight2d: torch.Tensor, hessian: torch.Tensor, pattern: str = "unstructured",
                     sparsity: float = 0.5, blocksize: int = 128, percdamp: float = 0.01,
                     block: tuple[int, int] = (32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune and compensate one weight [out, in] given H [in, in]. Returns (new weight in
    the weight's dtype with zeros in place, bool mask)."""
    new, mask, _ = sparsegpt_quantized_weight(weight2d, hessian, pattern, sparsity, blocksize, percdamp, block)
    return new, mask


class _Quantizer:
    """SparseGPT's joint quantization (paper section 3.5): every weight the sweep freezes is
    also put on the grid the format will store (sparsekern/precisions.py), so the error that
    the optimal-brain-surgeon update pushes onto later columns includes the rounding, and
    later mask decisions see it. The scales are fixed as the sweep reaches them and handed
    to the format (`_Format.quantize(scales=...)`), so the stored values are exactly the ones
    compensated for:
      int8: one scale per row, max|w| / 127 of the row before the sweep;
      int4 (N:M only): one scale per group of group_size kept values of a row; with N:M
            such a group is a fixed run of group_size * m / n columns, and its scale is
            max|w| / 7 over that run's weights when the sweep reaches its first column
            (the most current weights, as GPTQ does)."""

    def __init__(self, precision: str, group_size: int, W: torch.Tensor, entry, params: dict, where: str):
        self.prec = precisions.precision(precision, where)
        self.group_size = self.prec.check_group_size(group_size if self.prec.grouped else 0, where)
        rows, cols = W.shape
        if self.prec.grouped:
            if not entry.format or not entry.format.ROW_VALUES:
                raise ValueError(f"{where}: {self.prec.name} needs a format with values by row (N:M), got pattern "
                                 f"kind {entry.name!r}")
            if self.group_size % params["n"]:
                raise ValueError(f"{where}: group_size {self.group_size} must be a multiple of n={params['n']} so a "
                                 "group of kept values is a whole number of N:M groups")
            self.span = self.group_size // params["n"] * params["m"]  # columns of one group of kept values
            self.scales = torch.ones(rows, -(-cols // self.span), dtype=torch.float32, device=W.device)
        else:
            self.span = 0
            self.scales = precisions.scale_for(W.abs().amax(1), self.prec.qmax)

    def start_column(self, j: int, W1: torch.Tensor, i: int) -> None:
        """At global column j (local i of the current block W1): fix the group's scale."""
        if self.span and j % self.span == 0:
            # Column blocks are whole runs (sparsegpt_quantized_weight), so W1 holds the run
            # with every update the sweep has made so far.
            self.scales[:, j // self.span] = precisions.scale_for(W1[:, i:i + self.span].abs().amax(1), self.prec.qmax)

    def __call__(self, w: torch.Tensor, j: int) -> torch.Tensor:
        """Column j's weights w on the grid (float64)."""
        # float32 scales, as the format stores them, so the grids agree bit for bit
        s = (self.scales[:, j // self.span] if self.span else self.scales).to(torch.float64)
        return torch.round(w / s).clamp(-self.prec.qmax, self.prec.qmax) * s

    def stored_scales(self) -> torch.Tensor:
        return self.scales


def sparsegpt_quantized_weight(weight2d: torch.Tensor, hessian: torch.Tensor, pattern: str = "unstructured",
                               sparsity: float = 0.5, blocksize: int = 128, percdamp: float = 0.01,
                               block: tuple[int, int] = (32, 32), quantize: str | None = None,
                               group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """sparsegpt_weight with the kept weights quantized inside the sweep (`quantize`: "int8",
    "int4" with group_size 32/64/128 for N:M; None: pruning only). Returns (new weight in
    the weight's dtype, on the grid, zeros in place; bool mask; the float32 scales to store
    with it, or None), so that `kinds.compress(new, pattern, mask, quantize=quantize,
    group_size=group_size, scales=scales)` stores exactly the compensated values."""
    kind, params = kinds.parse(pattern, "sparsegpt")
    entry = kinds.KINDS[kind]
    if not entry.prunable:
        raise ValueError(f"sparsegpt: pattern {pattern!r} is not prunable")
    rows, cols = weight2d.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"sparsegpt: hessian must be [{cols}, {cols}], got {tuple(hessian.shape)}")
    entry.check_shape(rows, cols, params, block, "sparsegpt")
    if entry.needs_sparsity:
        prune_count(float(sparsity), 1, "sparsegpt")
    W = weight2d.detach().to(torch.float64).clone()
    H = hessian.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    # Dead inputs (never nonzero in the calibration data) get a unit diagonal and their weights
    # are dropped (they never contributed); a Hessian that is still not positive definite
    # after dampening is retried with 10x and 100x the dampening (documented fallback).
    mean_diag = torch.mean(torch.diag(H))
    for damp in (percdamp, percdamp * 10, percdamp * 100):
        L, info = torch.linalg.cholesky_ex(H + torch.eye(cols, dtype=H.dtype, device=H.device) * (damp * mean_diag))
        if int(info) == 0:
            break
    else:
        raise ValueError("sparsegpt: the Hessian is not positive definite even with 100x dampening "
                         "(calibration data too small or degenerate for this layer)")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    quant = None if quantize is None else _Quantizer(quantize, group_size, W, entry, params, "sparsegpt")
    pruned = torch.zeros_like(W, dtype=torch.bool)
    group = entry.sparsegpt_group(params, block)  # column blocks never cut a mask decision
    if quant is not None and quant.span:
        group = quant.span  # nor a run of int4 columns (a multiple of the N:M group)
    blocksize = max(group, blocksize // group * group)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            entry.sparsegpt_select(W1, d1, i, mask1, params, sparsity, block)
            w = W1[:, i]
            d = Hinv1[i, i]
            if quant is not None:
                quant.start_column(i1 + i, W1, i)
                q = quant(w, i1 + i)
            else:
                q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    mask = ~pruned
    return (W * mask).to(weight2d.dtype), mask, None if quant is None else quant.stored_scales()


def sparsegpt_prune_model(model: nn.Module, calibration, pattern: str = "unstructured", sparsity=0.5,
                          layers: list[str] | None = None, blocksize: int = 128, percdamp: float = 0.01,
                          block: tuple[int, int] = (32, 32), show_progress: bool = True, quantize: str | None = None,
                          group_size: int = 0, scales_out: dict | None = None) -> dict[str, torch.Tensor]:
    """Prune the model's Linear/Conv2d layers (or `layers`) in forward order with SparseGPT,
    updating their weights in place and recording the masks like torch.nn.utils.prune.
    calibration: iterable of batches as the model's forward takes them (tensors, tuples,
    dicts such as tokenizer output) or a callable returning one. sparsity: a fraction, or
    {layer: fraction} (e.g. selection.allocate's per-layer amounts; layers not named are
    left alone). quantize / group_size: quantize the kept weights inside the sweep
    (sparsegpt_quantized_weight); each layer's weight is left on the grid and its scales
    are put in `scales_out[layer]` for the format that stores it. Returns {layer: mask}."""
    if quantize is not None and scales_out is None:
        raise ValueError("sparsegpt_prune_model: quantize needs scales_out= (a dict that receives each layer's "
                         "scales, to store the weights on the grid they were compensated on)")
    if isinstance(sparsity, dict):
        layers = [n for n in (layers or sparsity) if n in sparsity and sparsity[n] > 0]
    targets = dict(prunable_layers(model)) if layers is None else {n: model.get_submodule(n) for n in layers}
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: order.append(n) if n not in order else None)
             for n, m in targets.items()]
    try:
        with torch.no_grad():
            got = False
            for batch in _iter_batches(calibration):
                got = True
                try:
                    run_batch(model, batch)
                except Exception as e:  # noqa: BLE001
                    raise ValueError(f"sparsegpt: the model cannot take the calibration batches "
                                     f"({type(e).__name__}: {e})") from e
                break
            if not got:
                raise ValueError("sparsegpt: the calibration set is empty")
    finally:
        for h in hooks:
            h.remove()
    masks = {}
    for name in tqdm(order, "sparsegpt (layers)", disable=not show_progress, mininterval=1.0):
        mod = targets[name]
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1:
                continue
            def cols2d(x, mod=mod):  # im2col in the N:M layout (input channels fastest)
                c = nn.functional.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
                n_, _, l_ = c.shape
                kk = mod.kernel_size[0] * mod.kernel_size[1]
                return c.reshape(n_, mod.in_channels, kk, l_).permute(0, 3, 2, 1).reshape(n_ * l_, -1)
        else:
            cols2d = None
        amount = sparsity[name] if isinstance(sparsity, dict) else sparsity
        try:
            H, _ = layer_inputs_hessian(model, mod, calibration, cols2d)
            w2d = as_2d(mod.weight.detach())
            new2d, mask2d, scales = sparsegpt_quantized_weight(w2d, H, pattern, amount, blocksize, percdamp, block,
                                                               quantize, group_size)
        except ValueError as e:
            raise ValueError(f"sparsegpt: layer {name!r}: {e}") from e
        with torch.no_grad():
            target = mod.weight_orig if hasattr(mod, "weight_orig") else mod.weight
            target.copy_(from_2d(new2d, mod.weight.shape))
        mask = from_2d(mask2d, mod.weight.shape)
        apply_mask(mod, mask)
        masks[name] = mask
        if scales is not None:
            scales_out[name] = scales
        del H
    return masks
