"""Recovery fine-tuning: it learns, and no pruned weight ever comes back (masked, LoRA merged and
re-masked, distillation), a killed run resumes to the same weights, and the data formats."""
import copy
import json

import pytest
import torch

import pruning
import sparse_kernels as sk
from pruning.recovery import FinetuneConfig, finetune
from pruning.recovery.data import IGNORE, InstructionData, TextData, finetune_data
from pruning.models import get_weight
from tiny_models import ARCHITECTURES, VOCAB, calibration_ids, word_tokenizer


def pruned(arch="llama", **kwargs):
    model = ARCHITECTURES[arch]()
    dense = copy.deepcopy(model)
    args = dict(method="wanda", pattern="three_tier", budget=0.6, ranking="layer") | kwargs
    result = pruning.prune(model, calibration_ids(), progress=False, **args)
    return model, dense, result


def learnable_text(seqlen=24, batch_size=4):
    """A repeating sequence: easy to learn, so the loss must fall."""
    return TextData(torch.arange(VOCAB - 10).repeat(40), seqlen, batch_size, seed=0)


def check_masks_hold(model, result):
    for name, mask in result.masks.items():
        weight = get_weight(model.get_submodule(name)).detach()
        assert not bool(weight[~mask].any()), f"{name}: a pruned weight came back"
        sk.HybridWeight.from_dense(weight, result.tier_maps[name], result.topks[name])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_masked_fine_tune_learns_and_keeps_every_zero(arch):
    model, _, result = pruned(arch)
    before = {n: get_weight(model.get_submodule(n)).detach().clone() for n in result.masks}
    out = finetune(model, learnable_text(), result.masks,
                   FinetuneConfig(max_steps=30, lr=3e-3, warmup=0.1), progress=False)
    losses = [h["loss"] for h in out.history]
    assert out.steps == 30 and out.model is model
    assert sum(losses[-5:]) < 0.92 * sum(losses[:5])
    check_masks_hold(model, result)
    assert any(not torch.equal(get_weight(model.get_submodule(n)), before[n])
               for n in result.masks)  # it trained


def test_lora_merges_and_re_masks_and_reports_what_it_removed():
    model, _, result = pruned()
    evals = []

    def eval_fn(m):
        evals.append(1)
        return float(len(evals))

    out = finetune(model, learnable_text(), result.masks,
                   FinetuneConfig(mode="lora", max_steps=20, lr=5e-3, lora_rank=4),
                   eval_fn=eval_fn, progress=False)
    check_masks_hold(out.model, result)
    assert not any("lora" in n for n, _ in out.model.named_parameters())
    lora = out.lora
    assert lora["update_norm"] > lora["kept_norm"] > 0
    assert 0 < lora["removed_fraction"] < 1
    assert (lora["eval_before_merge"], lora["eval_after_merge"]) == (1.0, 2.0)
    losses = [h["loss"] for h in out.history]
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("loss, hidden", [("distill", 0.0), ("lm+distill", 1.0)])
def test_distillation_moves_the_student_toward_the_teacher(loss, hidden):
    model, dense, result = pruned()
    data = learnable_text()
    # A teacher that knows something (random tiny models predict nearly uniformly): the dense
    # model trained on the text, nothing masked.
    everything = {n: torch.ones_like(m) for n, m in result.masks.items()}
    finetune(dense, data, everything, FinetuneConfig(max_steps=40, lr=3e-3), progress=False)
    batch = data.batch(10_000)

    def gap():
        with torch.no_grad():
            s = model(batch.input_ids).logits.log_softmax(-1)
            t = dense(batch.input_ids).logits.log_softmax(-1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    start = gap()
    finetune(model, data, result.masks, FinetuneConfig(loss=loss, hidden_weight=hidden,
                                                       max_steps=25, lr=3e-3),
             teacher=dense, progress=False)
    assert gap() < 0.8 * start
    check_masks_hold(model, result)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    config = FinetuneConfig(max_steps=12, lr=2e-3, checkpoint_every=4, eval_every=0)
    model, _, result = pruned()
    start = copy.deepcopy(model)
    finetune(model, learnable_text(), result.masks, config, checkpoint_dir=tmp_path / "whole",
             progress=False)

    class Killed(Exception):
        pass

    class DiesAtStep9(TextData):
        def batch(self, step):
            if step == 9:
                raise Killed
            return super().batch(step)

    interrupted = copy.deepcopy(start)
    data = DiesAtStep9(torch.arange(VOCAB - 10).repeat(40), 24, 4, seed=0)
    with pytest.raises(Killed):
        finetune(interrupted, data, result.masks, config, checkpoint_dir=tmp_path / "killed",
                 progress=False)
    resumed = copy.deepcopy(start)  # a new process: the weights it loaded from disk
    out = finetune(resumed, learnable_text(), result.masks, config,
                   checkpoint_dir=tmp_path / "killed", resume=True, progress=False)
    assert out.steps == 12 and [h["step"] for h in out.history] == list(range(1, 13))
    for (name, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_max_tokens_ends_the_run():
    model, _, result = pruned()
    out = finetune(model, learnable_text(seqlen=24, batch_size=4), result.masks,
                   FinetuneConfig(max_tokens=500), progress=False)
    per_step = 4 * 23
    assert out.tokens >= 500 and out.tokens - per_step < 500


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="full", max_steps=1), "mode"), (dict(loss="kl", max_steps=1), "loss"),
    (dict(), "max_steps or max_tokens"), (dict(max_steps=0), "max_steps"),
    (dict(max_steps=1, lr=0), "lr > 0"), (dict(max_steps=1, schedule="step"), "schedule"),
])
def test_bad_configurations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**kwargs)


