"""One fine-tune of a pruned tiny LLaMA, run by tests/test_distributed.py in one process or
under torchrun: ``python distributed_worker.py OUT [--strategy S] [--die-at-step N]
[--checkpoint-dir DIR] [--resume]``. The main process writes OUT (torch.save): the whole
model's state, the masks, the history and the mask bytes."""
import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import pruning  # noqa: E402
from pruning.recovery import FinetuneConfig, TextData, finetune, launch  # noqa: E402
from tiny_models import VOCAB, calibration_ids, llama  # noqa: E402

CONFIG = FinetuneConfig(max_steps=6, lr=2e-3, grad_accum=2, warmup=0.2)


class Dies(Exception):
    pass


class Text(TextData):
    """The repeating text of test_finetune, dying before step ``die_at`` (a kill)."""

    def __init__(self, die_at=None):
        super().__init__(torch.arange(VOCAB - 10).repeat(40), 24, 4, seed=0)
        self.die_at = die_at

    def batch(self, index):
        if self.die_at is not None and index // CONFIG.grad_accum == self.die_at:
            raise Dies(f"killed before step {self.die_at + 1}")
        return super().batch(index)


def pruned_model():
    """``(model, PruneResult)``: the same on every process."""
    model = llama()
    result = pruning.prune(model, calibration_ids(), method="wanda", pattern="three_tier",
                           budget=0.6, ranking="layer", progress=False)
    return model, result


def run(strategy="auto", die_at=None, checkpoint_dir=None, resume=False):
    """``(state dict or None off the main process, masks, result)``."""
    where = launch(strategy)
    model, pruned = pruned_model()
    masks = pruned.masks
    config = dataclasses.replace(CONFIG, checkpoint_every=2 if checkpoint_dir else 0)
    result = finetune(model, Text(die_at), copy.deepcopy(masks), config, launch=where,
                      checkpoint_dir=checkpoint_dir, resume=resume, progress=False)
    if where.strategy == "fsdp":
        state = where.full_state_dict(result.model)
    else:
        state = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    return (state if where.main else None), masks, result, where


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--die-at-step", type=int, default=None)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    state, masks, result, where = run(args.strategy, args.die_at_step, args.checkpoint_dir,
                                      args.resume)
    if where.main:
        torch.save({"state": state, "masks": masks, "history": result.history,
                    "mask_bytes": result.mask_bytes, "launch": where.describe()}, args.out)


if __name__ == "__main__":
    main()
