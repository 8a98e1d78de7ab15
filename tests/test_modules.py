"""HybridSparseLinear and sparsify_model: drop-in replacements inside real HF model code."""
import pytest
import torch
from torch import nn

import sparse_kernels as sk
from sparse_kernels import apply_tier_map
from conftest import DTYPES, TOLERANCE, random_tier_map


def pruned_linear(in_features, out_features, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    tiers = random_tier_map(out_features, in_features)
    with torch.no_grad():
        linear.weight.copy_(apply_tier_map(linear.weight, tiers))
    return linear, tiers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_matches_linear(dtype, bias):
    linear, tiers = pruned_linear(70, 37, bias, dtype)
    module = sk.HybridSparseLinear.from_linear(linear, tiers)
    x = torch.randn(2, 5, 70).to(dtype)
    expected = nn.functional.linear(x.float(), linear.weight.float(),
                                    None if linear.bias is None else linear.bias.float())
    torch.testing.assert_close(module(x), expected.to(dtype), **TOLERANCE[dtype])
    assert torch.equal(module.hybrid_weight.to_dense(), linear.weight.detach())


def test_from_linear_rejects_unpruned_weight():
    linear = nn.Linear(32, 32)
    with pytest.raises(ValueError, match="mask the weight first"):
        sk.HybridSparseLinear.from_linear(linear, torch.ones(2, 2, dtype=torch.int8))


def test_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    linear, tiers = pruned_linear(50, 40)
    module = sk.HybridSparseLinear.from_linear(linear, tiers)
    save_file(module.state_dict(), tmp_path / "m.safetensors")
    fresh = sk.HybridSparseLinear(50, 40, tiers)
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    x = torch.randn(3, 50)
    assert torch.equal(fresh(x), module(x))


def test_module_dtype_cast():
    linear, tiers = pruned_linear(48, 32)
    module = sk.HybridSparseLinear.from_linear(linear, tiers).to(torch.bfloat16)
    assert module.dense_vals.dtype == torch.bfloat16 and module.s24_meta.dtype == torch.int16
    x = torch.randn(4, 48)
    torch.testing.assert_close(module(x.bfloat16()).float(), linear(x).detach(),
                               rtol=5e-2, atol=5e-2)


def test_move_or_cast_drops_the_prepared_decode_layout():
    """The CUDA decode layout lives beside the buffers; a move (model.cpu() to free the GPU) or
    a cast must not keep the old one alive."""
    linear, tiers = pruned_linear(64, 32, dtype=torch.float16)
    module = sk.HybridSparseLinear.from_linear(linear, tiers)
    layout = module._decode_cache.get(module.hybrid_weight.packed_tensors(), 32, 64,
                                      module.topk)  # as a decode call would
    assert layout is not None
    module.to(torch.bfloat16)
    assert module._decode_cache.layout is None
    module._decode_cache.get(module.hybrid_weight.packed_tensors(), 32, 64, module.topk)
    module.float()
    assert module._decode_cache.layout is None


def test_compile_fullgraph():
    linear, tiers = pruned_linear(64, 48)
    module = sk.HybridSparseLinear.from_linear(linear, tiers)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(compiled(x), module(x))


def test_backend_pinned_on_module():
    linear, tiers = pruned_linear(32, 32)
    module = sk.HybridSparseLinear.from_linear(linear, tiers, backend="torch")
    assert "backend=torch" in repr(module)
    x = torch.randn(2, 32)
    torch.testing.assert_close(module(x), linear(x).detach())


# ---------------------------------------------------------------- whole models
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM
    return OPTForCausalLM(OPTConfig(
        vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64))


def prune_all_linears(model):
    """Prune every decoder Linear (not lm_head) to a random tier map; return the tier maps."""
    tier_maps = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            out_f, in_f = module.weight.shape
            tier_maps[name] = random_tier_map(out_f, in_f)
            with torch.no_grad():
                module.weight.copy_(apply_tier_map(module.weight, tier_maps[name]))
    return tier_maps


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_generate_same_tokens_after_swap(make_model):
    torch.manual_seed(0)
    model = make_model().eval()
    tier_maps = prune_all_linears(model)
    prompt = torch.randint(0, 128, (2, 7))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        before = model.generate(prompt, **kwargs)
        sk.sparsify_model(model, tier_maps)
        after = model.generate(prompt, **kwargs)
    swapped = [n for n, m in model.named_modules() if isinstance(m, sk.HybridSparseLinear)]
    assert sorted(swapped) == sorted(tier_maps)
    assert isinstance(model.lm_head, nn.Linear)
    assert torch.equal(before, after)


def test_sparsify_model_checks_every_name_first():
    torch.manual_seed(0)
    model = tiny_llama()
    tier_maps = prune_all_linears(model)
    bad = dict(tier_maps)
    bad["model.layers.0.input_layernorm"] = next(iter(tier_maps.values()))
    with pytest.raises(TypeError, match="not an nn.Linear"):
        sk.sparsify_model(model, bad)
    with pytest.raises(KeyError, match="no module named 'model.nope'"):
        sk.sparsify_model(model, {"model.nope": next(iter(tier_maps.values()))})
    name = "model.layers.1.mlp.down_proj"
    wrong = dict(tier_maps)
    wrong[name] = torch.zeros(1, 1, dtype=torch.int8)
    with pytest.raises(ValueError, match="tier_map has shape"):
        sk.sparsify_model(model, wrong)
    assert not any(isinstance(m, sk.HybridSparseLinear) for m in model.modules())


def _live_tensor_bytes() -> int:
    import gc
    storages = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, nn.Parameter) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_sparsify_model_swaps_one_module_at_a_time(monkeypatch):
    torch.manual_seed(0)
    tiers = sk.assign_tiers(torch.rand(16, 16), (0.35, 0.45, 0.20))

    def make():
        layers = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(6)])
        with torch.no_grad():
            for layer in layers:
                layer.weight.copy_(apply_tier_map(layer.weight, tiers))
        return layers

    model = make()
    dense = 6 * 256 * 256 * 4
    packed_one = sk.HybridWeight.from_dense(model[0].weight.detach(), tiers).nbytes
    baseline = _live_tensor_bytes() - dense  # everything else alive in this process
    peaks = []
    original = sk.HybridSparseLinear.from_linear.__func__

    def measured(cls, linear, *args, **kwargs):
        new = original(cls, linear, *args, **kwargs)
        peaks.append(_live_tensor_bytes() - baseline)
        return new

    monkeypatch.setattr(sk.HybridSparseLinear, "from_linear", classmethod(measured))
    sk.sparsify_model(model, {str(i): tiers for i in range(6)})
    assert len(peaks) == 6
    # At most the dense model plus one packed module (and the packing's temporaries, which
    # are gone by then); swapping all at the end would hold all six packed copies as well.
    assert max(peaks) <= dense + packed_one + 64 * 1024
    assert _live_tensor_bytes() - baseline < dense  # the dense weights are released


def test_sparsify_model_warns_or_refuses_when_only_the_reference_would_run(monkeypatch):
    import warnings

    from sparse_kernels import backends, modules

    model = nn.Sequential(nn.Linear(32, 16))
    tiers = {"0": torch.zeros(1, 2, dtype=torch.int8)}  # all dense
    monkeypatch.setattr(backends, "resolve_backend", lambda requested, device: "torch")
    monkeypatch.setattr(modules, "_WARNED_REFERENCE", set())
    with pytest.raises(RuntimeError, match="only the pure-torch reference.*rebuilds each"):
        sk.sparsify_model(model, tiers, strict=True)
    assert isinstance(model[0], nn.Linear)  # nothing swapped
    with pytest.warns(UserWarning, match="slower than nn.Linear"):
        sk.sparsify_model(model, tiers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process and device
        sk.sparsify_model(nn.Sequential(nn.Linear(32, 16)), tiers)
    assert isinstance(model[0], sk.HybridSparseLinear)
