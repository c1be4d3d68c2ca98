"""sparsekern: kernels and tools that turn neural-network pruning into real speed.

Formats (sparsekern.formats), ops (sparsekern.ops, the only caller of the compiled
torch.ops.sparsekern.*), pure-torch references (sparsekern.reference) and the build
report (`python -m sparsekern info`).
"""
__version__ = "0.1.0"

from . import _extension, formats, ops, reference  # noqa: E402
from . import nn, prune, simplify  # noqa: E402
from .formats import BitmaskWeight, BlockWeight, NMWeight  # noqa: E402
from .serialization import load  # noqa: E402
from .sparsify import dense_state_dict, explain, freeze, from_torch_prune, quantize_values, sparsify, tune  # noqa: E402
from .recover import recover  # noqa: E402
from .optimize import Plan, apply_plan, optimize  # noqa: E402

__all__ = ["formats", "ops", "reference", "nn", "prune", "simplify", "NMWeight", "BitmaskWeight", "BlockWeight",
           "sparsify", "from_torch_prune", "quantize_values", "freeze", "recover", "explain", "tune",
           "dense_state_dict", "load", "optimize", "apply_plan", "Plan", "__version__"]
