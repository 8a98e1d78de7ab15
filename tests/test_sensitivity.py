"""The statistics of the unpruned model (gradient sensitivity, Wanda's input norms) and the
statistics sharing of the layer-by-layer pass."""
import torch
import torch.nn.functional as F

from pruning.statistics.capture import _collect_stats
from pruning.models import capture_layer_inputs, decoder_layers, prunable_linears
from pruning.planning.sensitivity import unpruned_stats
from pruning.statistics import LinearStats
from tiny_models import ARCHITECTURES, calibration_ids


def test_out_sensitivity_is_the_mean_squared_output_gradient():
    model = ARCHITECTURES["llama"]()
    ids = calibration_ids(4, 24)
    stats = unpruned_stats(model, list(ids.split(2)), activations=True, progress=False)
    path, layers = decoder_layers(model)
    name = f"{path}.1.mlp.down_proj"
    module = dict(model.named_modules())[name]
    # By hand: the output of down_proj, the gradient of the summed NLL with respect to it.
    outputs, inputs = [], []

    def keep(_module, args, out):
        outputs.append(out)
        inputs.append(args[0].detach())

    handle = module.register_forward_hook(keep)
    expected = torch.zeros(module.out_features)
    for batch in ids.split(2):
        logits = model(batch, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum")
        (grad,) = torch.autograd.grad(loss, outputs[-1])
        expected += grad.pow(2).reshape(-1, grad.shape[-1]).sum(0)
    handle.remove()
    torch.testing.assert_close(stats[name].out_sensitivity, expected / ids.numel())
    x = torch.cat(inputs)
    torch.testing.assert_close(stats[name].act_sq_norm, x.pow(2).sum(1).mean(0))
    assert stats[name].hessian is None and stats[name].nsamples == 4


def test_the_pass_leaves_the_model_as_it_found_it():
    model = ARCHITECTURES["opt"]()
    model.train()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = unpruned_stats(model, [calibration_ids(2, 16)], progress=False)
    assert model.training and not frozen.requires_grad
    assert all(p.requires_grad for p in list(model.parameters())[1:])
    for n, p in model.named_parameters():
        assert p.grad is None and torch.equal(p, before[n]), n
    path, layers = decoder_layers(model)
    assert set(stats) == {f"{path}.{i}.{n}" for i, layer in enumerate(layers)
                          for n in prunable_linears(layer)}
    assert all(s.act_sq_norm is None and bool((s.out_sensitivity > 0).any())
               for s in stats.values())


def test_forward_only_pass_has_no_sensitivity():
    model = ARCHITECTURES["gpt2"]()
    stats = unpruned_stats(model, [calibration_ids(2, 16)], gradients=False, activations=True,
                           progress=False)
    assert all(s.out_sensitivity is None and s.act_sq_norm is not None for s in stats.values())


def test_linears_fed_the_same_input_share_their_statistics():
    model = ARCHITECTURES["llama"]()
    path, layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, list(calibration_ids().split(2)))
    linears = prunable_linears(layers[0])
    stats = _collect_stats(layers[0], linears, inputs, True, torch.device("cpu"))
    attn, mlp = "self_attn.", "mlp."
    q, k, v = (stats[attn + n] for n in ("q_proj", "k_proj", "v_proj"))
    assert q.hessian is k.hessian is v.hessian and q is not k  # one X^T X, separate records
    assert stats[mlp + "gate_proj"].hessian is stats[mlp + "up_proj"].hessian
    assert stats[attn + "o_proj"].hessian is not q.hessian
    # The shared accumulation is what each would have computed alone.
    seen = []
    handle = linears[mlp + "gate_proj"].register_forward_hook(
        lambda _m, args, _o: seen.append(args[0]))
    with torch.no_grad():
        for args, kwargs in inputs:
            layers[0](*args, **kwargs)
    handle.remove()
    alone = LinearStats.empty(seen[0].shape[-1], hessian=True)
    for x in seen:
        alone.add_batch(x)
    torch.testing.assert_close(stats[mlp + "up_proj"].hessian, alone.hessian)
    torch.testing.assert_close(stats[mlp + "up_proj"].act_sq_norm, alone.act_sq_norm)
