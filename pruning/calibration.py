"""Calibration and evaluation text: where it comes from, and random token windows of it.

Sources (``source`` argument of :func:`get_calibration` / :func:`load_text`):

=============================  ===============================================================
``"embedded"``                 the Wikipedia sample shipped with gensim (:mod:`pruning.embedded`):
                               train = its "calibration" part, test = its held-out "evaluation"
                               part. Works offline.
``"wikitext2"``                hub ``wikitext`` / ``wikitext-2-raw-v1``; train split joined with
                               ``" "`` (as Wanda), test split joined with ``"\\n\\n"``.
``"c4"``                       hub ``allenai/c4``, en shard 0. Calibration follows Wanda: a random
                               document longer than ``seqlen`` tokens, a random window of it, per
                               sample. Test text: the first 1,100 validation documents joined
                               with ``" "`` (Wanda); train text: the first 1,100 train documents.
``"ptb"``                      hub ``ptb_text_only``, field ``sentence``, joined with ``" "``.
``"squad"``                    hub ``rajpurkar/squad`` (test = validation split), in one of three
                               formats: ``"squad"`` / ``"squad:context"`` (the distinct contexts),
                               ``"squad:context_question"`` (context + " " + question),
                               ``"squad:qa"`` ("Context: ...\\nQuestion: ...").
``"gsm8k"``                    hub ``openai/gsm8k`` ``main``: question + "\\n" + answer.
a path                         a ``.txt`` file, a ``.jsonl`` file (field ``text``, else the first
                               string field of each record) or a folder of such files (recursive,
                               sorted); the same text serves train and test.
a mixture                      ``"wikitext2:0.5,embedded:0.5"`` or ``{source: weight}``: samples
                               are split across the sources in proportion to the weights
                               (largest remainder, so they add up to ``nsamples``).
a LongTensor                   ``[nsamples, seqlen]`` token ids: returned as they are.
=============================  ===============================================================

Names are matched first (a folder called ``c4`` in the working directory is reached as ``./c4``).
Documents are joined with ``"\\n\\n"`` unless said otherwise. Hub sources go through
``datasets.load_dataset`` (``pip install datasets``), imported only when one is asked for.
"""
from __future__ import annotations

import json
import math
import os
import random
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Union

import torch

from . import embedded

Source = Union[str, os.PathLike, Mapping, torch.Tensor]

HUB_SOURCES = ("wikitext2", "c4", "ptb", "squad", "squad:context", "squad:context_question",
               "squad:qa", "gsm8k")
NAMED_SOURCES = ("embedded",) + HUB_SOURCES
_ALIASES = {
    "embedded": "embedded", "wiki": "embedded", "enwiki": "embedded",
    "wikitext2": "wikitext2", "wikitext": "wikitext2", "wikitext-2": "wikitext2",
    "wikitext-2-raw-v1": "wikitext2",
    "c4": "c4", "allenai/c4": "c4",
    "ptb": "ptb", "ptb_text_only": "ptb",
    "squad": "squad:context", "squad:context": "squad:context",
    "squad:context_question": "squad:context_question", "squad:qa": "squad:qa",
    "rajpurkar/squad": "squad:context",
    "gsm8k": "gsm8k", "openai/gsm8k": "gsm8k",
}
_LOCAL_SUFFIXES = (".txt", ".jsonl")
_C4_TEXT_DOCS = 1100  # Wanda's C4 evaluation text: the first 1,100 validation documents
_SPLITS = {"train": "train", "calibration": "train",
           "test": "test", "evaluation": "test", "eval": "test", "validation": "test"}

_TOKEN_CACHE: "OrderedDict[tuple, tuple[object, torch.Tensor]]" = OrderedDict()
_TOKEN_CACHE_SIZE = 8


def _choices() -> str:
    return (", ".join(repr(s) for s in NAMED_SOURCES)
            + ", a .txt/.jsonl file or a folder of them, a mixture such as "
              "'wikitext2:0.5,embedded:0.5' or {source: weight}, or a LongTensor [nsamples, seqlen]")


def _split(split: str) -> str:
    try:
        return _SPLITS[split]
    except KeyError:
        raise ValueError(f"split must be 'train' or 'test' (or 'calibration'/'evaluation'/"
                         f"'validation'), got {split!r}") from None


# ------------------------------------------------------------------------ source resolution
def _looks_like_path(s: str) -> bool:
    return (s.lower().endswith(_LOCAL_SUFFIXES + (".json",)) or s.startswith(("~", "."))
            or os.sep in s or "/" in s or (os.altsep is not None and os.altsep in s))


