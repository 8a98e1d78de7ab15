"""Shared helpers: random pruned weights in the hybrid format, per-dtype tolerances."""
import os

import torch
import torch.nn.functional as F

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter; it must be
# chosen before sparse_kernels (and Triton's kernel decorators) are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import sparse_kernels as sk  # noqa: E402
from sparse_kernels import apply_tier_map, assign_tiers

# Tolerance of a backend against the fp32-accumulating reference, per output dtype: fp32 differs
# only in summation order; 16-bit outputs may round one ulp apart.
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
             torch.float16: dict(rtol=2e-3, atol=2e-3)}

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def expected_linear(x, masked, bias):
    """What every hybrid_linear backend must give: fp32 ``x @ masked^T + bias`` in x's dtype."""
    out = F.linear(x.float(), masked.float(), None if bias is None else bias.float())
    return out.to(x.dtype)

needs_cpu_backend = pytest.mark.skipif(
    "cpu" not in sk.available_backends(),
    reason="the C++ CPU backend did not load: " + str(sk._loader.native_load_error))


def random_tier_map(out_features, in_features, block_size=16, ratios=(0.35, 0.45, 0.20),
                    generator=None):
    grid = sk.rules.tier_grid(out_features, in_features, block_size)
    return assign_tiers(torch.rand(grid, generator=generator), ratios)


def random_hybrid(out_features, in_features, dtype=torch.float32, block_size=16, topk=15,
                  ratios=(0.35, 0.45, 0.20), tier_map=None, seed=0, bits=16, group_size=None):
    """A random weight pruned to a tier map: returns (HybridWeight, masked dense weight). With
    ``bits`` 8 / 4 the values are rounded to codes of their groups, and the dense weight
    returned is the dequantized one (fp32: what the kernels must multiply by)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g)
    if tier_map is None:
        tier_map = random_tier_map(out_features, in_features, block_size, ratios, g)
    masked = apply_tier_map(weight, tier_map, topk, block_size).to(dtype)
    packed = sk.HybridWeight.from_dense(masked, tier_map, topk, block_size, bits=bits,
                                        group_size=group_size)
    return packed, (masked if bits == 16 else packed.to_dense())


def build_host_tool(tmp_path_factory, name: str) -> str:
    """Compile tests/csrc/<name>.cpp (a host program over the CUDA kernels' torch-free headers)
    with g++; skips the test when g++ is missing. Returns the executable's path."""
    import shutil
    import subprocess

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip(f"g++ not found: cannot build tests/csrc/{name}.cpp")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = tmp_path_factory.mktemp(name) / name
    subprocess.run([gxx, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", os.path.join(root, "csrc"),
                    os.path.join(root, "tests", "csrc", f"{name}.cpp"), "-o", str(exe)],
                   check=True)
    return str(exe)

