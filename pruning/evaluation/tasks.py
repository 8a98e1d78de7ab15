"""A zero-shot task that needs no hub: last-word cloze over the held-out embedded text.

``embedded_cloze`` is built LAMBADA-style from the *evaluation* part of the embedded Wikipedia
sample (never seen in calibration): each document is a passage ending in a sentence whose last
word the model must predict from everything before it. lm-eval scores it like
``lambada_openai``: ``acc`` (the target is the model's greedy continuation, token by token) and
``perplexity`` of the target. Unlike LAMBADA, the passages were not filtered by people for
needing the broad context; it measures next-word knowledge of held-out English text, and that
is what pruning damages.

:func:`embedded_task_dir` writes the data (JSONL) and the task YAML into the package cache
once and returns the folder for ``lm-eval``'s ``TaskManager(include_path=...)``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from sparse_kernels.atomic import atomic_file

from ..embedded import cache_root, embedded_text

__all__ = ["EMBEDDED_TASK", "cloze_documents", "embedded_task_dir"]

EMBEDDED_TASK = "embedded_cloze"
TASK_VERSION = 1
MAX_DOCS = 300
CONTEXT_WORDS = 60  # words of passage before the target sentence's last word (at most)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def cloze_documents(text: str, max_docs: int = MAX_DOCS,
                    context_words: int = CONTEXT_WORDS) -> list[dict]:
    """``[{"context": str, "target": " word"}]`` from ``text`` (articles joined by blank
    lines): every sentence of at least 8 words ending in an alphabetic word of 3+ letters
    followed by ``.``, its context the article's text before that word (the last
    ``context_words`` words of it), in the text's order, the first ``max_docs``."""
    docs = []
    for article in text.split("\n\n"):
        words_before: list[str] = []
        for sentence in _SENTENCE_END.split(article.replace("\n", " ")):
            words = sentence.split()
            last = words[-1] if words else ""
            if len(words) >= 8 and last.endswith(".") and _WORD.match(last[:-1]):
                context = words_before + words[:-1]
                docs.append({"context": " ".join(context[-context_words:]),
                             "target": " " + last[:-1]})
                if len(docs) == max_docs:
                    return docs
            words_before += words
    return docs


def _task_yaml(data: Path) -> str:
    return (f"task: {EMBEDDED_TASK}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            "test_split: test\n"
            "output_type: loglikelihood\n"
            'doc_to_text: "{{context}}"\n'
            'doc_to_target: "{{target}}"\n'
            "metric_list:\n"
            "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            f"metadata:\n  version: {TASK_VERSION}\n")


def embedded_task_dir(cache_dir: str | Path | None = None) -> Path:
    """The folder holding ``embedded_cloze.yaml`` and its data, written once (atomically)."""
    folder = (Path(cache_dir) if cache_dir is not None else cache_root()) / \
        f"tasks-v{TASK_VERSION}"
    yaml_path, data = folder / f"{EMBEDDED_TASK}.yaml", folder / f"{EMBEDDED_TASK}.jsonl"
    if not yaml_path.is_file() or not data.is_file():
        docs = cloze_documents(embedded_text("evaluation"))
        with atomic_file(data) as tmp:
            Path(tmp).write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        with atomic_file(yaml_path) as tmp:
            Path(tmp).write_text(_task_yaml(data), encoding="utf-8")
    return folder