def _parse_mixture(s: str) -> dict[str, float] | None:
    """``"a:0.5,b:0.5"`` -> {"a": 0.5, "b": 0.5}; None when ``s`` is not a mixture. A part
    without a weight counts 1."""
    parts = [p.strip() for p in s.split(",")]
    if len(parts) == 1:
        name, sep, weight = s.rpartition(":")
        if not sep or not _is_float(weight):
            return None
    mixture: dict[str, float] = {}
    for part in parts:
        if not part:
            raise ValueError(f"empty part in the mixture {s!r}")
        name, sep, weight = part.rpartition(":")
        if sep and _is_float(weight):
            w = float(weight)
        else:
            name, w = part, 1.0
        mixture[name.strip()] = mixture.get(name.strip(), 0.0) + w
    return mixture


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _resolve(source) -> tuple[str, object]:
    """-> ("tensor", t) | ("mixture", {src: w}) | ("local", Path) | ("named", canonical name)."""
    if isinstance(source, torch.Tensor):
        return "tensor", source
    if isinstance(source, Mapping):
        return "mixture", dict(source)
    if isinstance(source, os.PathLike):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"calibration source not found: {str(source)!r}")
        return "local", path
    if not isinstance(source, str):
        raise TypeError(f"source must be a string, a path, a dict or a LongTensor, "
                        f"got {type(source).__name__}")
    name = _ALIASES.get(source.strip().lower())
    if name is not None:  # a source name wins over a same-named file in the working directory
        return "named", name
    path = Path(source).expanduser()
    if source and path.exists():
        return "local", path
    mixture = _parse_mixture(source)
    if mixture is not None:
        return "mixture", mixture
    if _looks_like_path(source):
        raise FileNotFoundError(f"calibration source not found: no file or folder {source!r}")
    raise ValueError(f"unknown calibration source {source!r}; choose one of {_choices()}")


# ------------------------------------------------------------------------------- raw text
def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _LOCAL_SUFFIXES)
    if not files:
        raise ValueError(f"no .txt or .jsonl files in the folder {str(path)!r}")
    return files


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
            if isinstance(record, str):
                texts.append(record)
            elif isinstance(record, dict):
                if isinstance(record.get("text"), str):
                    texts.append(record["text"])
                else:
                    first = next((v for v in record.values() if isinstance(v, str)), None)
                    if first is not None:
                        texts.append(first)
    if not texts:
        raise ValueError(f"{path}: no record with a string field")
    return texts


def _local_text(path: Path) -> str:
    parts = []
    for file in _local_files(path):
        if file.suffix.lower() == ".jsonl":
            parts.append("\n\n".join(_jsonl_texts(file)))
        else:
            parts.append(file.read_text(encoding="utf-8"))
    return "\n\n".join(parts)


def load_dataset_or_explain(source: str, *args, **kwargs):
    """``datasets.load_dataset`` with errors that say what went wrong and what to do."""
    try:
        # optional (the hub's text sets), heavy: imported when used
        import datasets
    except ImportError as err:
        raise ImportError(f"source {source!r} is read with the datasets library, which is not "
                          f"installed: pip install datasets") from err
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # offline, missing dataset, removed loading script, ...
        call = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
        raise RuntimeError(
            f"source {source!r} needs the Hugging Face hub "
            f"(datasets.load_dataset({call})) and could not be loaded: "
            f"{type(err).__name__}: {err}. Without hub access, pass a local copy of the text as a "
            f"file path (.txt, .jsonl, or a folder of them), or use source='embedded'.") from err


def _c4(split: str):
    if split == "train":
        return load_dataset_or_explain("c4", "allenai/c4",
                             data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                             split="train")
    return load_dataset_or_explain("c4", "allenai/c4",
                         data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                         split="validation")


