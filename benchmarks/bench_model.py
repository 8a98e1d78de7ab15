"""Whole-model speed: greedy-decode and prefill tokens/s, dense vs hybrid, in one run.

A LLaMA-shaped model with random weights (no hub needed): every decoder Linear is pruned to a
tier map drawn from random block scores at the ``--mix`` fractions (the same map for both
sides), then the dense model runs the masked weights with ``F.linear`` and the hybrid model the
packed ones with ``HybridSparseLinear``. Before anything is timed the two models' logits on the
prompt are compared (relative tolerance by dtype). Timed: prefill of ``--prompt`` tokens, and
``generate`` (greedy, KV cache, exactly ``--new-tokens`` tokens) at each batch size; tokens/s =
batch x new tokens / seconds (median of ``--repeats``), the ratio measured side by side.

  python benchmarks/bench_model.py                         # ~1B shape on the CPU (fp32)
  python benchmarks/bench_model.py --shape llama2-7b --device cuda --batches 1,8,32
  python benchmarks/bench_model.py --shape tiny --batches 1 --new-tokens 4   # seconds
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparse_kernels as sk  # noqa: E402
from common import TIER_MIXES, append_jsonl, results_path, significant, write_results  # noqa: E402

# hidden, intermediate, layers, attention heads, key/value heads, vocabulary
SHAPES = {
    "tiny": (256, 688, 2, 4, 4, 1000),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),     # the embedded model's shapes
    "llama-1b": (2048, 5632, 22, 32, 4, 32000),       # TinyLlama-1.1B
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}


def build_model(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=4096)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


@torch.no_grad()
def prune_randomly(model, ratios, topk: int, block_size: int = 16, seed: int = 0) -> dict:
    """Prune every decoder Linear to a tier map from random block scores; ``{name: map}``."""
    g = torch.Generator().manual_seed(seed)
    maps = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".layers." not in name:
            continue
        out_f, in_f = module.weight.shape
        scores = torch.rand(out_f // block_size, in_f // block_size, generator=g)
        tiers = sk.assign_tiers(scores, ratios)
        weight = module.weight
        module.weight.copy_(sk.apply_tier_map(weight, tiers.to(weight.device), topk,
                                              block_size, scores=weight.float().abs()))
        maps[name] = tiers
    return maps


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def logits_error(dense, hybrid, ids) -> float:
    with torch.no_grad():
        expected = dense(ids).logits.float()
        got = hybrid(ids).logits.float()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="llama-1b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--mix", choices=TIER_MIXES, default="hybrid",
                   help="tier fractions of every Linear (default hybrid: 0.35 / 0.45 / 0.20)")
    p.add_argument("--topk", type=int, default=15)
    p.add_argument("--batches", default="1,8", help="decode batch sizes (default 1,8)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--jsonl", default=None, help="also append each record as it is measured")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    batches = [int(b) for b in args.batches.split(",")]

    dense = build_model(args.shape, dtype, device)
    maps = prune_randomly(dense, TIER_MIXES[args.mix], args.topk)
    hybrid = sk.sparsify_model(copy.deepcopy(dense), maps, topk=args.topk, strict=True)
    vocab = dense.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    error = logits_error(dense, hybrid, prompt[:, :32])
    if error > TOLERANCE[dtype]:
        raise SystemExit(f"the hybrid model's logits differ from the dense model's by {error:.3g} "
                         f"(tolerance {TOLERANCE[dtype]}): nothing timed")
    weights = [m.hybrid_weight for m in hybrid.modules() if isinstance(m, sk.HybridSparseLinear)]
    packed = sum(w.nbytes for w in weights)
    dense_linear = sum(w.dense_nbytes for w in weights)
    print(f"{args.shape} {dtype} on {device}: {len(maps)} Linears packed to "
          f"{packed / dense_linear:.3f} of their bytes; logits within {error:.2g} of dense")

    records = []

    def keep(rec):
        records.append(rec)
        append_jsonl(args.jsonl, rec)
        print(f"{rec['phase']:8} batch {rec['batch']:>3}: dense {rec['dense_tokens_per_s']:>9.1f} "
              f"tok/s, hybrid {rec['hybrid_tokens_per_s']:>9.1f} tok/s, "
              f"{rec['speedup']:.2f}x", flush=True)

    def rates(make_call, tokens):
        d = tokens / timed(make_call(dense), device, args.repeats)
        h = tokens / timed(make_call(hybrid), device, args.repeats)
        return dict(dense_tokens_per_s=significant(d), hybrid_tokens_per_s=significant(h),
                    speedup=significant(h / d))

    with torch.no_grad():
        keep(dict(phase="prefill", batch=1, tokens=args.prompt,
                  **rates(lambda m: lambda: m(prompt, use_cache=False), args.prompt)))
        for batch in batches:
            ids = prompt[:, :16].expand(batch, -1).contiguous()

            def generate(m, ids=ids):
                return lambda: m.generate(ids, max_new_tokens=args.new_tokens,
                                          min_new_tokens=args.new_tokens, do_sample=False,
                                          pad_token_id=0)
            keep(dict(phase="decode", batch=batch, tokens=args.new_tokens,
                      **rates(generate, batch * args.new_tokens)))
    path = args.out or results_path(device, prefix=f"model-{args.shape}-")
    write_results(path, device, records, shape=args.shape, dims=SHAPES[args.shape],
                  dtype=str(dtype).removeprefix("torch."), mix=args.mix,
                  tier_ratios=list(TIER_MIXES[args.mix]), topk=args.topk,
                  packed_fraction=significant(packed / dense_linear), logits_error=error,
                  threads=torch.get_num_threads(),
                  backend=sk.backends.resolve_backend(None, device),
                  command=" ".join(["bench_model.py", *(argv if argv else sys.argv[1:])]))
    print(f"\nwrote {path}")
    return records


if __name__ == "__main__":
    main()
