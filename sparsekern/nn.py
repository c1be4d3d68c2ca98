"""Sparse modules: SparseLinear and SparseConv2d.

A sparse module stores its weight compressed (an NMWeight, BitmaskWeight or BlockWeight
as buffers named `weight_<tensor>` plus an int64 `weight_meta`) and runs the sparse ops.
Its backend is chosen once, when it is built or frozen, from measured timings on the
layer's device, dtype and shape (`sparsekern.nn.autotune`): when no sparse kernel beats
the dense one for that shape, the layer keeps a plain dense weight with the zeros in
place (backend "dense") rather than run slower than the original.

Training: `from_dense(..., trainable=True)` keeps a dense `weight` Parameter plus the
packed bitmask of its mask (`weight_mask_bits`). In training mode the forward is the
masked-matmul op (gradients to the weight masked, to the input exact), so any optimizer
fine-tunes it and the zeros stay zero; in eval mode it runs a compressed copy rebuilt
whenever the weight changed. `freeze()` drops the dense weight for good.

Layouts of the compressed tensors: sparsekern/formats.py.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from . import formats, ops, prune
from .patterns import KIND_CODES, KIND_OF_CODE, as_2d, from_2d, pack_bitmask, parse_pattern, unpack_bitmask


# ---------------------------------------------------------------------------- patterns
def _pattern_mask(weight: torch.Tensor, kind: str, params: dict, scores: torch.Tensor, sparsity, block):
    if kind == "nm":
        return prune.nm_mask(scores, params["n"], params["m"])
    if kind == "unstructured":
        if sparsity is None:
            raise ValueError("pattern 'unstructured' needs sparsity= (fraction of weights to remove)")
        return prune.unstructured_mask(scores, sparsity)
    if kind == "block":
        if sparsity is None:
            raise ValueError("pattern 'block' needs sparsity= (fraction of blocks to remove)")
        return prune.block_mask(scores, params.get("block", block), sparsity)
    return torch.ones_like(weight, dtype=torch.bool)


def _check_mask_fits(pattern: str, mask: torch.Tensor) -> None:
    """A mask (2-D view) that the pattern cannot hold is refused with a clear error."""
    kind, params = parse_pattern(pattern)
    if kind == "nm":
        n, m = params["n"], params["m"]
        if mask.shape[1] % m or bool((mask.reshape(mask.shape[0], -1, m).sum(-1) > n).any()):
            raise ValueError(f"mask does not fit pattern {pattern!r}: some group of {m} inputs keeps more than {n}")


# -------------------------------------------------------------------------- autotune
_TIMINGS: dict[tuple, float] = {}


def _time(fn, reps: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def autotune(dense_fn, sparse_fn, key: tuple, reps: int = 5) -> tuple[bool, str]:
    """Time the dense and sparse forward of a layer once per key (device, dtype, pattern,
    shape, batch) and cache it. Returns (use_sparse, reason)."""
    if key not in _TIMINGS:
        _TIMINGS[key] = (_time(dense_fn, reps), _time(sparse_fn, reps))
    td, ts = _TIMINGS[key]
    win = td / ts
    return win > 1.0, f"measured {win:.2f}x vs dense ({ts * 1e3:.3f} ms vs {td * 1e3:.3f} ms at batch {key[-1]})"


class Policy:
    """How sparse modules choose a backend.

    backend: "auto" (measure; dense when sparse does not win), "sparse" (always the sparse
    kernel), "dense" (always dense). batch: the batch (rows of x, images for convolutions)
    to measure at; image: the input height and width convolutions are measured at.
    """

    def __init__(self, backend: str = "auto", batch: int = 8, image: int = 16):
        if backend not in ("auto", "sparse", "dense"):
            raise ValueError(f"Policy: backend must be 'auto', 'sparse' or 'dense', got {backend!r}")
        if batch < 1:
            raise ValueError(f"Policy: batch must be >= 1, got {batch}")
        if image < 1:
            raise ValueError(f"Policy: image must be >= 1, got {image}")
        self.backend, self.batch, self.image = backend, batch, image


DEFAULT_POLICY = Policy()


# ---------------------------------------------------------------------------- modules
class _SparseMixin:
    """State shared by SparseLinear and SparseConv2d: compressed buffers, backend, modes."""

    pattern: str
    backend: str
    reason: str

    def _set_format(self, fmt) -> None:
        for name in list(self._buffers):
            if name.startswith("weight_") and name != "weight_mask_bits":
                del self._buffers[name]
        if isinstance(fmt, torch.Tensor):  # dense with zeros in place
            self.register_buffer("weight_dense", fmt)
            self.register_buffer("weight_meta", torch.tensor([KIND_CODES["dense"]], dtype=torch.int64))
            self._meta_ints = [KIND_CODES["dense"]]
            return
        for k, t in fmt.tensors().items():
            if k != "meta":
                self.register_buffer("weight_" + k, t)
        self.register_buffer("weight_meta", torch.cat([torch.tensor([KIND_CODES[fmt.KIND]]), fmt.meta()]))
        # Python ints mirror the meta buffer so forward never reads a tensor (torch.compile).
        self._meta_ints = self.weight_meta.tolist()

    def weight_format(self):
        """The compressed weight (format object over this module's buffers), or the dense
        weight tensor when the backend is dense."""
        code = self._meta_ints[0]
        if code == KIND_CODES["dense"]:
            return self.weight_dense
        cls = formats.FORMAT_OF_CODE[code]
        tensors = {k: self._buffers["weight_" + k] for k in cls.TENSOR_NAMES}
        if torch.compiler.is_compiling():
            return cls.from_tensors(tensors, validate=False, meta_ints=self._meta_ints[1:])
        # One format object per set of buffers (they are replaced, never mutated, by .to(),
        # load_state_dict and freeze), so a decode step does not rebuild it. Validated when
        # built or loaded (_load_from_state_dict), so not again here.
        key = tuple(map(id, tensors.values()))
        cached = self.__dict__.get("_format_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_format_cache"] = (
                key, cls.from_tensors(tensors, validate=False, meta_ints=self._meta_ints[1:]))
        return cached[1]

    @property
    def trainable(self) -> bool:
        return "weight" in self._parameters and self._parameters["weight"] is not None

    def mask(self) -> torch.Tensor:
        """bool mask of the weight's 2-D view (True = kept)."""
        if self.trainable:
            return unpack_bitmask(self.weight_mask_bits, self.weight_mask_bits.shape[1] * 64)[
                :, : self._in2d]
        f = self.weight_format()
        return as_2d(f != 0) if isinstance(f, torch.Tensor) else f.mask()

    def dense_weight_2d(self) -> torch.Tensor:
        if self.trainable:
            return self.weight * self.mask().to(self.weight.dtype)
        f = self.weight_format()
        return as_2d(f) if isinstance(f, torch.Tensor) else f.to_dense()

    def _adopt_format(self, fmt, policy: Policy) -> None:
        """Stores `fmt` (a format object, or a masked dense tensor for pattern 'dense') or
        the dense weight when the policy picks dense, and records the backend and why."""
        kind = parse_pattern(self.pattern).kind
        if isinstance(fmt, torch.Tensor) or policy.backend == "dense":
            dense = fmt if isinstance(fmt, torch.Tensor) else fmt.to_dense()
            self._set_format(dense)
            self.backend, self.reason = "dense", "pattern 'dense'" if kind == "dense" else "forced by policy"
            return
        backend = self._sparse_backend(fmt, policy.batch)
        if policy.backend == "sparse":
            self._set_format(fmt)
            self.backend, self.reason = backend, "forced by policy"
            return
        dense = fmt.to_dense()
        dense_fn, sparse_fn, key = self._timing_pair(fmt, dense, policy)
        use, why = autotune(dense_fn, sparse_fn, (str(dense.device), str(dense.dtype), fmt.pattern,
                                                  round(fmt.density, 2)) + key)
        self._set_format(fmt if use else dense)
        self.backend, self.reason = (backend if use else "dense"), why

    def freeze(self, policy: Policy | None = None):
        """Drop the dense training weight; keep only the compressed (or chosen) weight."""
        if self.trainable:
            w2d, mask = self.weight.detach(), self.mask()
            del self._parameters["weight"]
            del self._buffers["weight_mask_bits"]
            self._adopt_format(self._build_format(w2d, mask), policy or DEFAULT_POLICY)
        return self

    def _build_format(self, w2d: torch.Tensor, mask: torch.Tensor):
        """The pattern's format object for a 2-D weight and mask (a masked dense tensor for
        pattern 'dense')."""
        return formats.compress(w2d, self.pattern, mask, self._block)

    def _sparse_backend(self, fmt, batch: int) -> str:
        """The backend the format's op runs for `batch` rows of input on this layer."""
        x = torch.empty(batch, self._in2d, device=fmt.device, dtype=fmt.dtype)
        return ops.backend_for(fmt.OP, x, fmt)

    def _packed(self):
        """Compressed copy for eval mode of a trainable module, rebuilt when the weight changed."""
        version = (self.weight._version, self.weight.data_ptr(), self.weight.dtype, self.weight.device)
        if getattr(self, "_packed_version", None) != version:
            self._packed_fmt = self._build_format(self.weight.detach(), self.mask())
            self._packed_version = version
        return self._packed_fmt

    def _linear2d(self, x2: torch.Tensor, bias):
        """x2 [..., in2d] through the weight, whatever the mode."""
        if self.trainable and self.training:
            return ops.masked_linear(x2, self.weight, self.weight_mask_bits, bias)
        f = self._packed() if self.trainable else self.weight_format()
        if isinstance(f, torch.Tensor):
            return torch.nn.functional.linear(x2, f, bias)
        return ops.sparse_linear(x2, f, bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Compressed buffers change size with the data: adopt the saved tensors, check them.
        meta_key = prefix + "weight_meta"
        if meta_key in state_dict and not self.trainable:
            saved = state_dict[meta_key]
            kind = KIND_OF_CODE.get(int(saved[0]))
            mine = KIND_OF_CODE[self._meta_ints[0]]
            expect, _ = parse_pattern(self.pattern)
            if kind is None or (kind != mine and kind != "dense" and mine != "dense") or \
                    (kind not in ("dense", expect)):
                errors.append(f"{type(self).__name__} {prefix[:-1] or '<root>'}: state dict holds a weight of kind '{kind}' "
                              f"but this layer's pattern is {self.pattern!r}")
                return
            names = [k for k in state_dict if k.startswith(prefix + "weight_") and k != prefix + "weight_mask_bits"]
            for k in list(self._buffers):
                if k.startswith("weight_") and k != "weight_mask_bits":
                    del self._buffers[k]
            dev = saved.device if self.bias is None else self.bias.device
            for k in names:
                self.register_buffer(k[len(prefix):], state_dict[k].detach().clone().to(dev))
            self._meta_ints = self.weight_meta.tolist()
            f = self.weight_format()
            if not isinstance(f, torch.Tensor):
                try:
                    f.validate()
                except ValueError as e:
                    errors.append(f"{prefix[:-1]}: {e}")
            self.backend = "dense" if kind == "dense" else self._sparse_backend(f, DEFAULT_POLICY.batch)
            self.reason = "loaded from a state dict"
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def _init_weight(self, w2d, mask, trainable, policy):
        _check_mask_fits(self.pattern, mask)
        if trainable:
            for name in list(self._buffers):
                if name.startswith("weight_"):
                    del self._buffers[name]
            self.weight = nn.Parameter((w2d * mask).clone().reshape(self._weight_shape()))
            self.register_buffer("weight_mask_bits", pack_bitmask(mask))
            self.backend, self.reason = "masked", "trainable: masked_linear in training mode"
        else:
            self._adopt_format(self._build_format(w2d.detach(), mask), policy or DEFAULT_POLICY)

    def _repr_sparse(self) -> str:
        if self.trainable:
            bits = self.weight_mask_bits
            density = float(self.mask().float().mean())
            return f"pattern={self.pattern}, density={density:.3f}, backend=masked (training), " \
                   f"bytes={self.weight.numel() * self.weight.element_size() + bits.numel() * 8}"
        f = self.weight_format()
        nbytes = f.numel() * f.element_size() if isinstance(f, torch.Tensor) else f.nbytes
        density = float((f != 0).float().mean()) if isinstance(f, torch.Tensor) else f.density
        return f"pattern={self.pattern}, density={density:.3f}, backend={self.backend}, compressed_bytes={nbytes}"


class SparseLinear(_SparseMixin, nn.Module):
    """nn.Linear with a compressed weight. Build with `SparseLinear.from_dense(linear, ...)`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, pattern: str = "2:4",
                 block: tuple[int, int] = (32, 32), device=None, dtype=None):
        super().__init__()
        parse_pattern(pattern, "SparseLinear")
        self.in_features, self.out_features, self.pattern, self._block = in_features, out_features, pattern, block
        self._in2d = in_features
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        # An empty placeholder of the right pattern; from_dense or load_state_dict fills it.
        self._set_format(torch.zeros(out_features, in_features, device=device, dtype=dtype))
        self.backend, self.reason = "dense", "not built from a weight yet"

    def _timing_pair(self, fmt, dense, policy):
        """(dense forward, sparse forward, key) at the policy's batch, for autotune."""
        x = torch.randn(policy.batch, self.in_features, device=dense.device, dtype=dense.dtype)
        return (lambda: torch.nn.functional.linear(x, dense), lambda: ops.sparse_linear(x, fmt),
                ("linear", tuple(dense.shape), policy.batch))

    @classmethod
    def from_format(cls, weight, bias: torch.Tensor | None = None, policy: Policy | None = None) -> "SparseLinear":
        """A SparseLinear over an already compressed weight (NMWeight, BitmaskWeight or
        BlockWeight of shape [out, in]), e.g. one shard of a larger layer."""
        if getattr(weight, "OP", None) not in ("nm_linear", "bitmask_linear", "block_linear"):
            raise TypeError(f"SparseLinear.from_format: weight must be a sparsekern format, got {type(weight).__name__}")
        weight.validate()
        out, k = weight.shape
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (out,)):
            raise ValueError(f"SparseLinear.from_format: bias must have shape ({out},)")
        block = tuple(weight.block) if weight.KIND == "block" else (32, 32)
        mod = cls(k, out, bias is not None, weight.pattern, block, device=weight.device, dtype=weight.dtype)
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        mod._adopt_format(weight, policy or DEFAULT_POLICY)
        return mod

    @classmethod
    def from_dense(cls, linear: nn.Linear, pattern: str = "2:4", mask: torch.Tensor | None = None,
                   method: str = "l1", sparsity: float | None = None, block: tuple[int, int] = (32, 32),
                   trainable: bool = False, policy: Policy | None = None, grad=None, act_norm=None) -> "SparseLinear":
        """Prune (unless `mask` is given) and compress `linear`'s weight."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense: expected nn.Linear, got {type(linear).__name__}")
        kind, params = parse_pattern(pattern, "SparseLinear.from_dense")
        w = linear.weight.detach()
        if mask is None:
            if hasattr(linear, "weight_mask"):
                mask = linear.weight_mask.bool()
            else:
                scores = prune.score(w, method, grad=grad, act_norm=act_norm)
                mask = _pattern_mask(w, kind, params, scores, sparsity, block)
        elif mask.shape != w.shape or mask.dtype != torch.bool:
            raise ValueError(f"SparseLinear.from_dense: mask must be bool of shape {tuple(w.shape)}")
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, pattern, block,
                  device=w.device, dtype=w.dtype)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        mod._init_weight(w, mask, trainable, policy)
        return mod

    def _weight_shape(self):
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear2d(x, self.bias)

    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear with the zeros in place."""
        w = self.dense_weight_2d()
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._repr_sparse()}"