def _named_text(name: str, split: str) -> str:
    if name == "embedded":
        return embedded.embedded_text("calibration" if split == "train" else "evaluation")
    if name == "wikitext2":
        data = load_dataset_or_explain(name, "wikitext", "wikitext-2-raw-v1", split=split)
        return (" " if split == "train" else "\n\n").join(data["text"])
    if name == "c4":
        data = _c4(split)
        return " ".join(data[:_C4_TEXT_DOCS]["text"])
    if name == "ptb":
        data = load_dataset_or_explain(name, "ptb_text_only", "penn_treebank", split=split)
        return " ".join(data["sentence"])
    if name.startswith("squad"):
        data = load_dataset_or_explain(name, "rajpurkar/squad",
                             split="train" if split == "train" else "validation")
        if name == "squad:context":
            return "\n\n".join(dict.fromkeys(data["context"]))  # distinct, in order
        if name == "squad:context_question":
            return "\n\n".join(f"{c} {q}" for c, q in zip(data["context"], data["question"]))
        return "\n\n".join(f"Context: {c}\nQuestion: {q}"
                           for c, q in zip(data["context"], data["question"]))
    if name == "gsm8k":
        data = load_dataset_or_explain(name, "openai/gsm8k", "main", split=split)
        return "\n\n".join(f"{q}\n{a}" for q, a in zip(data["question"], data["answer"]))
    raise ValueError(f"unknown calibration source {name!r}; choose one of {_choices()}")


def load_text(source: str, split: str = "train") -> str:
    """The raw text of one source: ``split`` "train" (calibration) or "test" (evaluation)."""
    split = _split(split)
    kind, value = _resolve(source)
    if kind == "local":
        return _local_text(value)
    if kind == "named":
        return _named_text(value, split)
    if kind == "mixture":
        raise ValueError(f"load_text takes one source, not the mixture {source!r}")
    raise TypeError("load_text takes a source name or a path, not a tensor")


# ------------------------------------------------------------------------------- tokens
def _tokenizer_key(tokenizer) -> tuple:
    name = getattr(tokenizer, "name_or_path", "") or ""
    try:
        size = len(tokenizer)
    except TypeError:
        size = None
    # A tokenizer without a name is only known by its identity (checked with a weak reference).
    return (type(tokenizer).__name__, name, size, None if name else id(tokenizer))


