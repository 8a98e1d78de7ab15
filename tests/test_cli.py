"""The hybrid-prune command line, end to end on the embedded SmolLM2 model."""
import json

import pytest
import torch

import sparse_kernels as sk
from pruning.cli import build_parser, main, tier_arguments


@pytest.mark.slow
def test_prune_embedded_model_end_to_end(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import pruning
    from pruning.embedded import load_embedded_tokenizer
    from pruning.evaluation import perplexity

    out = tmp_path / "pruned"
    assert main(["--nsamples", "4", "--seqlen", "128", "--ppl-windows", "2",
                 "--save", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dense perplexity" in printed and "one decode step" in printed
    assert "packed bytes: 0.6" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["pattern"] == "three_tier" and report["method"] == "sparsegpt"
    # The default: a 0.62 byte budget over the whole model, bytes of the fp32 model as packed.
    packed = report["report"]["packed_bytes"]
    assert packed["budget"] == 0.62 and 0.99 * 0.62 <= packed["fraction"] <= 0.62
    assert 1.0 < report["ppl"]["dense"] < report["ppl"]["pruned"] < 1e4
    assert report["decode_step_ms"]["modules_swapped"] == 30 * 7
    # The checkpoint is packed: smaller than dense by what the budget saved on 106M of the
    # model's 135M weights (the embeddings stay dense).
    assert report["checkpoint"]["packed_modules"] == 30 * 7
    assert 0.6 < report["checkpoint"]["fraction"] < 0.75

    # Plain from_pretrained builds the packed modules, and they compute what was measured.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(isinstance(m, sk.HybridSparseLinear) for m in model.modules()) == 30 * 7
    reloaded = perplexity(model, load_embedded_tokenizer(), "embedded", seqlen=128,
                          max_windows=2, progress=False)
    assert reloaded == pytest.approx(report["ppl"]["pruned"], rel=1e-4)
    tier_maps, meta = pruning.load_tier_maps(out / "tier_maps.safetensors", model)
    assert len(tier_maps) == 30 * 7 and meta["topk"] == 64 and meta["budget"] == 0.62
    for name, tiers in tier_maps.items():
        assert torch.equal(model.get_submodule(name).tier_map, tiers)


def test_parser_defaults_are_the_main_job():
    args = build_parser().parse_args(["prune"])
    assert (args.method, args.pattern, args.block_size) == ("sparsegpt", "three_tier", 16)
    assert args.model is None and args.eval_ppl is None and args.sparsify is None
    assert tier_arguments(args) == dict(budget=0.62, budget_dtype=None, allow_topk=True,
                                        topk=None, ranking="model")


def test_tier_arguments_of_the_research_mix_and_of_budgets():
    parse = lambda *argv: tier_arguments(build_parser().parse_args(["prune", *argv]))  # noqa
    assert parse("--tier-ratios", "0.35", "0.45", "0.20") == dict(
        tier_ratios=(0.35, 0.45, 0.20), topk=15, ranking="matrix")
    assert parse("--budget", "0.5", "--topk", "15", "32", "--no-topk",
                 "--budget-dtype", "float16", "--ranking", "layer") == dict(
        budget=0.5, budget_dtype=torch.float16, allow_topk=False, topk=(15, 32),
        ranking="layer")
    assert parse("--pattern", "2:4") == dict(tier_ratios=None, topk=15, ranking="matrix")
    for argv, message in ((("--pattern", "2:4", "--budget", "0.5"), "--budget applies"),
                          (("--tier-ratios", "1", "0", "0", "--topk", "8", "16"), "several"),
                          (("--pattern", "2:4", "--no-topk"), "apply to a byte budget")):
        with pytest.raises(SystemExit, match=message):
            parse(*argv)


def test_eval_sparsify_needs_tier_maps(monkeypatch):
    monkeypatch.setattr("pruning.loading.load_model",
                        lambda *args, **kwargs: (torch.nn.Linear(2, 2), None, "stub"))
    with pytest.raises(SystemExit, match="--sparsify needs --tier-maps"):
        main(["eval", "--model", "stub", "--sparsify", "--no-ppl"])


def test_missing_model_directory():
    with pytest.raises(SystemExit, match="no such folder './does/not/exist'"):
        main(["prune", "--model", "./does/not/exist", "--no-eval-ppl"])


def test_save_refuses_a_non_empty_folder_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.setattr("pruning.loading.load_model",
                        lambda *a, **k: pytest.fail("loaded a model before checking --save"))
    with pytest.raises(SystemExit, match="not empty.*notes.txt.*--overwrite"):
        main(["prune", "--save", str(tmp_path)])
    assert (tmp_path / "notes.txt").read_text() == "mine"
