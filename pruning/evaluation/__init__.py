"""Measuring a (pruned) model: perplexity and lm-eval zero-shot accuracy (metrics.py), the
offline embedded cloze task (tasks.py), and the time of one decode step (timing.py)."""
from .metrics import eval_windows, format_zero_shot, perplexity, zero_shot
from .tasks import EMBEDDED_TASK, embedded_task_dir
from .timing import decode_step_ms

__all__ = ["perplexity", "eval_windows", "zero_shot", "format_zero_shot", "EMBEDDED_TASK",
           "embedded_task_dir", "decode_step_ms"]