def _source_key(kind: str, value) -> tuple:
    if kind == "local":
        files = _local_files(value)
        return ("local", str(value.resolve()),
                tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    return (kind, value)


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D LongTensor (special tokens as the tokenizer adds them,
    the way Wanda tokenizes its joined text)."""
    try:
        out = tokenizer(text, return_attention_mask=False, verbose=False)
    except TypeError:  # a tokenizer-like callable without those keywords
        out = tokenizer(text)
    ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out
    ids = torch.as_tensor(ids, dtype=torch.long)
    return ids.reshape(-1)


def require_tokenizer(tokenizer, source) -> None:
    """Text needs the model's own tokenizer: ``ValueError`` naming what to pass when it is None."""
    if tokenizer is None:
        raise ValueError(
            f"the text of {str(source)!r} needs the model's tokenizer (tokenizer=...; for the "
            f"embedded model pruning.embedded.load_embedded_tokenizer()), or pass token ids")


def get_tokens(source: Source = "embedded", tokenizer=None, split: str = "train") -> torch.Tensor:
    """The whole token stream of one source's train or test text, a 1-D LongTensor.

    Tokenized once per (source, split, tokenizer) and kept in memory (a few recent ones). A
    tensor source is flattened and returned."""
    split = _split(split)
    kind, value = _resolve(source)
    if kind == "tensor":
        _check_ids(value, dims=(1, 2))
        return value.reshape(-1).long()
    if kind == "mixture":
        raise ValueError(f"a mixture has no single token stream: {source!r}")
    require_tokenizer(tokenizer, source)
    tok_key = _tokenizer_key(tokenizer)
    key = (_source_key(kind, value), split, tok_key)
    hit = _TOKEN_CACHE.get(key)
    if hit is not None and (tok_key[-1] is None or hit[0]() is tokenizer):
        _TOKEN_CACHE.move_to_end(key)
        return hit[1]
    text = _local_text(value) if kind == "local" else _named_text(value, split)
    ids = tokenize(text, tokenizer)
    _TOKEN_CACHE[key] = (_weak(tokenizer), ids)
    while len(_TOKEN_CACHE) > _TOKEN_CACHE_SIZE:
        _TOKEN_CACHE.popitem(last=False)
    return ids


def _weak(obj):
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: None


def _check_ids(t: torch.Tensor, dims=(2,)) -> None:
    if t.dim() not in dims:
        raise ValueError(f"token ids must be a {' or '.join(f'{d}-D' for d in dims)} tensor, "
                         f"got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"token ids must have an integer dtype, got {t.dtype}")


# ------------------------------------------------------------------------------ sampling
def _windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    """Wanda's rule: ``nsamples`` windows of ``seqlen`` tokens, each starting at
    ``random.Random(seed).randint(0, len - seqlen - 1)``."""
    n = ids.numel()
    if n < seqlen + 1:
        raise ValueError(f"{what} has {n} tokens; windows of seqlen={seqlen} need at least "
                         f"{seqlen + 1}")
    rng = random.Random(seed)
    out = torch.empty(nsamples, seqlen, dtype=torch.long)
    for k in range(nsamples):
        i = rng.randint(0, n - seqlen - 1)
        out[k] = ids[i:i + seqlen]
    return out


def _c4_windows(tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Wanda's C4 rule: per sample, random documents until one has more than ``seqlen`` tokens,
    then a random window of it."""
    data = _c4("train")
    rng = random.Random(seed)
    out = torch.empty(nsamples, seqlen, dtype=torch.long)
    max_tries = 1000 + 100 * nsamples
    tries = 0
    for k in range(nsamples):
        while True:
            tries += 1
            if tries > max_tries:
                raise ValueError(f"c4: found no document longer than seqlen={seqlen} tokens in "
                                 f"{max_tries} random draws")
            doc = tokenize(data[rng.randint(0, len(data) - 1)]["text"], tokenizer)
            if doc.numel() > seqlen:
                break
        i = rng.randint(0, doc.numel() - seqlen - 1)
        out[k] = doc[i:i + seqlen]
    return out


def _apportion(nsamples: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of ``nsamples`` in proportion to ``weights`` (ties: first wins)."""
    total = sum(weights)
    quotas = [nsamples * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:nsamples - sum(counts)]:
        counts[i] += 1
    return counts


def mixture_counts(mixture: Mapping, nsamples: int) -> dict:
    """How many of ``nsamples`` each source of a mixture gets."""
    names = list(mixture)
    weights = [float(mixture[n]) for n in names]
    if not names:
        raise ValueError("empty calibration mixture")
    bad = [(n, w) for n, w in zip(names, weights) if not (w >= 0 and math.isfinite(w))]
    if bad or sum(weights) <= 0:
        raise ValueError(f"mixture weights must be non-negative and finite with a positive sum, "
                         f"got {dict(zip(names, weights))}")
    return dict(zip(names, _apportion(nsamples, weights)))


def get_calibration(source: Source = "embedded", tokenizer=None, nsamples: int = 128,
                    seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """Calibration samples: a LongTensor ``[nsamples, seqlen]`` of random windows of a source's
    training text (see the module docstring for the sources).

    The text is tokenized once (kept in memory per source and tokenizer), then ``nsamples``
    windows are drawn with ``random.Random(seed)``, each starting in ``[0, len - seqlen - 1]``
    (Wanda's rule). A mixture gives each source its share of the samples (largest remainder),
    each drawn with the same seed rule, concatenated in the mixture's order. Text sources need
    the model's ``tokenizer`` (token ids of another tokenizer would be wrong input); a tensor
    source is token ids already.
    """
    kind, value = _resolve(source)
    if kind == "tensor":
        _check_ids(value)
        return value if value.dtype == torch.long else value.long()
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 0:
        raise ValueError(f"nsamples must be a non-negative int, got {nsamples!r}")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"seqlen must be a positive int, got {seqlen!r}")
    require_tokenizer(tokenizer, source)
    if kind == "mixture":
        counts = mixture_counts(value, nsamples)
        parts = [get_calibration(src, tokenizer, n, seqlen, seed)
                 for src, n in counts.items() if n > 0]
        return torch.cat(parts) if parts else torch.empty(0, seqlen, dtype=torch.long)
    if kind == "named" and value == "c4":
        return _c4_windows(tokenizer, nsamples, seqlen, seed)
    ids = get_tokens(source, tokenizer, "train")
    what = f"the training text of {str(source)!r}"
    return _windows(ids, nsamples, seqlen, seed, what)


def calibration_ids(calibration, tokenizer=None, nsamples: int = 128, seqlen: int = 2048,
                    seed: int = 0) -> torch.Tensor:
    """Token ids ``[nsamples, seqlen]`` for a prune: ``calibration`` itself when it is already
    an integer tensor ``[n, seqlen]``, else :func:`get_calibration` of that source."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype.is_floating_point:
            raise ValueError(f"calibration token ids must be an integer tensor [nsamples, seqlen],"
                             f" got {calibration.dtype} {tuple(calibration.shape)}")
        return calibration
    if tokenizer is None:
        raise ValueError(f"calibration source {calibration!r} needs a tokenizer= to turn its text "
                         "into token ids (or pass token ids [nsamples, seqlen] directly)")
    return get_calibration(calibration, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)
