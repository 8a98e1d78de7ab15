"""The hybrid-prune command line, end to end on the embedded SmolLM2 model."""
import json

import pytest
import torch

from pruning.cli import build_parser, main


@pytest.mark.slow
def test_prune_embedded_model_end_to_end(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import pruning
    from pruning.models import get_weight

    out = tmp_path / "pruned"
    assert main(["--nsamples", "4", "--seqlen", "128", "--ppl-windows", "2",
                 "--save", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dense perplexity" in printed and "one decode step" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["pattern"] == "three_tier"
    # 0.35 / 0.45 / 0.20 of whole 16x16 blocks, K = 15: 0.5 * 0.45 + (1 - 15/256) * 0.20.
    assert report["sparsity"] == pytest.approx(0.4131, abs=0.002)
    assert 1.0 < report["ppl"]["dense"] < report["ppl"]["pruned"] < 1e4
    assert report["decode_step_ms"]["modules_swapped"] == 30 * 7
    assert report["decode_step_ms"]["speedup"] > 0

    model = AutoModelForCausalLM.from_pretrained(out)
    tier_maps, meta = pruning.load_tier_maps(out / "tier_maps.safetensors", model)
    assert len(tier_maps) == 30 * 7 and meta["topk"] == 15
    modules = dict(model.named_modules())
    q = get_weight(modules["model.layers.0.self_attn.q_proj"])
    assert 0.35 < float((q == 0).float().mean()) < 0.5


def test_parser_defaults_are_the_main_job():
    args = build_parser().parse_args(["prune"])
    assert (args.method, args.pattern, tuple(args.tier_ratios), args.topk, args.block_size) == \
        ("wanda", "three_tier", (0.35, 0.45, 0.20), 15, 16)
    assert args.model is None and args.eval_ppl is None and args.sparsify is None


def test_eval_sparsify_needs_tier_maps(monkeypatch):
    monkeypatch.setattr("pruning.cli.load_model",
                        lambda name, dtype: (torch.nn.Linear(2, 2), None, "stub"))
    with pytest.raises(SystemExit, match="--sparsify needs --tier-maps"):
        main(["eval", "--model", "stub", "--sparsify", "--no-ppl"])


def test_missing_model_directory():
    with pytest.raises(SystemExit, match="no such directory"):
        main(["prune", "--model", "./does/not/exist", "--no-eval-ppl"])
