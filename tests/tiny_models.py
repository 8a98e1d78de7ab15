"""Tiny random Hugging Face causal LMs of several architectures, built from configs offline."""
import torch

VOCAB = 96


def _build(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    return model_cls(config_cls(**kw)).eval()


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return _build(LlamaConfig, LlamaForCausalLM, vocab_size=VOCAB, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)


def mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return _build(MistralConfig, MistralForCausalLM, vocab_size=VOCAB, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, sliding_window=None)


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return _build(Qwen2Config, Qwen2ForCausalLM, vocab_size=VOCAB, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)


def opt():
    from transformers import OPTConfig, OPTForCausalLM
    return _build(OPTConfig, OPTForCausalLM, vocab_size=VOCAB, hidden_size=64, ffn_dim=96,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                  word_embed_proj_dim=64)


def gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    return _build(GPTNeoXConfig, GPTNeoXForCausalLM, vocab_size=VOCAB, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return _build(GPT2Config, GPT2LMHeadModel, vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                  n_positions=128)


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    return _build(MixtralConfig, MixtralForCausalLM, vocab_size=VOCAB, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=128)


def qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    return _build(Qwen2MoeConfig, Qwen2MoeForCausalLM, vocab_size=VOCAB, hidden_size=64,
                  intermediate_size=96, moe_intermediate_size=48,
                  shared_expert_intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                  num_experts_per_tok=2, max_position_embeddings=128)


def qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    return _build(Qwen3MoeConfig, Qwen3MoeForCausalLM, vocab_size=VOCAB, hidden_size=64,
                  intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                  num_experts_per_tok=2, max_position_embeddings=128)


# Mixture-of-experts models (their experts are fused 3-D parameters in this transformers).
MOE_ARCHITECTURES = {"mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe}

ARCHITECTURES = {"llama": llama, "mistral": mistral, "qwen2": qwen2, "opt": opt,
                 "gpt_neox": gpt_neox, "gpt2": gpt2}


def word_tokenizer(words, specials=("[UNK]", "[PAD]", "[EOS]")):
    """A PreTrainedTokenizerFast over a WordLevel vocabulary, words first (in the given order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    for w in list(dict.fromkeys(words)) + list(specials):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[EOS]")


def calibration_ids(nsamples=4, seqlen=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (nsamples, seqlen), generator=g)
