"""Three-tier hybrid sparse kernels: dense, 2:4 and top-K blocks of a pruned weight.

Public API:
  HybridWeight            the packed format (format.py)
  hybrid_linear           y = x @ W^T + bias from a HybridWeight
  HybridSparseLinear      nn.Module holding a HybridWeight; sparsify_model swaps them in
  wanda_scores, block_topk_mask, nm_mask, compress_24   pruning-side kernels
  assign_tiers, tier_mask, apply_tier_map    what a tier map means for a weight (tiers.py)
  available_backends      which backends this install can run (ops_with_kernel: per dispatch key)
  cpu_isa, supported_cpu_isas   the CPU kernels' instruction set (chosen at run time)

Importing the package registers nothing with transformers directly: transformers is an optional
dependency that takes seconds to import, and the kernels must load without it. But plain
``from_pretrained`` of a packed checkpoint finds its loader in transformers' quantizer registry,
which has no hook of its own. So import installs a ``sys.meta_path`` finder that registers the
loader (``huggingface.register``) the moment transformers itself is imported, and removes
itself; if transformers is already imported, it registers at once.
"""
from ._ops import block_topk_mask, compress_24, nm_mask, ops_with_kernel, wanda_scores
from .backends import available_backends, cpu_isa, supported_cpu_isas
from .format import HybridWeight
from .rules import DENSE, SPARSE_24, TIER_NAMES, TOPK
from .functional import hybrid_linear
from .modules import HybridSparseLinear, sparsify_model
from .tiers import apply_tier_map, assign_tiers, tier_mask

__all__ = [
    "HybridWeight", "HybridSparseLinear", "sparsify_model", "hybrid_linear",
    "wanda_scores", "block_topk_mask", "nm_mask", "compress_24", "available_backends",
    "cpu_isa", "supported_cpu_isas", "ops_with_kernel",
    "DENSE", "SPARSE_24", "TOPK", "TIER_NAMES", "assign_tiers", "tier_mask", "apply_tier_map",
]


def _register_with_transformers_when_imported() -> None:
    """``from_pretrained`` of a packed checkpoint needs this package's quantizer registered
    with transformers; register it now if transformers is loaded, else right after it is."""
    import importlib.abc
    import importlib.util
    import sys

    if "transformers" in sys.modules:
        from . import huggingface
        huggingface.register()
        return

    class _AfterTransformers(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "transformers":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                from . import huggingface
                huggingface.register()
            spec.loader.exec_module = exec_then_register
            return spec

    sys.meta_path.insert(0, _AfterTransformers())


_register_with_transformers_when_imported()
