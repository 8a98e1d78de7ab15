"""Evaluation of a (pruned) causal LM: perplexity on held-out text and lm-eval zero-shot tasks.

Perplexity follows Wanda / SparseGPT: the test text tokenized once, cut into non-overlapping
windows of ``seqlen`` tokens (the remainder dropped), ``PPL = exp(mean token NLL)`` over every
predicted token (``seqlen - 1`` per window). ``lm_eval`` is imported only by :func:`zero_shot`.
"""
from __future__ import annotations

import math
import os
from typing import Iterable

import torch
from tqdm.auto import tqdm
import torch.nn.functional as F

from ..calibration import Source, get_tokens
from ..models import logits_of

__all__ = ["perplexity", "eval_windows", "zero_shot", "format_zero_shot"]


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def eval_windows(tokenizer, source: Source = "embedded", seqlen: int = 512,
                 max_windows: int | None = None) -> torch.Tensor:
    """The ``[n, seqlen]`` windows :func:`perplexity` runs: the test text of ``source`` cut into
    non-overlapping windows from its start, the remainder dropped, and of those only the last
    ``max_windows`` when given."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an int >= 2 (one token predicts the next), got {seqlen!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise ValueError(f"max_windows must be a positive int or None, got {max_windows!r}")
    ids = get_tokens(source, tokenizer, "test")
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"the evaluation text of {str(source)!r} has {ids.numel()} tokens, "
                         f"fewer than one window of seqlen={seqlen}")
    windows = ids[: n * seqlen].view(n, seqlen)
    if max_windows is not None:
        windows = windows[-max_windows:]
    return windows


def perplexity(model, tokenizer, source: Source = "embedded", seqlen: int = 512,
               max_windows: int | None = None, batch_size: int = 1, device=None,
               progress: bool = True) -> float:
    """Perplexity of a causal LM on the evaluation text of ``source``.

    ``source``: "embedded" (the held-out part of the embedded Wikipedia sample), "wikitext2" (test
    split), "c4", "ptb", ..., a local .txt/.jsonl file or folder (its whole text), or a 1-D token
    tensor. Works with any model whose ``model(input_ids)`` returns ``.logits``; log-softmax is
    taken in fp32 and the NLL summed in fp64. ``max_windows`` keeps only the last windows (a quick
    run on the end of the text). The model runs in eval mode under ``torch.no_grad()`` and gets
    its training flag back afterwards.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    windows = eval_windows(tokenizer, source, seqlen, max_windows)
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        with torch.no_grad():
            for start in tqdm(range(0, windows.shape[0], batch_size), disable=not progress,
                              desc=f"perplexity ({windows.shape[0]} x {seqlen} tokens)",
                              unit="batch"):
                batch = windows[start:start + batch_size].to(device)
                logits = logits_of(model(batch))[:, :-1, :]
                targets = batch[:, 1:]
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                      targets.reshape(-1), reduction="none")
                total += nll.double().sum().cpu()
                count += targets.numel()
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return float(math.exp(total.item() / count))


_NOT_METRICS = {"alias", "sample_len", "samples", "name", "sample_count"}


def _metric_table(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's ``{"task": {"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}}`` ->
    ``{"task": {"acc": 0.5}}``: numeric metrics (no stderr, no sample count); a filter other than "none" stays in
    the name (``"exact_match,strict-match"``)."""
    table: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name.endswith("_stderr") or name in _NOT_METRICS or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)):
                continue
            row[name if filt in ("", "none") else key] = float(value)
        table[task] = row
    return table


def zero_shot(model, tokenizer, tasks: str | Iterable[str], task_dir: str | os.PathLike | None = None,
              batch_size: int = 4, max_length: int | None = None, limit: int | float | None = None,
              device=None) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy with lm-eval: ``{task: {metric: value}}`` (``acc``, ``acc_norm``,
    ``word_perplexity``, ... whatever the task reports; no stderr, ``bootstrap_iters=0``).

    ``tasks``: a list of task names (or one comma-separated string), e.g. the Wanda set
    ``["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]``
    (these need the Hugging Face hub); ``task_dir``: a folder of local task YAMLs
    (``TaskManager(include_path=task_dir)``). ``device`` moves the model there first (lm-eval uses
    the model's device). ``limit``: documents per task (for quick runs).
    """
    try:
        # optional, heavy: only zero-shot evaluation needs lm-eval
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"zero-shot evaluation uses lm-eval, which is not installed: "
                          f"pip install lm-eval ({err})") from err
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no zero-shot tasks given")
    if device is not None:
        model.to(device)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  max_length=max_length)
        manager = TaskManager(include_path=str(task_dir)) if task_dir is not None else TaskManager()
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=limit,
                                      task_manager=manager, bootstrap_iters=0, log_samples=False)
    finally:
        if was_training:
            model.train()
    if out is None:  # non-zero ranks of a distributed run
        return {}
    return _metric_table(out["results"])


def format_zero_shot(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table of :func:`zero_shot` results: a row per task, ``acc`` and ``acc_norm``
    first, then any other metric a task reports."""
    metrics = ["acc", "acc_norm"]
    for row in results.values():
        metrics += [m for m in row if m not in metrics]
    metrics = [m for m in metrics if any(m in row for row in results.values())]
    lines = ["| task | " + " | ".join(metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for task, row in results.items():
        cells = [f"{row[m]:.4f}" if m in row else "" for m in metrics]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
