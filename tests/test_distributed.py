"""The fine-tune on several processes (gloo, CPU, two processes started by torchrun): DDP and
FSDP reach the single process's weights, no pruned weight comes back, a killed run resumes to
the uninterrupted one (also onto another number of processes), the command line trains as one
job and saves a checkpoint transformers loads; and the launch checks and shard masks alone."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pruning.recovery.data import Batch
from pruning.recovery.distributed import ShardMask, check_launch, split_batch

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"
# fp32 on one CPU: the processes only change the order of the gradient sums.
TOLERANCE = 1e-5

sys.path.insert(0, str(HERE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, check=True):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), *map(str, args)],
                         env=env, capture_output=True, text=True, timeout=300)
    if check and run.returncode != 0:
        raise AssertionError(f"torchrun failed ({run.returncode}):\n{run.stderr[-4000:]}")
    return run


@pytest.fixture(scope="module")
def single():
    from distributed_worker import run
    state, masks, result, _ = run("single")
    return {"state": state, "masks": masks, "history": result.history,
            "mask_bytes": result.mask_bytes}


def close(a: dict, b: dict, tolerance=TOLERANCE) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= tolerance, worst
    return worst


def masks_hold(state: dict, masks: dict) -> None:
    for name, mask in masks.items():
        weight = state[f"{name}.weight"]
        assert not bool(weight[~mask].any()), f"{name}: a pruned weight came back"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_reach_the_single_process_weights(tmp_path, single, strategy):
    torchrun(WORKER, tmp_path / "out.pt", "--strategy", strategy)
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    assert out["launch"] == {"strategy": strategy, "processes": 2, "backend": "gloo",
                             "device": "cpu"}
    close(out["state"], single["state"])
    for mine, theirs in zip(out["history"], single["history"]):
        assert abs(mine["loss"] - theirs["loss"]) <= TOLERANCE
        assert mine["tokens"] == theirs["tokens"]  # the whole batch, not one process's rows
    masks_hold(out["state"], out["masks"])
    # FSDP keeps half of each mask per process, DDP all of it; both as bits.
    assert out["mask_bytes"] == single["mask_bytes"] // (2 if strategy == "fsdp" else 1)
    assert single["mask_bytes"] <= sum(m.numel() for m in out["masks"].values()) // 8 + 64


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_on_two_processes_or_on_one(tmp_path, single):
    ckpt = tmp_path / "state"
    killed = torchrun(WORKER, tmp_path / "never.pt", "--strategy", "fsdp", "--die-at-step", 5,
                      "--checkpoint-dir", ckpt, check=False)
    assert killed.returncode != 0 and "killed before step 6" in killed.stderr
    assert not (tmp_path / "never.pt").exists()
    progress = torch.load(ckpt / "state" / "progress.pt", weights_only=False)
    assert progress["step"] == 4 and progress["processes"] == 2

    torchrun(WORKER, tmp_path / "resumed.pt", "--strategy", "fsdp", "--checkpoint-dir", ckpt,
             "--resume")
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert [h["step"] for h in resumed["history"]] == list(range(1, 7))
    close(resumed["state"], single["state"])
    masks_hold(resumed["state"], resumed["masks"])

    # The same two-process checkpoint, resumed by one process.
    from distributed_worker import run
    state, masks, result, _ = run("single", checkpoint_dir=ckpt, resume=True)
    close(state, single["state"])
    masks_hold(state, masks)


@pytest.mark.slow
def test_the_command_line_trains_as_one_fsdp_job_and_saves_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from distributed_worker import pruned_model
    from pruning.checkpoints import load_pruned, save_pruned
    from pruning.models import get_weight
    from tiny_models import word_tokenizer

    model, result = pruned_model()
    tokenizer = word_tokenizer([f"w{i}" for i in range(40)])
    save_pruned(tmp_path / "pruned", model, tokenizer, result, {"model": "tiny"})
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 40}" for i in range(3000)))
    hybrid_prune = Path(sys.executable).parent / "hybrid-prune"
    torchrun(hybrid_prune, "finetune", "--model", tmp_path / "pruned", "--mode", "masked",
             "--distributed", "fsdp", "--max-steps", 6, "--save", tmp_path / "ft",
             "--data", text, "--ppl-source", text, "--ppl-windows", 2, "--seqlen", 16,
             "--lr", "1e-2")
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["distributed"] == {"strategy": "fsdp", "processes": 2, "backend": "gloo",
                                     "device": "cpu"}
    assert report["finetune"]["steps"] == 6 and set(report["ppl"]) == {"before", "after"}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ft") is not None
    before, after = load_pruned(tmp_path / "pruned"), load_pruned(tmp_path / "ft")
    changed = False
    for name, mask in before.masks.items():
        assert torch.equal(after.masks[name], mask)
        new = get_weight(after.model.get_submodule(name))
        assert not bool(new[~mask].any())
        changed |= not torch.equal(new, get_weight(before.model.get_submodule(name)))
    assert changed


@pytest.mark.slow
def test_accelerate_launch_with_the_example_fsdp_config_shards(tmp_path):
    from distributed_worker import pruned_model
    from pruning.checkpoints import save_pruned
    from tiny_models import word_tokenizer

    model, result = pruned_model()
    save_pruned(tmp_path / "pruned", model, word_tokenizer([f"w{i}" for i in range(40)]),
                result, {"model": "tiny"})
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 40}" for i in range(3000)))
    # The README's config, on this machine's CPU with two processes.
    config = (HERE.parent / "configs" / "accelerate-fsdp.yaml").read_text()
    config = config.replace("num_processes: 8", "num_processes: 2").replace(
        "use_cpu: false", "use_cpu: true")
    (tmp_path / "fsdp.yaml").write_text(config)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
         str(tmp_path / "fsdp.yaml"), "--main_process_port", str(_free_port()), "-m",
         "pruning.cli", "finetune", "--model", str(tmp_path / "pruned"), "--save",
         str(tmp_path / "ft"), "--data", str(text), "--ppl-source", str(text),
         "--ppl-windows", "2", "--seqlen", "16", "--max-steps", "2"],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["distributed"]["strategy"] == "fsdp"
    assert report["distributed"]["processes"] == 2


@pytest.mark.parametrize("args, error, message", [
    (("fsdp", 1, 1, "NO"), ValueError, "needs several processes"),
    (("ddp", 1, 1, "NO"), ValueError, "torchrun --nproc_per_node"),
    (("auto", 2, 1, "NO"), RuntimeError, "accelerate joined 1 of them"),
    (("auto", 2, 2, "DEEPSPEED"), NotImplementedError, "DeepSpeed"),
    (("single", 2, 2, "MULTI_CPU"), ValueError, "2 processes were started"),
    (("zero", 1, 1, "NO"), ValueError, "auto, single, ddp, fsdp"),
])
def test_bad_launches_are_refused_with_the_fix(args, error, message):
    with pytest.raises(error, match=message):
        check_launch(*args)


@pytest.mark.parametrize("args, strategy", [
    (("auto", 1, 1, "NO"), "single"), (("auto", 2, 2, "MULTI_CPU"), "ddp"),
    (("auto", 4, 4, "FSDP"), "fsdp"), (("fsdp", 2, 2, "MULTI_GPU"), "fsdp"),
    (("ddp", 2, 2, "FSDP"), "ddp"),
])
def test_the_strategy_follows_the_launch(args, strategy):
    assert check_launch(*args) == strategy


class FakeShard:
    """What ShardMask reads of a DTensor: ``to_local()``."""

    def __init__(self, local):
        self.local = local

    def to_local(self):
        return self.local


@pytest.mark.parametrize("rows, cols, processes", [(7, 5, 3), (2, 9, 4), (33, 17, 2)])
def test_shard_masks_are_the_rows_each_process_holds_as_bits(rows, cols, processes):
    full = torch.rand(rows, cols) > 0.4
    pieces = []
    for rank, local in enumerate(torch.zeros(rows, cols).tensor_split(
            [min(rows, r * -(-rows // processes)) for r in range(1, processes)])):
        mask = ShardMask(full, FakeShard(local), rank, processes)
        assert mask.nbytes == -(-local.numel() // 8)
        pieces.append(mask.expand())
    assert torch.equal(torch.cat(pieces), full)
    assert torch.equal(ShardMask(full, torch.zeros(rows, cols)).expand(), full)
    with pytest.raises(ValueError, match="does not fit"):
        ShardMask(full, torch.zeros(rows, cols + 1))


def test_a_batch_splits_by_rows_and_refuses_an_uneven_split():
    ids = torch.arange(24).view(4, 6)
    batch = Batch(ids, ids.clone(), torch.ones_like(ids))
    assert torch.equal(split_batch(batch, 1, 2).input_ids, ids[2:])
    with pytest.raises(ValueError, match="multiple of 3"):
        split_batch(batch, 0, 3)
