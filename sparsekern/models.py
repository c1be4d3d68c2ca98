"""Models the demo and the benchmark suite build (no downloads), the digits data and
training they share, and the byte counts both report.

- `digits_mlp`, `digits_cnn`: small classifiers for 8x8 digit images; `digits()` loads
  scikit-learn's digits, `train`/`trained` fit them (cached in $SPARSEKERN_CACHE or
  ~/.cache/sparsekern), `accuracy` scores them;
- `LlamaStyle`: a Llama-style decoder (RMSNorm, rotary attention with a KV cache, SwiGLU);
- `ViT`: a small vision transformer with nn.Linear projections (as timm's);
- real models as users build them, no weights downloaded: `hf_llama` (Hugging Face
  LlamaForCausalLM from a config), `timm_vit` (timm ViT), `tv_resnet` (torchvision ResNet);
- `Workload` and the jobs the model-level benchmarks time: `llama_workloads` (decode with a
  KV cache, prefill) and `image_workload`;
- `param_bytes`, `checkpoint_bytes`: bytes of the weights as stored (parameters, buffers and
  torch's packed quantized weights: `tensor_bytes`, `quantized_linear_bytes`), and of a
  saved state dict;
  `held_bytes`: what sparse modules keep beside them (derived indexes, dense copies).

Imports nothing from sparsekern.
"""
from __future__ import annotations

import io
import os

import torch
from torch import nn
from tqdm import tqdm

F = nn.functional


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x, pos):
    d = x.shape[-1] // 2
    inv = 1.0 / (10000 ** (torch.arange(d, device=x.device, dtype=torch.float32) / d))
    ang = pos[:, None].float() * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.v_proj, self.o_proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x, pos, cache=None):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotary(q, pos), rotary(k, pos)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=(t > 1))
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(dim), Attention(dim, heads)
        self.mlp_norm, self.mlp = RMSNorm(dim), MLP(dim, hidden)

    def forward(self, x, pos, cache=None):
        x = x + self.attn(self.attn_norm(x), pos, cache)
        return x + self.mlp(self.mlp_norm(x))


class LlamaStyle(nn.Module):
    """Llama-style decoder: RMSNorm, rotary attention with a KV cache, SwiGLU MLP."""

    def __init__(self, vocab=1024, dim=512, layers=4, heads=8, hidden=1408):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, start=0, caches=None):
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.embed(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, pos, None if caches is None else caches[i])
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, ids, new_tokens):
        caches = [{} for _ in self.layers]
        logits = self(ids, 0, caches)
        out = []
        for i in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits = self(nxt, ids.shape[1] + i, caches)
        return torch.cat(out, 1)


class ViT(nn.Module):
    def __init__(self, image=64, patch=8, dim=384, depth=6, heads=6, mlp=1536, classes=100):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        n = (image // patch) ** 2
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


class ViTBlock(nn.Module):
    """Pre-norm transformer block with nn.Linear projections (as timm's ViT has)."""

    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


# ------------------------------------------------------------ real models, built from configs
LLAMA_FULL = dict(hidden=2048, intermediate=5632, layers=4, heads=16, vocab=32000)
LLAMA_QUICK = dict(hidden=512, intermediate=1408, layers=2, heads=8, vocab=8000)


def hf_llama(hidden=2048, intermediate=5632, layers=4, heads=16, vocab=32000, seed=0) -> nn.Module:
    """Hugging Face LlamaForCausalLM built from a LlamaConfig (random weights, nothing
    downloaded), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def timm_vit(name="vit_base_patch16_224", seed=0, **kw) -> nn.Module:
    """A timm ViT (pretrained=False: random weights, nothing downloaded), in eval mode;
    kw overrides the architecture (img_size, depth, ...)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kw).eval()


def tv_resnet(depth=50, seed=0) -> nn.Module:
    """torchvision's ResNet (weights=None: random weights), in eval mode."""
    import torchvision

    torch.manual_seed(seed)
    return getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()


class Workload:
    """One timed job on one model: `metric` (what value/s means), `batch`, `units` per call
    (tokens or images), `run()` the call itself (under no_grad), returning an output that
    is compared against the reference model's; `rows`: rows of x its Linear layers see per
    forward (None when layers see different counts, as a CNN's do); `unit`: what units/s is
    (default from the metric, e.g. "tokens/s")."""

    def __init__(self, metric: str, batch: int, units: int, run, rows: int | None = None, unit: str | None = None):
        self.metric, self.batch, self.units, self._run, self.rows = metric, batch, units, run, rows
        self.unit = unit or (metric.split("_per_s")[0].split("_")[-1] + "/s" if "_per_s" in metric else None)

    def run(self):
        with torch.no_grad():
            return self._run()


