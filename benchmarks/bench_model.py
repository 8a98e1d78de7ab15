"""Whole-model speed: greedy-decode and prefill tokens/s, dense vs hybrid, in one run.

A LLaMA-shaped model with random weights (no hub needed): every decoder Linear is pruned to a
tier map drawn from random block scores at the ``--mix`` fractions (the same map for both
sides), then the dense model runs the masked weights with ``F.linear`` and the hybrid model the
packed ones with ``HybridSparseLinear``. Before anything is timed the two models' logits on the
prompt are compared (relative tolerance by dtype). Timed: prefill of ``--prompt`` tokens, and
``generate`` (greedy, KV cache, exactly ``--new-tokens`` tokens) at each batch size; tokens/s =
batch x new tokens / seconds (median of ``--repeats``), the ratio measured side by side.

Eager ``generate`` on a GPU is bound by the host (Python and kernel launches take longer than a
7B model's kernels at batch 1), so on CUDA each batch also gets a ``decode-step`` record: one
greedy step with a static KV cache captured in a CUDA graph (the same for both sides), its
logits checked against a full forward of the prompt and the step's token, then
``--graph-steps`` replays timed with CUDA events:
the models' own time per token. (``--graph-steps`` on the CPU times the eager step instead:
plumbing only.)

  python benchmarks/bench_model.py                         # ~1B shape on the CPU (fp32)
  python benchmarks/bench_model.py --shape llama2-7b --device cuda --batches 1,8,32
  python benchmarks/bench_model.py --shape tiny --batches 1 --new-tokens 4   # seconds
"""
import argparse
import copy
import inspect
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparse_kernels as sk  # noqa: E402
from bench_linear import torch_lowbit_baseline  # noqa: E402
from common import (TIER_MIXES, append_jsonl, relative_error, results_path,  # noqa: E402
                    significant, write_results)
from sparse_kernels.quant import round_to_grid  # noqa: E402
from sparse_kernels.rules import group_size_for  # noqa: E402

# hidden, intermediate, layers, attention heads, key/value heads, vocabulary
SHAPES = {
    "tiny": (256, 704, 2, 4, 4, 1000),
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


@torch.no_grad()
def round_pruned_to_grid(model, maps: dict, bits: int, group_size: int) -> None:
    """Round every pruned Linear's weight to its ``bits`` grid (symmetric, groups of
    ``rules.group_size_for`` its width), in place: the dense side then multiplies exactly the
    values the packed codes stand for."""
    modules = dict(model.named_modules())
    for name in maps:
        weight = modules[name].weight
        grid, _ = round_to_grid(weight.float(), bits, group_size_for(weight.shape[1], group_size))
        weight.copy_(grid.to(weight.dtype))


class TorchLowBitLinear(torch.nn.Module):
    """A Linear through torch's own dense int8 / int4 weight-only CPU kernel (the one torchao
    uses; ``bench_linear.torch_lowbit_baseline``), x cast to bf16 (its fast path) and back."""

    def __init__(self, linear: torch.nn.Linear, bits: int, group_size: int):
        super().__init__()
        baseline, why_not = torch_lowbit_baseline(
            linear.weight, bits, group_size_for(linear.in_features, group_size))
        if baseline is None:
            raise ValueError(why_not)
        self.call, self.nbytes = baseline[1][torch.bfloat16], baseline[2]
        self.bias = linear.bias

    def forward(self, x):
        y = self.call(x.reshape(-1, x.shape[-1]).bfloat16()).to(x.dtype)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias


def torch_lowbit_model(dense, maps: dict, bits: int, group_size: int):
    """A copy of ``dense`` whose pruned Linears run :class:`TorchLowBitLinear`, or ``(None, why
    not)``."""
    if next(dense.parameters()).device.type != "cpu":
        return None, "torch's int4 / int8 weight-only kernels here are the CPU ones"
    model = copy.deepcopy(dense)
    modules = dict(model.named_modules())
    try:
        for name in maps:
            parent, _, child = name.rpartition(".")
            setattr(modules[parent], child, TorchLowBitLinear(modules[name], bits, group_size))
    except ValueError as exc:
        return None, str(exc)
    return model, None


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


@torch.no_grad()
def decode_step_ms(model, ids: torch.Tensor, steps: int) -> tuple[float, float, str]:
    """Milliseconds of one greedy decode step after the prompt ``ids`` [batch, tokens] with a
    static KV cache: replayed from a CUDA graph on a GPU, eager on the CPU. Returns (ms, relative
    error of the step's logits - eager, and replayed from the graph - against the last logits of
    a full forward of the prompt and the step's token, mode)."""
    from transformers import StaticCache

    device = ids.device
    prompt_len = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + 8)
    # transformers renamed past_key_values to cache; older versions place the step by
    # cache_position, newer ones by a counter on the device that each step advances.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    model(ids, use_cache=True, cache_position=torch.arange(prompt_len, device=device),
          **{name: cache})
    counters = [layer.cumulative_length for layer in getattr(cache, "layers", ())
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]
    step_ids = ids[:, -1:].clone()
    position = torch.tensor([prompt_len], device=device)

    def step():  # always the token after the prompt: a replayed graph stays in the cache
        for counter in counters:
            counter.fill_(prompt_len)
        return model(step_ids, use_cache=True, cache_position=position, **{name: cache}).logits

    expected = model(torch.cat([ids, step_ids], dim=1)).logits[:, -1:]
    error = relative_error(step(), expected)
    if device.type != "cuda":
        return 1e3 * timed(step, device, steps), error, "eager"
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch's docs ask
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    error = max(error, relative_error(captured, expected))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / steps, error, "cuda-graph"