def test_bad_calls():
    model, _, result = pruned()
    with pytest.raises(ValueError, match="pass teacher"):
        finetune(model, learnable_text(), result.masks,
                 FinetuneConfig(loss="distill", max_steps=1), progress=False)
    with pytest.raises(KeyError, match="does not have"):
        finetune(model, learnable_text(), {"model.nope": torch.ones(2, 2, dtype=torch.bool)},
                 FinetuneConfig(max_steps=1), progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        finetune(model, learnable_text(), result.masks, FinetuneConfig(max_steps=1),
                 resume=True, progress=False)


# --------------------------------------------------------------------------------- the data
def tokenizer():
    return word_tokenizer([f"w{i}" for i in range(40)] + ["Answer:", "Q:", "yes", "no"])


def test_instruction_batches_count_only_the_answer():
    tok = tokenizer()
    data = InstructionData([("Q: w1 w2 Answer:", " yes"), ("Q: w3 Answer:", " no w4 w5")],
                           tok, seqlen=32, batch_size=6, seed=1)
    batch = data.batch(0)
    eos = tok.eos_token_id
    for ids, labels, mask in zip(batch.input_ids, batch.labels, batch.attention_mask):
        counted = ids[labels != IGNORE].tolist()
        words = tok.convert_ids_to_tokens(counted[:-1])
        assert words in (["yes"], ["no", "w4", "w5"]) and counted[-1] == eos
        assert int(mask.sum()) == int((ids != tok.pad_token_id).sum())
    assert batch.tokens == int((batch.labels[:, 1:] != IGNORE).sum())


def test_long_prompts_lose_their_beginning_not_the_answer():
    tok = tokenizer()
    data = InstructionData([(" ".join(f"w{i}" for i in range(30)), " yes")], tok, seqlen=8,
                           batch_size=1)
    batch = data.batch(0)
    assert batch.input_ids.shape == (1, 8)
    assert tok.convert_ids_to_tokens(batch.input_ids[0].tolist())[-3:] == ["w29", "yes",
                                                                            "[EOS]"]


def test_a_local_jsonl_with_a_field_mapping(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": f"w{i}", "a": "yes" if i % 2 else "no"}) + "\n"
                            for i in range(6)))
    data = finetune_data(path, tokenizer(), seqlen=16, batch_size=3,
                         fields={"prompt": "q", "answer": "a"})
    assert isinstance(data, InstructionData) and len(data.examples) == 6
    with pytest.raises(ValueError, match="has no field 'answer'"):
        finetune_data(path, tokenizer(), 16, 3, fields={"prompt": "q", "answer": "answer"})
    with pytest.raises(ValueError, match="maps 'prompt' and 'answer'"):
        finetune_data(path, tokenizer(), 16, 3, fields={"question": "q"})
    text = tmp_path / "plain.txt"
    text.write_text(" ".join(f"w{i % 40}" for i in range(400)))
    assert isinstance(finetune_data(text, tokenizer(), 16, 3), TextData)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        finetune_data(text, None, 16, 3)


def test_text_batches_are_a_function_of_the_step():
    data = learnable_text()
    assert torch.equal(data.batch(7).input_ids, data.batch(7).input_ids)
    assert not torch.equal(data.batch(7).input_ids, data.batch(8).input_ids)


def test_the_command_line_fine_tunes_a_saved_prune_and_saves_it_packed(tmp_path):
    from transformers import AutoModelForCausalLM

    from pruning.checkpoints import load_pruned, save_pruned
    from pruning.cli import main

    model, dense, result = pruned()
    tok = tokenizer()
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    save_pruned(tmp_path / "pruned", model, tok, result, {"model": str(tmp_path / "dense")})
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 40}" for i in range(3000)))
    assert main(["finetune", "--model", str(tmp_path / "pruned"), "--save", str(tmp_path / "ft"),
                 "--data", str(text), "--ppl-source", str(text), "--ppl-windows", "2",
                 "--seqlen", "16", "--max-steps", "4", "--lr", "1e-2", "--loss", "lm+distill",
                 "--checkpoint-every", "2"]) == 0
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["finetune"]["steps"] == 4 and report["model"] == str(tmp_path / "dense")
    assert set(report["ppl"]) == {"before", "after"}
    assert not (tmp_path / "ft-finetune-state").exists()  # only a resume would need it
    # Packed again with the same tier maps; the weights changed, every pruned one stayed zero.
    before, after = load_pruned(tmp_path / "pruned"), load_pruned(tmp_path / "ft")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ft") is not None
    changed = False
    for name, mask in before.masks.items():
        assert torch.equal(after.masks[name], mask)
        assert torch.equal(after.tier_maps[name], before.tier_maps[name])
        new = get_weight(after.model.get_submodule(name))
        old = get_weight(before.model.get_submodule(name))
        assert not bool(new[~mask].any())
        changed |= not torch.equal(new, old)
    assert changed
