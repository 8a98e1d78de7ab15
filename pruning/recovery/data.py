"""What a recovery fine-tune trains on: batches of token ids with the positions the loss counts.

Pruning calibration needs text only; fine-tuning needs the format the model will be used in:

* **plain text** (``"embedded"``, ``"wikitext2"``, ``"c4"``, a ``.txt`` file or folder, a
  ``.jsonl`` without ``fields``): random windows of ``seqlen`` tokens of the train text; the
  loss counts every next-token prediction.
* **instruction data**: each record becomes ``prompt + answer + EOS``; the loss counts the answer
  (and the EOS) only. Built in: ``"squad"`` (context + question -> answer), ``"gsm8k"``
  (question -> worked answer), ``"boolq"`` (passage + question -> yes/no), ``"alpaca"``
  (instruction + input -> output), read from the hub; or a local ``.jsonl`` with a field mapping,
  e.g. ``fields={"prompt": "question", "answer": "reply"}`` (``"context"`` optional).

Batches are drawn by step from a generator seeded with ``(seed, step)``, so a run resumed at a
step sees exactly the batches an uninterrupted run would have.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..calibration import get_tokens, load_dataset_or_explain, require_tokenizer

__all__ = ["Batch", "TextData", "InstructionData", "TEMPLATES", "finetune_data"]

IGNORE = -100  # labels the loss skips (torch's cross_entropy ignore_index)


@dataclass
class Batch:
    """``input_ids [B, L]``, ``labels [B, L]`` (IGNORE where the loss does not count; a label
    is the token itself, the model shifts), ``attention_mask [B, L]`` (0 on padding)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def tokens(self) -> int:
        """Tokens the loss counts (the measure of how much was trained on)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


class TextData:
    """Random ``seqlen`` windows of one token stream (1-D ids)."""

    def __init__(self, ids: torch.Tensor, seqlen: int, batch_size: int, seed: int = 0):
        if ids.numel() <= seqlen:
            raise ValueError(f"the training text has {ids.numel()} tokens, not more than one "
                             f"window of seqlen={seqlen}")
        self.ids, self.seqlen, self.batch_size, self.seed = ids, seqlen, batch_size, seed

    def batch(self, step: int) -> Batch:
        rng = random.Random(f"{self.seed}:{step}")
        starts = [rng.randrange(self.ids.numel() - self.seqlen) for _ in range(self.batch_size)]
        ids = torch.stack([self.ids[s:s + self.seqlen] for s in starts])
        return Batch(ids, ids.clone(), torch.ones_like(ids))


# A template turns a record into (prompt, answer).
TEMPLATES = {
    "squad": lambda r: (f"Context: {r['context']}\nQuestion: {r['question']}\nAnswer:",
                        " " + r["answers"]["text"][0]),
    "gsm8k": lambda r: (f"Question: {r['question']}\nAnswer:", " " + r["answer"]),
    "boolq": lambda r: (f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
                        " yes" if r["answer"] else " no"),
    "alpaca": lambda r: (f"### Instruction:\n{r['instruction']}\n"
                         + (f"### Input:\n{r['input']}\n" if r.get("input") else "")
                         + "### Response:\n", r["output"]),
}
_HUB = {"squad": ("rajpurkar/squad",), "gsm8k": ("openai/gsm8k", "main"),
        "boolq": ("google/boolq",), "alpaca": ("tatsu-lab/alpaca",)}


class InstructionData:
    """``prompt + answer + EOS`` examples, padded to the longest in a batch (at most
    ``seqlen``: longer prompts lose their beginning, the answer is kept)."""

    def __init__(self, pairs: list[tuple[str, str]], tokenizer, seqlen: int, batch_size: int,
                 seed: int = 0):
        if not pairs:
            raise ValueError("the instruction data has no examples")
        self.examples = []
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
        for prompt, answer in pairs:
            p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            a = tokenizer(answer, add_special_tokens=False)["input_ids"] + \
                ([eos] if eos is not None else [])
            a = a[:seqlen - 1]
            p = p[max(0, len(p) - (seqlen - len(a))):]
            self.examples.append((p, a))
        self.pad, self.seqlen, self.batch_size, self.seed = pad, seqlen, batch_size, seed

    def batch(self, step: int) -> Batch:
        rng = random.Random(f"{self.seed}:{step}")
        chosen = [self.examples[rng.randrange(len(self.examples))]
                  for _ in range(self.batch_size)]
        length = max(len(p) + len(a) for p, a in chosen)
        ids = torch.full((len(chosen), length), self.pad, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        mask = torch.zeros_like(ids)
        for row, (p, a) in enumerate(chosen):
            n = len(p) + len(a)
            ids[row, :n] = torch.tensor(p + a)
            labels[row, len(p):n] = torch.tensor(a)
            mask[row, :n] = 1
        return Batch(ids, labels, mask)


def _jsonl_pairs(path: Path, fields: dict) -> list[tuple[str, str]]:
    unknown = set(fields) - {"prompt", "answer", "context"}
    if unknown or not {"prompt", "answer"} <= set(fields):
        raise ValueError(f"fields maps 'prompt' and 'answer' (and optionally 'context') to the "
                         f"JSONL's keys, got {fields}")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        missing = [k for k in fields.values() if k not in record]
        if missing:
            raise ValueError(f"{path}:{number} has no field {missing[0]!r} (fields={fields})")
        prompt = str(record[fields["prompt"]])
        if "context" in fields:
            prompt = f"{record[fields['context']]}\n{prompt}"
        pairs.append((prompt, " " + str(record[fields["answer"]]).lstrip()))
    return pairs


def finetune_data(source, tokenizer, seqlen: int, batch_size: int, seed: int = 0,
                  fields: dict | None = None, max_examples: int | None = None):
    """:class:`TextData` or :class:`InstructionData` for ``source`` (see the module docstring)."""
    require_tokenizer(tokenizer, source)
    name = str(source).strip().lower()
    if name in TEMPLATES:
        data = load_dataset_or_explain(name, *_HUB[name], split="train")
        rows = data if max_examples is None else data.select(range(min(max_examples,
                                                                       len(data))))
        return InstructionData([TEMPLATES[name](r) for r in rows], tokenizer, seqlen,
                               batch_size, seed)
    if fields is not None:
        path = Path(str(source)).expanduser()
        if not path.is_file() or path.suffix.lower() != ".jsonl":
            raise ValueError(f"fields= maps the keys of a local .jsonl file; {source!r} is not one")
        pairs = _jsonl_pairs(path, fields)
        return InstructionData(pairs[:max_examples], tokenizer, seqlen, batch_size, seed)
    return TextData(get_tokens(source, tokenizer, "train"), seqlen, batch_size, seed)
