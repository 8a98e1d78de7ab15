"""Progressive three-tier pruning: tiers only go down, zeros stay zero, every iteration is saved,
and a run killed mid-iteration resumes to the weights and tier maps of an uninterrupted one."""

import pytest
import torch

import pruning
from pruning.checkpoints import load_pruned
from pruning.recovery import FinetuneConfig
from pruning.recovery import TextData
from pruning.models import get_weight
from pruning.recovery import RESEARCH_SCHEDULE, ScheduleStep, progressive, read_schedule
from tiny_models import ARCHITECTURES, VOCAB, calibration_ids, word_tokenizer

BUDGETS = (ScheduleStep(1, 1, budget=0.9), ScheduleStep(2, 1, budget=0.7),
           ScheduleStep(3, 2, budget=0.55))
EPOCH = FinetuneConfig(max_steps=2, lr=2e-3)


class Killed(Exception):
    pass


class Text(TextData):
    """Repeating text; ``die_after`` batches in all, it raises (a kill)."""

    def __init__(self, die_after=None):
        super().__init__(torch.arange(VOCAB - 10).repeat(40), 24, 2, seed=0)
        self.calls, self.die_after = 0, die_after

    def batch(self, step):
        self.calls += 1
        if self.die_after is not None and self.calls > self.die_after:
            raise Killed
        return super().batch(step)


def run(folder, data, model=None, resume=False):
    model = model or ARCHITECTURES["llama"]()
    tok = word_tokenizer([f"w{i}" for i in range(VOCAB - 3)])
    reports = progressive(model, tok, calibration_ids(), BUDGETS, folder, data=data,
                          finetune_config=EPOCH, method="sparsegpt", ranking="layer",
                          resume=resume, progress=False)
    return model, reports


def test_tiers_only_go_down_and_every_iteration_is_saved(tmp_path):
    model, reports = run(tmp_path, Text())
    assert [r["iteration"] for r in reports] == [1, 2, 3]
    for r, step in zip(reports, BUDGETS):
        assert r["packed_bytes"]["fraction"] <= step.budget
        assert r["finetune"]["steps"] == round(step.epochs * EPOCH.max_steps)
    saved = [load_pruned(tmp_path / f"iteration-{i}") for i in (1, 2, 3)]
    for before, after in zip(saved, saved[1:]):
        for name, tiers in before.tier_maps.items():
            assert bool((after.tier_maps[name] >= tiers).all()), name  # never promoted
            old = get_weight(before.model.get_submodule(name))
            new = get_weight(after.model.get_submodule(name))
            assert not bool(new[old == 0].any()), name  # never revived
    for name, tiers in saved[-1].tier_maps.items():
        assert torch.equal(get_weight(model.get_submodule(name)),
                           get_weight(saved[-1].model.get_submodule(name)))


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    whole, _ = run(tmp_path / "whole", Text())
    # Iteration 1 draws 1 + 2 batches (the first to size the schedule); die inside iteration 2.
    with pytest.raises(Killed):
        run(tmp_path / "killed", Text(die_after=5))
    assert (tmp_path / "killed" / "iteration-1").is_dir()
    assert not (tmp_path / "killed" / "iteration-2").exists()
    with pytest.raises(FileExistsError, match="resume it"):
        run(tmp_path / "killed", Text())
    resumed, reports = run(tmp_path / "killed", Text(), resume=True)
    assert [r["iteration"] for r in reports] == [1, 2, 3]
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    maps_whole = load_pruned(tmp_path / "whole" / "iteration-3").tier_maps
    maps_resumed = load_pruned(tmp_path / "killed" / "iteration-3").tier_maps
    assert all(torch.equal(maps_whole[n], maps_resumed[n]) for n in maps_whole)


