"""The sparsity report says what was pruned of all the decoder layers' weights, lists every
parameter left out with why, and prune() warns (or, strict, refuses) when much was left out."""
import warnings

import pytest
import torch

import pruning
from pruning.report import coverage_report, format_report
from tiny_models import ARCHITECTURES, calibration_ids


def test_weights_no_method_prunes_are_named_and_warned_about():
    model = ARCHITECTURES["llama"]()
    extra = torch.nn.Parameter(torch.randn(4, 96, 64))  # e.g. experts in an unknown layout
    model.model.layers[0].mlp.register_parameter("unknown_experts", extra)
    with pytest.warns(UserWarning, match=r"unknown_experts \(4, 96, 64\).*3-D fused expert"):
        result = pruning.prune(model, calibration_ids(), "wanda", "unstructured", 0.5,
                               progress=False)
    cover = result.report["coverage"]
    weights = sum(p.numel() for layer in model.model.layers for p in layer.parameters()
                  if p.dim() >= 2)
    zeros = sum(int((p == 0).sum()) for layer in model.model.layers for p in layer.parameters()
                if p.dim() >= 2)
    assert cover["decoder_weights"] == weights and cover["pruned"] == zeros
    assert cover["sparsity_over_pruned_modules"] == pytest.approx(0.5, abs=0.01)
    assert cover["sparsity_over_decoder_weights"] == pytest.approx(zeros / weights)
    assert cover["unpruned_weight_fraction"] == pytest.approx(extra.numel() / weights)
    assert "were not pruned" in format_report(result.report)
    model = ARCHITECTURES["llama"]()
    model.model.layers[0].mlp.register_parameter("unknown_experts", extra)
    with pytest.raises(ValueError, match="strict=True refuses"):
        pruning.prune(model, calibration_ids(), "wanda", "unstructured", 0.5, strict=True,
                      progress=False)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_a_dense_model_is_covered_and_its_norms_and_biases_are_listed(arch):
    model = ARCHITECTURES[arch]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coverage warning on a model pruning covers
        result = pruning.prune(model, calibration_ids(), "magnitude", "unstructured", 0.5,
                               strict=True, progress=False)
    cover = result.report["coverage"]
    assert cover["unpruned_weight_fraction"] == 0.0
    assert cover["sparsity_over_decoder_weights"] == pytest.approx(0.5, abs=0.01)
    whys = {s["why"] for layer in cover["per_layer"].values() for s in layer["skipped"]}
    assert whys == {"1-D (a bias or a norm): never pruned"}


def test_coverage_counts_a_partial_prune():
    model = ARCHITECTURES["llama"]()
    q = model.model.layers[0].self_attn.q_proj
    mask = torch.zeros_like(q.weight, dtype=torch.bool)
    mask[:, :16] = True
    cover = coverage_report(model, {"model.layers.0.self_attn.q_proj": mask})
    assert cover["pruned_module_params"] == q.weight.numel()
    assert cover["pruned"] == q.weight.numel() - 16 * q.weight.shape[0]
    largest = cover["largest_skipped"]
    assert largest["params"] == max(p.numel() for n, p in model.model.layers.named_parameters()
                                    if "q_proj" not in n or n.startswith("1."))
