"""Model discovery and layer-by-layer capture on several architectures."""
import pytest
import torch
from torch import nn

from pruning.statistics import layerwise
from pruning.models import (decoder_layers, get_weight, is_prunable, prunable_linears,
                            set_weight)
from pruning.statistics import LinearStats
from tiny_models import ARCHITECTURES, calibration_ids

EXPECTED_LAYERS = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
                   "opt": "model.decoder.layers", "gpt_neox": "gpt_neox.layers",
                   "gpt2": "transformer.h"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decoder_layers_and_linears(arch):
    model = ARCHITECTURES[arch]()
    path, layers = decoder_layers(model)
    assert path == EXPECTED_LAYERS[arch] and len(layers) == 2
    linears = prunable_linears(layers[0])
    assert len(linears) >= 4
    for module in linears.values():
        out_f, in_f = get_weight(module).shape
        x = torch.randn(3, in_f)
        assert module(x).shape[-1] == out_f  # [out, in] view, Conv1D included
    pruned_names = {n for n, m in model.named_modules() if is_prunable(m)} - {"lm_head"}
    in_layers = {f"{path}.{i}.{n}" for i, layer in enumerate(layers)
                 for n in prunable_linears(layer)}
    assert in_layers == pruned_names  # every Linear outside the layers is lm_head


def test_unknown_layout_names_the_paths_tried():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(4, 4))

    with pytest.raises(ValueError, match="tried model.layers, model.decoder.layers"):
        decoder_layers(Odd())


def test_set_weight_round_trips_conv1d():
    model = ARCHITECTURES["gpt2"]()
    module = prunable_linears(decoder_layers(model)[1][0])["attn.c_attn"]
    new = torch.randn_like(get_weight(module))
    set_weight(module, new)
    assert torch.equal(get_weight(module), new)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layerwise_stats_equal_full_forward_stats(arch):
    """Each layer run alone with the captured kwargs sees exactly what the full forward feeds it."""
    model = ARCHITECTURES[arch]()
    ids = calibration_ids()
    path, layers = decoder_layers(model)
    expected, handles = {}, []
    for i, layer in enumerate(layers):
        for name, module in prunable_linears(layer).items():
            stats = expected[f"{path}.{i}.{name}"] = LinearStats.empty(
                get_weight(module).shape[1], hessian=True)
            handles.append(module.register_forward_hook(
                lambda _m, args, _o, s=stats: s.add_batch(args[0], 2)))
    with torch.no_grad():
        for batch in ids.split(2):
            model(batch, use_cache=False)
    for h in handles:
        h.remove()

    seen = {}

    def collect(layer_name, _layer, linears, stats):
        for name in linears:
            seen[f"{layer_name}.{name}"] = stats[name]

    layerwise(model, list(ids.split(2)), collect, needs_hessian=True, progress=False)
    assert seen.keys() == expected.keys()
    for name, stats in seen.items():
        assert stats.nsamples == 4
        torch.testing.assert_close(stats.act_sq_norm, expected[name].act_sq_norm,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats.hessian, expected[name].hessian, rtol=1e-4, atol=1e-4)


def test_offloaded_weights_get_a_clear_error():
    from pruning.models import module_device
    layer = nn.Linear(4, 4, device="meta")
    with pytest.raises(RuntimeError, match="offloaded to the meta device"):
        module_device(layer)


def test_layers_run_on_the_requested_device_and_go_back(monkeypatch):
    """Each layer (and its inputs) moves to the requested device for its turn and back after:
    recorded with a stand-in device name, since this machine may have no GPU."""
    import pruning.statistics.capture as capture

    model = ARCHITECTURES["llama"]()
    _, layers = decoder_layers(model)
    moves, turns = [], []
    for index, layer in enumerate(layers):
        monkeypatch.setattr(layer, "to", lambda device, i=index, layer=layer:
                            (moves.append((i, str(device))), layer)[1])
    monkeypatch.setattr(capture, "move_to", lambda obj, device: (
        moves.append(("inputs", str(device))), obj)[1])
    empty = LinearStats.empty  # statistics stay on the CPU with the stand-in device
    monkeypatch.setattr(capture.LinearStats, "empty",
                        lambda in_features, hessian, device=None: empty(in_features,
                                                                         hessian=hessian))
    layerwise(model, [calibration_ids()], lambda name, layer, linears, stats: turns.append(
        (name, list(moves))), device="cuda:7", progress=False)
    assert moves == [(0, "cuda:7"), ("inputs", "cuda:7"), (0, "cpu"),
                     (1, "cuda:7"), ("inputs", "cuda:7"), (1, "cpu")]
    # Pruning saw each layer after it moved and before it went back.
    assert [t[1][-1] for t in turns] == [("inputs", "cuda:7")] * 2
