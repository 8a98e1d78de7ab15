"""Recovery: fine-tuning a pruned model without reviving a pruned weight.

data.py turns text or instruction data into training batches; finetune.py trains (masked
weights or LoRA merged and re-masked, LM loss and / or distillation from the dense model);
progressive.py alternates pruning steps with fine-tunes along a schedule; distributed.py says
where a fine-tune runs (one process, DDP or FSDP) and keeps each process's masks.
"""
from .data import Batch, InstructionData, TextData, finetune_data
from .distributed import STRATEGIES, Launch, launch
from .finetune import LOSSES, MODES, FinetuneConfig, FinetuneResult, finetune
from .progressive import RESEARCH_SCHEDULE, ScheduleStep, progressive, read_schedule

__all__ = ["Batch", "TextData", "InstructionData", "finetune_data", "FinetuneConfig",
           "FinetuneResult", "finetune", "MODES", "LOSSES", "ScheduleStep", "RESEARCH_SCHEDULE",
           "read_schedule", "progressive", "STRATEGIES", "Launch", "launch"]
