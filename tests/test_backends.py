"""Backend discovery and selection."""
import warnings

import pytest
import torch

import sparse_kernels as sk
from sparse_kernels.backends import ENV_VAR, resolve_backend
from conftest import needs_cpu_backend, random_hybrid


def test_torch_is_always_available_and_last():
    backends = sk.available_backends()
    assert backends[-1] == "torch"


@needs_cpu_backend
def test_cpu_backend_is_the_default_on_cpu():
    assert resolve_backend(None, torch.device("cpu")) == "cpu"


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        resolve_backend("fast", torch.device("cpu"))


def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .*Available: "):
        resolve_backend("cuda", torch.device("cpu"))


@needs_cpu_backend
def test_backend_for_the_wrong_device():
    with pytest.raises(RuntimeError, match="runs on cpu tensors, got tensors on meta"):
        resolve_backend("cpu", torch.device("meta"))


def test_env_var_forces_a_backend(monkeypatch):
    hw, _ = random_hybrid(16, 16)
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend(None, torch.device("cpu")) == "torch"
    assert resolve_backend("cpu" if "cpu" in sk.available_backends() else "torch",
                           torch.device("cpu")) in ("cpu", "torch")  # the argument wins
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        sk.hybrid_linear(torch.randn(1, 16), hw)


def test_cuda_matmul_kernel_follows_rows_and_environment(monkeypatch):
    from sparse_kernels.backends import DECODE_ENV, PREFILL_ENV, cuda_matmul_kernel

    monkeypatch.delenv(DECODE_ENV, raising=False)
    monkeypatch.delenv(PREFILL_ENV, raising=False)
    assert [cuda_matmul_kernel(r) for r in (1, 16, 17, 1023, 1024, 4096)] == [
        "v2", "v2", "v1", "v1", "unpack", "unpack"]
    monkeypatch.setenv(DECODE_ENV, "v1")
    monkeypatch.setenv(PREFILL_ENV, "unpack")
    assert [cuda_matmul_kernel(r) for r in (1, 17, 4096)] == ["v1", "unpack", "unpack"]
    monkeypatch.setenv(PREFILL_ENV, "v1")
    assert cuda_matmul_kernel(4096) == "v1"
    monkeypatch.setenv(DECODE_ENV, "v3")
    with pytest.raises(ValueError, match="SPARSE_KERNELS_CUDA_DECODE='v3': expected one of v1, v2"):
        cuda_matmul_kernel(1)



@needs_cpu_backend
def test_an_op_without_a_kernel_says_so_once_and_the_reference_serves_it(monkeypatch):
    from sparse_kernels import _ops, reference

    monkeypatch.setattr(_ops, "_HAS_KERNEL", {})
    hw, masked = random_hybrid(20, 30)
    args = (*hw.packed_tensors(), 20, 30)  # the C++ library has no CPU unpack_hybrid
    with pytest.warns(UserWarning, match="the cpu backend has no kernel for unpack_hybrid: the "
                                         "torch reference serves it"):
        got = _ops.call_op("unpack_hybrid", "cpu", torch.device("cpu"), *args)
    assert torch.equal(got, reference.unpack_blocks(*args)) and torch.equal(got, masked)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ops.call_op("unpack_hybrid", "cpu", torch.device("cpu"), *args)
