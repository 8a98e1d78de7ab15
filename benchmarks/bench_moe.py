"""Mixture-of-experts pruning on tiny random Mixtral / Qwen2-MoE / Qwen3-MoE models: how many
calibration tokens each expert sees, what falls back to magnitude, the coverage, and whether the
packed model generates what the masked one does.

Random weights (no hub here), so the numbers describe the routing and the plumbing, not
accuracy: with random routers the tokens spread over the experts by chance, and a real model's
routers are more uneven (which is what ``min_tokens`` is for).

  python benchmarks/bench_moe.py                      # seconds
  python benchmarks/bench_moe.py --nsamples 4 --seqlen 16 --experts 16
"""
import argparse
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import results_path, write_results  # noqa: E402

VOCAB = 512


def build(arch: str, experts: int):
    """A 2-layer model of ``arch`` with ``experts`` experts, top-2 routing, random weights."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256)
    configs = {
        "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                    dict(intermediate_size=256, num_local_experts=experts)),
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                      dict(intermediate_size=256, moe_intermediate_size=128, num_experts=experts,
                           shared_expert_intermediate_size=256)),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      dict(intermediate_size=256, moe_intermediate_size=128, num_experts=experts,
                           head_dim=32)),
    }
    config_name, model_name, extra = configs[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**common, **extra)
    return getattr(transformers, model_name)(config).eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--min-tokens", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import pruning

    ids = torch.randint(0, VOCAB, (args.nsamples, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    records = []
    for arch in ("mixtral", "qwen2_moe", "qwen3_moe"):
        model = build(arch, args.experts)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = pruning.prune(model, ids, "sparsegpt", "three_tier", budget=0.6,
                                   min_tokens=args.min_tokens, progress=False)
        tokens = {n: t for n, t in result.report["expert_tokens"].items() if ".gate_up." in n}
        prompt = ids[:1, :8]
        with torch.no_grad():
            masked = model.generate(prompt, max_new_tokens=12, do_sample=False)
            result.pack(model)
            packed = model.generate(prompt, max_new_tokens=12, do_sample=False)
        cover = result.report["coverage"]
        rec = {"arch": arch, "experts": args.experts,
               "routed_tokens": args.nsamples * args.seqlen * 2,
               "tokens_per_expert": tokens,
               "tokens_min": min(tokens.values()), "tokens_median":
               statistics.median(tokens.values()), "tokens_max": max(tokens.values()),
               "magnitude_fallback": result.report.get("magnitude_fallback", {}),
               "sparsity_over_decoder_weights": cover["sparsity_over_decoder_weights"],
               "unpruned_weight_fraction": cover["unpruned_weight_fraction"],
               "packed_bytes_fraction": result.report["packed_bytes"]["fraction"],
               "packed_generate_equal": bool(torch.equal(masked, packed)),
               "warnings": [str(w.message) for w in caught if "expert" in str(w.message)]}
        records.append(rec)
        print(f"{arch:10} tokens per expert min {rec['tokens_min']} median "
              f"{rec['tokens_median']} max {rec['tokens_max']} (of "
              f"{rec['routed_tokens']} routed per layer); magnitude fallback "
              f"{len(rec['magnitude_fallback'])}; sparsity over all decoder weights "
              f"{rec['sparsity_over_decoder_weights']:.3f} (left out "
              f"{rec['unpruned_weight_fraction']:.3%}); packed generate equal: "
              f"{rec['packed_generate_equal']}")
        if not rec["packed_generate_equal"]:
            raise SystemExit(f"{arch}: the packed model generates other tokens than the masked")
    path = args.out or results_path(torch.device("cpu"), prefix="moe-")
    write_results(path, torch.device("cpu"), records, nsamples=args.nsamples, seqlen=args.seqlen,
                  min_tokens=args.min_tokens,
                  command=" ".join(["bench_moe.py", *(argv if argv else sys.argv[1:])]))
    print(f"wrote {path}")
    return records


if __name__ == "__main__":
    main()
