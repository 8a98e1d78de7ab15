"""Models from anywhere onto any device: hub ids (the loader stands in for the hub), folders,
the device plan and the dtype defaults."""
import pytest
import torch

from pruning import loading
from pruning.loading import default_dtype, device_plan, load_model, looks_like_hub_id


@pytest.fixture
def fake_hub(monkeypatch):
    """from_pretrained records its arguments instead of reaching the hub."""
    calls = []

    def model_from_pretrained(source, **kwargs):
        calls.append(("model", source, kwargs))
        return torch.nn.Linear(2, 2).train()

    def tokenizer_from_pretrained(source, **kwargs):
        calls.append(("tokenizer", source, kwargs))
        return "tokenizer"

    import transformers
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        model_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        tokenizer_from_pretrained)
    return calls


def test_a_hub_id_goes_to_the_hub(fake_hub):
    model, tokenizer, name = load_model("meta-llama/Llama-2-7b-hf")
    assert name == "meta-llama/Llama-2-7b-hf" and tokenizer == "tokenizer"
    assert not model.training
    (_, source, kwargs), (_, tok_source, _) = fake_hub
    assert source == tok_source == "meta-llama/Llama-2-7b-hf"
    assert kwargs == dict(dtype=torch.float32, low_cpu_mem_usage=True, device_map=None)


def test_gpu_loads_bfloat16_straight_onto_the_device(fake_hub):
    load_model("Qwen/Qwen2.5-7B", device="cuda")
    assert fake_hub[0][2] == dict(dtype=torch.bfloat16, low_cpu_mem_usage=True,
                                  device_map="cuda")
    load_model("Qwen/Qwen2.5-7B", device="cuda", offload=True, dtype=torch.float16)
    assert fake_hub[2][2] == dict(dtype=torch.float16, low_cpu_mem_usage=True, device_map=None)
    load_model("Qwen/Qwen2.5-7B", device="cuda", device_map="auto")
    assert fake_hub[4][2]["device_map"] == "auto"


def test_a_local_folder_wins_over_the_hub(fake_hub, tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    load_model(str(folder))
    assert fake_hub[0][1] == str(folder)


@pytest.mark.parametrize("name", ["./does/not/exist", "/abs/missing", "~/nope/model",
                                  "a/b/c", "../model"])
def test_a_missing_path_is_named(name, fake_hub):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_model(name)
    assert fake_hub == []


def test_hub_failures_say_where_it_looked(monkeypatch):
    import transformers

    def offline(source, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(OSError, match="from the hub .*couldn't connect"):
        load_model("facebook/opt-125m")


def test_hub_id_syntax():
    assert looks_like_hub_id("meta-llama/Llama-2-7b-hf") and looks_like_hub_id("gpt2")
    assert looks_like_hub_id("mistralai/Mistral-7B-v0.1")
    for path in ("./x", "/x", "~/x", "a/b/c", "..", "a b/c"):
        assert not looks_like_hub_id(path), path


def test_device_plan():
    assert device_plan() == loading.DevicePlan(None, None, "cpu")
    assert device_plan("cuda") == loading.DevicePlan("cuda", None, "cuda")
    assert device_plan("cuda:1", offload=True) == loading.DevicePlan(None, "cuda:1", "cpu")
    assert device_plan("cuda", device_map="auto").device_map == "auto"
    with pytest.raises(ValueError, match="--offload keeps the model on the CPU"):
        device_plan("cpu", offload=True)
    with pytest.raises(ValueError, match="either --device-map or --offload"):
        device_plan("cuda", offload=True, device_map="auto")


def test_dtype_defaults():
    assert default_dtype(None) is torch.float32 and default_dtype("cpu") is torch.float32
    assert default_dtype("cuda") is torch.bfloat16 and default_dtype("cuda:3") is torch.bfloat16