def test_schedule_files(tmp_path):
    research = tmp_path / "research.csv"
    research.write_text("iteration,dense,mid_2_4,topk,epochs\n1,0.90,0.10,0.00,1\n"
                        "2,0.80,0.10,0.10,1\n3,0.65,0.20,0.15,5\n4,0.50,0.30,0.20,5\n"
                        "5,0.35,0.45,0.20,10\n")
    assert read_schedule(research) == RESEARCH_SCHEDULE
    budgets = tmp_path / "budgets.csv"
    budgets.write_text("iteration,budget,epochs\n1,0.8,1\n2,0.62,2\n")
    assert read_schedule(budgets) == (ScheduleStep(1, 1, budget=0.8),
                                      ScheduleStep(2, 2, budget=0.62))
    for text, message in (("iteration,budget,epochs\n1,0.6,1\n2,0.7,1\n", "more bytes"),
                          ("iteration,budget,epochs\n2,0.6,1\n", "1, 2, ..."),
                          ("iteration,dense,epochs\n1,0.6,1\n", "header"),
                          ("iteration,dense,mid_2_4,topk,epochs\n1,0.5,0.3,0.3,1\n", "ratios")):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_schedule(bad)


def test_fixed_ratio_steps_demote_as_the_research_code(tmp_path):
    from sparse_kernels import DENSE, SPARSE_24

    model = ARCHITECTURES["llama"]()
    first = pruning.prune(model, calibration_ids(), "wanda", "three_tier",
                          tier_ratios=(0.75, 0.25, 0.0), progress=False)
    second = pruning.prune(model, calibration_ids(), "wanda", "three_tier",
                           tier_ratios=(0.5, 0.25, 0.25), previous_tier_maps=first.tier_maps,
                           progress=False)
    for name, before in first.tier_maps.items():
        after = second.tier_maps[name]
        n = after.numel()
        assert int((after == DENSE).sum()) == int(n * 0.5)
        assert int((after == SPARSE_24).sum()) == int(n * 0.25)
        assert bool((after >= before).all())
    with pytest.raises(ValueError, match="applies to three_tier"):
        pruning.prune(model, calibration_ids(), "wanda", "2:4",
                      previous_tier_maps=first.tier_maps, progress=False)


def test_the_command_line_runs_a_budget_schedule_and_resumes_nothing_twice(tmp_path, capsys):
    import json

    from pruning.cli import main

    dense = ARCHITECTURES["llama"]()
    dense.save_pretrained(tmp_path / "dense")
    word_tokenizer([f"w{i}" for i in range(VOCAB - 3)]).save_pretrained(tmp_path / "dense")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 40}" for i in range(3000)))
    schedule = tmp_path / "steps.csv"
    schedule.write_text("iteration,budget,epochs\n1,0.8,1\n2,0.6,0.5\n")
    argv = ["progressive", "--model", str(tmp_path / "dense"), "--schedule", str(schedule),
            "--save", str(tmp_path / "runs"), "--epoch-steps", "2", "--ranking", "layer",
            "--calibration", str(text), "--nsamples", "4", "--data", str(text),
            "--ppl-source", str(text), "--ppl-windows", "2", "--seqlen", "16",
            "--loss", "lm+distill"]
    assert main(argv) == 0
    progress = json.loads((tmp_path / "runs" / "progress.json").read_text())
    assert progress["finished"] == 2
    steps = [r["finetune"]["steps"] for r in progress["reports"]]
    assert steps == [2, 1]
    for r in progress["reports"]:
        assert r["packed_bytes"]["fraction"] <= r["target"]["budget"]
        assert {"eval_pruned", "eval_finetuned"} <= set(r) and r["model"] == str(tmp_path / "dense")
    last = load_pruned(tmp_path / "runs" / "iteration-2")
    assert last.tier_maps and "iteration" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not empty"):  # a second fresh run: refused
        main(argv)
    assert main(argv + ["--resume"]) == 0  # all done: nothing runs again
    assert json.loads((tmp_path / "runs" / "progress.json").read_text()) == progress