class SparseConv2d(_SparseMixin, nn.Module):
    """nn.Conv2d with a compressed weight, run as im2col + the sparse linear kernels.

    The weight's 2-D view is [out, kh*kw*in] with input channels fastest, so N:M groups
    run along input channels at each kernel position. groups must be 1 and padding_mode
    'zeros' (other settings are refused at from_dense; sparsify leaves them dense).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True,
                 pattern: str = "2:4", block=(32, 32), device=None, dtype=None):
        super().__init__()
        parse_pattern(pattern, "SparseConv2d")
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = (pair(kernel_size), pair(stride), pair(padding),
                                                                       pair(dilation))
        self.pattern, self._block = pattern, block
        self._in2d = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None
        self._set_format(torch.zeros(out_channels, self._in2d, device=device, dtype=dtype))
        self.backend, self.reason = "dense", "not built from a weight yet"

    @staticmethod
    def check_supported(conv: nn.Conv2d, pattern: str) -> None:
        where = "SparseConv2d.from_dense"
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{where}: expected nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"{where}: groups={conv.groups} (grouped/depthwise convolution) is not supported")
        if conv.padding_mode != "zeros":
            raise ValueError(f"{where}: padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        if isinstance(conv.padding, str):
            raise ValueError(f"{where}: padding={conv.padding!r} strings are not supported; give ints")
        kind, params = parse_pattern(pattern, where)
        if kind == "nm" and conv.in_channels % params["m"]:
            raise ValueError(f"{where}: in_channels={conv.in_channels} is not divisible by m={params['m']} "
                             f"(N:M groups run along input channels)")

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, pattern: str = "2:4", mask: torch.Tensor | None = None, method: str = "l1",
                   sparsity: float | None = None, block=(32, 32), trainable: bool = False,
                   policy: Policy | None = None, grad=None, act_norm=None) -> "SparseConv2d":
        cls.check_supported(conv, pattern)
        kind, params = parse_pattern(pattern)
        w = conv.weight.detach()
        if mask is None:
            if hasattr(conv, "weight_mask"):
                mask = conv.weight_mask.bool()
            else:
                mask = _pattern_mask(w, kind, params, prune.score(w, method, grad=grad, act_norm=act_norm), sparsity,
                                     block)
        elif mask.shape != w.shape or mask.dtype != torch.bool:
            raise ValueError(f"SparseConv2d.from_dense: mask must be bool of shape {tuple(w.shape)}")
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.bias is not None, pattern, block, device=w.device, dtype=w.dtype)
        if conv.bias is not None:
            mod.bias.data.copy_(conv.bias.detach())
        w2d, m2d = as_2d(w), as_2d(mask)
        mod._init_weight(w2d, m2d, trainable, policy)
        return mod

    def _weight_shape(self):
        return (self.out_channels, self._in2d)

    def _timing_pair(self, fmt, dense, policy):
        """The real comparison for a convolution: the dense original (cuDNN / oneDNN) against
        im2col + the sparse kernel, on policy.batch images of policy.image x policy.image."""
        x = torch.randn(policy.batch, self.in_channels, policy.image, policy.image, device=dense.device,
                        dtype=dense.dtype)
        w4 = from_2d(dense, (self.out_channels, self.in_channels, *self.kernel_size))
        return (lambda: torch.nn.functional.conv2d(x, w4, None, self.stride, self.padding, self.dilation),
                lambda: self._conv(x, lambda c: ops.sparse_linear(c, fmt)),
                ("conv", tuple(w4.shape), self.stride, self.padding, self.dilation, policy.batch, policy.image))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d: expected input [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if self.trainable and self.training:
            # Masked fine-tuning: the dense convolution of W*M (autograd masks the weight's
            # gradient through the product), which is what oneDNN/cuDNN run fastest.
            w4 = self._to4d(self.weight * self.mask().to(self.weight.dtype))
            return self._dense_conv(x, w4)
        f = None if self.trainable else self.weight_format()
        if isinstance(f, torch.Tensor):  # backend "dense": the original convolution
            return self._dense_conv(x, f)
        return self._conv(x, lambda cols: self._linear2d(cols, self.bias))

    def _to4d(self, w2d: torch.Tensor) -> torch.Tensor:
        return from_2d(w2d, (self.out_channels, self.in_channels, *self.kernel_size))

    def _dense_conv(self, x, w4):
        return torch.nn.functional.conv2d(x, w4, self.bias, self.stride, self.padding, self.dilation)

    def _set_format(self, fmt) -> None:
        # A dense weight is kept in nn.Conv2d's own layout so the dense path is the plain conv.
        if isinstance(fmt, torch.Tensor) and fmt.dim() == 2:
            fmt = self._to4d(fmt)
        super()._set_format(fmt)

    def _conv(self, x: torch.Tensor, linear2d) -> torch.Tensor:
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = torch.nn.functional.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        # [N, C*kh*kw, L] (C slowest) -> [N*L, kh*kw*C] (C fastest), the weight's 2-D layout
        cols = cols.reshape(n, self.in_channels, kh * kw, -1).permute(0, 3, 2, 1).reshape(-1, self._in2d)
        y = linear2d(cols)
        return y.reshape(n, oh, ow, self.out_channels).permute(0, 3, 1, 2)

    def to_dense(self) -> nn.Conv2d:
        w = from_2d(self.dense_weight_2d(), (self.out_channels, self.in_channels, *self.kernel_size))
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, {self._repr_sparse()}")


SPARSE_MODULES = (SparseLinear, SparseConv2d)