def llama_workloads(model: nn.Module, prompt: int = 128, steps: int = 8, seed: int = 0) -> list[Workload]:
    """A Hugging Face causal LM's two jobs at batch 1, on fixed random token ids:

    - decode: `steps` single-token steps with a KV cache (DynamicCache) after a `prompt`-token
      prefill (done on the first call, then kept); each call runs the steps and crops the
      cache back to the prompt, so every call does the same work. Output: the steps' logits.
    - prefill: the `prompt` tokens into a fresh cache, logits of the last position only
      (logits_to_keep=1, as generate() does). Output: those logits.

    The tokens are fixed (teacher forcing), not sampled, so every variant sees the same inputs."""
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt + steps), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(next(model.parameters()).device)
    state = {}

    def prefill():
        cache = DynamicCache(config=model.config)
        return model(ids[:, :prompt], cache=cache, use_cache=True, logits_to_keep=1).logits

    def decode():
        cache = state.get("cache")
        if cache is None:
            cache = state["cache"] = DynamicCache(config=model.config)
            model(ids[:, :prompt], cache=cache, use_cache=True, logits_to_keep=1)
        outs = [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(prompt, prompt + steps)]
        cache.crop(-steps)  # back to the prompt (transformers: a negative count removes tokens)
        return torch.cat(outs, 1)

    return [Workload("decode_tokens_per_s", 1, steps, decode, rows=1),
            Workload("prefill_tokens_per_s", 1, prompt, prefill, rows=prompt)]


def image_workload(model: nn.Module, batch: int, size: int = 224, seed: int = 0) -> Workload:
    """images/s of a forward on `batch` fixed random images of size x size."""
    p = next(model.parameters())
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(p.device, p.dtype)
    return Workload("images_per_s", batch, batch, lambda: model(x))


def digits_mlp() -> nn.Module:
    """MLP for 1x8x8 digit images; its middle block "3" keeps its width (removable)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(),
                         nn.Sequential(nn.Linear(256, 256), nn.ReLU()), nn.Linear(256, 10))


def digits_cnn() -> nn.Module:
    """CNN for 1x8x8 digit images; block "5" keeps its shape (removable)."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()),
                         nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))


DIGITS_MODELS = {"mlp": digits_mlp, "cnn": digits_cnn}
DIGITS_REMOVABLE = {"mlp": "3", "cnn": "5"}  # a shape-preserving block of each


def cache_dir() -> str:
    """Where trained digits models are cached: $SPARSEKERN_CACHE or ~/.cache/sparsekern."""
    return os.environ.get("SPARSEKERN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparsekern")


def digits(device):
    """scikit-learn's 8x8 digits as (x_train, y_train, x_test, y_test): 1400 training
    images, the rest for testing, x in [0, 1] of shape [N, 1, 8, 8]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("digits: scikit-learn is needed for the digits data (pip install scikit-learn)") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    return x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device)


def train(model, x, y, epochs, lr=3e-3, seed=0, desc="training", show=True):
    """Adam on cross-entropy, batches of 64; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(epochs), desc, disable=not show, leave=False, mininterval=1.0):
        perm = torch.randperm(len(y), generator=gen).to(y.device)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    """Top-1 accuracy in percent."""
    return float((model(x).argmax(1) == y).float().mean()) * 100


def trained(kind, data, epochs, device, show):
    """The digits model `kind` ("mlp" or "cnn") trained for `epochs`, from the cache when
    there; returns (model, "cache" or "trained")."""
    path = os.path.join(cache_dir(), f"demo_{kind}_e{epochs}.pt")
    model = DIGITS_MODELS[kind]().to(device)
    if os.path.exists(path):
        try:
            model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
            return model.eval(), "cache"
        except (RuntimeError, OSError):
            pass  # stale or broken cache entry: train again
    torch.manual_seed(0)
    train(model, data[0], data[1], epochs, desc=f"training {kind}", show=show)
    os.makedirs(cache_dir(), exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, "trained"


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor stores: a tensor subclass's inner tensors (torchao's quantized weights,
    torch's semi-structured sparse ones: values, metadata, scales), a quantized tensor's
    integer values with its scales and zero points, else numel x element size."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n, None), torch.Tensor))
    n = t.numel() * t.element_size()
    if t.is_quantized:
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                           torch.per_channel_affine_float_qparams):
            n += tensor_bytes(t.q_per_channel_scales()) + tensor_bytes(t.q_per_channel_zero_points())
        else:
            n += 8 + 8  # one scale (double) and one zero point (int64)
    return n


def quantized_linear_bytes(mod: nn.Module, bias: bool = True) -> int:
    """Bytes of a torch quantized Linear's packed weight (torch.ao.nn.quantized.Linear and
    its dynamic subclass, as quantize_dynamic makes): the int8 values with their scales and
    zero points (`weight()`) and, with `bias`, the bias (`bias()`), which live in
    `_packed_params`, not in parameters or buffers. The packed layout's own padding is not
    counted."""
    b = mod.bias() if bias else None
    return tensor_bytes(mod.weight()) + (0 if b is None else tensor_bytes(b))


def param_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: all parameters and buffers (compressed
    formats and tensor-subclass weights count as stored: `tensor_bytes`) and the packed
    weights of torch quantized Linear modules (`quantized_linear_bytes`)."""
    total = sum(tensor_bytes(t) for t in list(model.parameters()) + list(model.buffers()))
    try:
        from torch.ao.nn.quantized import Linear as QLinear
    except ImportError:  # pragma: no cover - torch without torch.ao
        return total
    return total + sum(quantized_linear_bytes(m) for m in model.modules() if isinstance(m, QLinear))


def held_bytes(model: nn.Module) -> int:
    """Bytes the sparse modules keep beside parameters and buffers (derived kernel indexes,
    dense copies: nn.SparseLinear.held_nbytes), as built so far by the calls made."""
    return sum(m.held_nbytes() for m in model.modules() if hasattr(m, "held_nbytes"))


def checkpoint_bytes(model: nn.Module) -> int:
    """Size of torch.save(model.state_dict())."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()