def logits_error(dense, hybrid, ids) -> float:
    with torch.no_grad():
        return relative_error(hybrid(ids).logits, dense(ids).logits)


def step_record(dense, hybrid, ids, batch: int, steps: int) -> dict:
    """The ``decode-step`` record of one batch size: both models' step times, side by side."""
    rec = dict(phase="decode-step", batch=batch, tokens=1)
    try:
        d_ms, d_err, mode = decode_step_ms(dense, ids, steps)
        h_ms, h_err, _ = decode_step_ms(hybrid, ids, steps)
    except Exception as exc:  # e.g. a model whose step cannot be captured: say so, go on
        return dict(rec, error=f"{type(exc).__name__}: {exc}", dense_tokens_per_s=0.0,
                    hybrid_tokens_per_s=0.0, speedup=0.0)
    return dict(rec, mode=mode, dense_ms=significant(d_ms), hybrid_ms=significant(h_ms),
                step_logits_error=significant(max(d_err, h_err)),
                dense_tokens_per_s=significant(1e3 * batch / d_ms),
                hybrid_tokens_per_s=significant(1e3 * batch / h_ms),
                speedup=significant(d_ms / h_ms))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="llama-1b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--mix", choices=TIER_MIXES, default="hybrid",
                   help="tier fractions of every Linear (default hybrid: 0.35 / 0.45 / 0.20)")
    p.add_argument("--topk", type=int, default=15)
    p.add_argument("--bits", type=int, choices=(16, 8, 4), default=16,
                   help="precision of the packed values (8 / 4: codes with fp16 group scales; the "
                        "dense side multiplies the same rounded values, and on the CPU a third "
                        "model runs torch's dense int8 / int4 kernel); default 16")
    p.add_argument("--group-size", type=int, default=128,
                   help="preferred quantization group (rules.group_size_for; default 128)")
    p.add_argument("--batches", default="1,8", help="decode batch sizes (default 1,8)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--graph-steps", type=int, default=None,
                   help="decode steps replayed from a CUDA graph per batch (default 100 on cuda, "
                        "0 = none on cpu)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--jsonl", default=None, help="also append each record as it is measured")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    batches = [int(b) for b in args.batches.split(",")]
    graph_steps = args.graph_steps if args.graph_steps is not None else (
        100 if device.type == "cuda" else 0)

    dense = build_model(args.shape, dtype, device)
    maps = prune_randomly(dense, TIER_MIXES[args.mix], args.topk)
    lowbit = None
    if args.bits < 16:
        round_pruned_to_grid(dense, maps, args.bits, args.group_size)
        lowbit, why_not = torch_lowbit_model(dense, maps, args.bits, args.group_size)
        if why_not:
            print(f"(no torch int{args.bits} model: {why_not})")
    hybrid = sk.sparsify_model(copy.deepcopy(dense), maps, topk=args.topk, strict=True,
                               bits=args.bits, group_size=args.group_size)
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
    print(f"{args.shape} {dtype} on {device}: {len(maps)} Linears packed at {args.bits} bits to "
          f"{packed / dense_linear:.3f} of their bytes; logits within {error:.2g} of dense")
    lowbit_fields = {}
    if lowbit is not None:
        lowbit_error = logits_error(dense, lowbit, prompt[:, :32])
        lowbit_bytes = sum(m.nbytes for m in lowbit.modules() if isinstance(m, TorchLowBitLinear))
        lowbit_fields = dict(torch_lowbit_fraction=significant(lowbit_bytes / dense_linear),
                             torch_lowbit_logits_error=lowbit_error)
        print(f"torch int{args.bits} model: {lowbit_bytes / dense_linear:.3f} of the bytes; "
              f"logits within {lowbit_error:.2g} of dense")

    records = []

    def keep(rec):
        records.append(rec)
        append_jsonl(args.jsonl, rec)
        versus = (f", torch int{args.bits} {rec['torch_lowbit_tokens_per_s']:>9.1f} tok/s "
                  f"(hybrid {rec['speedup_vs_torch_lowbit']:.2f}x)"
                  if "torch_lowbit_tokens_per_s" in rec else "")
        print(f"{rec['phase']:8} batch {rec['batch']:>3}: dense {rec['dense_tokens_per_s']:>9.1f} "
              f"tok/s, hybrid {rec['hybrid_tokens_per_s']:>9.1f} tok/s, "
              f"{rec['speedup']:.2f}x{versus}", flush=True)

    def rates(make_call, tokens):
        d = tokens / timed(make_call(dense), device, args.repeats)
        h = tokens / timed(make_call(hybrid), device, args.repeats)
        rec = dict(dense_tokens_per_s=significant(d), hybrid_tokens_per_s=significant(h),
                   speedup=significant(h / d))
        if lowbit is not None:
            t = tokens / timed(make_call(lowbit), device, args.repeats)
            rec.update(torch_lowbit_tokens_per_s=significant(t),
                       speedup_vs_torch_lowbit=significant(h / t))
        return rec

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
            if graph_steps:
                keep(step_record(dense, hybrid, ids, batch, graph_steps))
    suffix = "" if args.bits == 16 else f"int{args.bits}-"
    path = args.out or results_path(device, prefix=f"model-{args.shape}-{suffix}")
    write_results(path, device, records, shape=args.shape, dims=SHAPES[args.shape],
                  dtype=str(dtype).removeprefix("torch."), mix=args.mix,
                  tier_ratios=list(TIER_MIXES[args.mix]), topk=args.topk, bits=args.bits,
                  group_size=args.group_size, **lowbit_fields,
                  packed_fraction=significant(packed / dense_linear), logits_error=error,
                  threads=torch.get_num_threads(),
                  backend=sk.backends.resolve_backend(None, device),
                  command=" ".join(["bench_model.py", *(argv if argv else sys.argv[1:])]))
    print(f"\nwrote {path}")
    return records


if __name__ == "__main__":
    main()
