"""Pruning a LLaMA-2-7B-shaped model on this machine: peak memory and seconds per layer by phase.

Builds (once, into ``--model-dir``, never committed) a LLaMA-2-7B-shaped model with random bf16
weights as safetensors shards (about 13.5 GB), writing one tensor at a time. Then, for each
configuration in its own process (so each peak is its own), loads the whole model in bf16
(``from_pretrained`` maps the files: a weight's pages become resident when it is first read,
and stay evictable file pages until it is replaced), prunes its first ``--layers`` decoder
layers with ``--nsamples`` x ``--seqlen`` random calibration tokens, and records the resident
memory after loading, at its peak and after the prune (own and file pages apart), and the
seconds of each phase per layer (``PruneResult.report["seconds_per_layer"]``). The time of all
32 layers is extrapolated from the layers measured (every layer has the same shapes), and an
H100's time predicted beside it from the FLOPs. ``--memory-cap-gb`` runs each configuration in
a memory cgroup of that size; ``--offload`` prunes with ``offload_dir`` (each pruned layer
written to disk and mapped back). Writes ``benchmarks/results/scale-<device>-<YYYYMMDD>.json``.

  python benchmarks/bench_scale.py                   # 8 layers, 8 x 512 tokens, both configs
  python benchmarks/bench_scale.py --layers 32 --configs sparsegpt-2:4 --offload --memory-cap-gb 8
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import results_path, write_results  # noqa: E402

# LLaMA-2-7B's shapes (its config.json, without the tokenizer).
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
# A shape with the same structure for checking the benchmark's plumbing in seconds.
SHAPES = {"llama2-7b": LLAMA2_7B,
          "tiny": dict(LLAMA2_7B, vocab_size=256, hidden_size=64, intermediate_size=176,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)}
CONFIGS = {
    "sparsegpt-2:4": dict(method="sparsegpt", pattern="2:4"),
    # The byte-budget recipe with each layer's budget its own: ranking="model" adds a forward
    # and backward of the whole unpruned model first, timed apart as "whole_model".
    "recipe-0.62-layer": dict(method="sparsegpt", pattern="three_tier", budget=0.62,
                              ranking="layer"),
}
SHARD_BYTES = 2 << 30
# H100 SXM: dense bf16 tensor-core peak and HBM3 bandwidth (datasheet); SparseGPT's sweep and
# the layer forwards run near a third of the matmul peak in practice (an assumption, stated).
H100_BF16_FLOPS, H100_FP32_FLOPS, H100_EFFICIENCY = 989e12, 67e12, 0.33


def rss_bytes(field: str = "VmRSS") -> int:
    """Resident bytes: ``VmRSS`` (all), ``RssAnon`` (this process's own memory) or ``RssFile``
    (pages of mapped files: the safetensors weights, which the kernel can evict and re-read)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def build_model(folder: Path, shape: dict) -> int:
    """Write the random model into ``folder`` (skipped when complete); returns its bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        return index["metadata"]["total_size"]
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    shards, current, size, total = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, str(folder / f".{name}.writing"), metadata={"format": "pt"})
            os.replace(folder / f".{name}.writing", folder / name)
            shards.append((name, list(current)))
            current, size = {}, 0

    started = time.perf_counter()
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:  # the init LLaMA uses (std 0.02), kept in bf16
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        current[name] = tensor
        size += tensor.numel() * 2
        total += tensor.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    config.save_pretrained(folder)
    weight_map = {t: name for name, tensors in shards for t in tensors}
    index_file.write_text(json.dumps({"metadata": {"total_size": total},
                                      "weight_map": weight_map}, indent=1))
    print(f"built {folder}: {total / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s",
          flush=True)
    return total


def memory_cgroup(limit_bytes: int) -> Path:
    """A new memory cgroup limited to ``limit_bytes`` (cgroup v1's memory controller or v2):
    the process that joins it has its file-backed pages (the mmapped safetensors) evicted and
    read again from disk rather than exceed the limit; anonymous memory beyond it is killed."""
    name = f"bench-scale-{os.getpid()}"
    for root, limit_file in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
                             (Path("/sys/fs/cgroup"), "memory.max")):
        if (root / limit_file).exists() or (root / "cgroup.controllers").exists():
            group = root / name
            try:
                group.mkdir()
                (group / limit_file).write_text(str(limit_bytes))
            except OSError as error:
                raise SystemExit(f"--memory-cap-gb needs a writable memory cgroup: {error}")
            return group
    raise SystemExit("--memory-cap-gb: no memory cgroup on this machine")


def layer_flops(nsamples: int, seqlen: int) -> dict:
    """FLOPs of one LLaMA-2-7B layer: its forward over the calibration tokens, and SparseGPT's
    sweep (per matrix: the Hessian's inverse and its Cholesky factor, about 4 cols^3 / 3, and
    the updates of the later columns, rows x cols^2)."""
    h, f = LLAMA2_7B["hidden_size"], LLAMA2_7B["intermediate_size"]
    tokens = nsamples * seqlen
    params = 4 * h * h + 3 * h * f
    attention = 4 * tokens * seqlen * h  # scores and values, per token
    matrices = [(h, h)] * 4 + [(f, h)] * 2 + [(h, f)]
    sweep = sum(rows * cols * cols + 4 * cols ** 3 / 3 for rows, cols in matrices)
    return {"forward": 2 * tokens * params + attention, "sweep": sweep}


def child(args) -> dict:
    """One configuration in this process: load, prune the first layers, measure."""
    from transformers import AutoModelForCausalLM

    import pruning
    from pruning.models import decoder_layers

    torch.manual_seed(0)
    started = time.perf_counter()
    # No tokenizer: the calibration is token ids. from_pretrained as pruning.loading does it.
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16,
                                                 low_cpu_mem_usage=True).eval()
    load_seconds = time.perf_counter() - started
    after_load = rss_bytes()
    path, layers = decoder_layers(model)
    kept = layers[args.layers:]  # still loaded: the memory is the whole model's
    del layers[args.layers:]
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.nsamples, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    spill = tempfile.mkdtemp(prefix="pruned-layers-", dir=args.model_dir.parent) \
        if args.offload else None
    try:
        started = time.perf_counter()
        result = pruning.prune(model, ids, batch_size=1, progress=True, offload_dir=spill,
                               **CONFIGS[args.child])
        prune_seconds = time.perf_counter() - started
    finally:
        if spill is not None:  # this process's own scratch files
            shutil.rmtree(spill, ignore_errors=True)
    resident = {"anon": rss_bytes("RssAnon"), "file": rss_bytes("RssFile")}
    layers.extend(kept)
    seconds = result.report["seconds_per_layer"]
    per_layer = {phase: sum(t) / len(t) for phase, t in seconds.items() if phase != "whole_model"}
    return {"config": args.child, "prune_args": CONFIGS[args.child],
            "load_seconds": round(load_seconds, 1), "rss_after_load": after_load,
            "peak_rss": peak_rss_bytes(), "rss_after_prune": resident,
            "prune_seconds": round(prune_seconds, 1),
            "seconds_per_layer": seconds,
            "mean_seconds_per_layer": {k: round(v, 2) for k, v in per_layer.items()},
            "whole_model_seconds": seconds.get("whole_model", [0.0])[0],
            "packed_fraction": (result.report.get("packed_bytes") or {}).get("fraction"),
            "sparsity": result.report["sparsity"]}


def h100_prediction(nsamples: int, seqlen: int) -> dict:
    """Seconds per layer on an H100 from the FLOPs (bf16 forward, fp32 sweep)."""
    flops = layer_flops(nsamples, seqlen)
    forward = 2 * flops["forward"] / (H100_BF16_FLOPS * H100_EFFICIENCY)  # statistics + forward
    sweep = flops["sweep"] / (H100_FP32_FLOPS * H100_EFFICIENCY)
    return {"flops_per_layer": flops, "seconds_per_layer": round(forward + sweep, 3),
            "seconds_32_layers": round(32 * (forward + sweep), 1),
            "assumes": f"{H100_EFFICIENCY:.0%} of the bf16 ({H100_BF16_FLOPS / 1e12:.0f} "
                       f"TFLOP/s) and fp32 ({H100_FP32_FLOPS / 1e12:.0f} TFLOP/s) peaks"}


def memory_arithmetic() -> dict:
    """What the README's table states, from the parameter counts: one H100 pruning 70B layer by
    layer, and the FSDP fine-tune's bytes per GPU."""
    params_7b, params_70b = 6_738_415_616, 68_976_648_192  # LLaMA-2-7B and -70B
    layer_70b = 8192 * 8192 * 2 + 8192 * 1024 * 2 + 3 * 8192 * 28672
    gib = 1 << 30
    out = {"prune_70b_on_one_h100": {
        "model_bf16_cpu_gib": round(params_70b * 2 / gib, 1),
        "one_layer_bf16_gpu_gib": round(layer_70b * 2 / gib, 2),
        "largest_hessian_fp32_gib": round(28672 ** 2 * 4 / gib, 2),
        "calibration_activations_128x2048_bf16_gib": round(128 * 2048 * 8192 * 2 * 2 / gib, 2)}}
    for name, params in (("7b", params_7b), ("70b", params_70b)):
        # fp32 weights, fp32 gradients and two fp32 Adam moments: 16 B/param; the masks as
        # bits: 1/8 B/param; all of it sharded over the GPUs (activations not counted).
        per_param = 16 + 1 / 8
        out[f"fsdp_finetune_{name}"] = {
            f"{gpus}_gpus_gib_per_gpu": round(params * per_param / gpus / gib, 1)
            for gpus in (1, 2, 4, 8, 16)}
        out[f"fsdp_finetune_{name}"]["bool_masks_unsharded_gib"] = round(params / gib, 1)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/llama2-7b-random"),
                   help="where the random model is built (and reused)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers pruned (of 32)")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: "
                   + ", ".join(CONFIGS))
    p.add_argument("--offload", action="store_true",
                   help="prune with offload_dir: each pruned layer written to disk and mapped "
                        "back (a scratch folder beside --model-dir, removed after)")
    p.add_argument("--memory-cap-gb", type=float, default=None,
                   help="run each configuration in a memory cgroup of this size (the model's "
                        "pages then stream from disk)")
    p.add_argument("--shape", choices=SHAPES, default="llama2-7b",
                   help="tiny: the same structure in kilobytes, to check the benchmark")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    shape = SHAPES[args.shape]
    if not 1 <= args.layers <= shape["num_hidden_layers"]:
        raise SystemExit(f"--layers must be 1..{shape['num_hidden_layers']}, got {args.layers}")
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown --configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    model_bytes = build_model(args.model_dir, shape)
    device = torch.device("cpu")
    path = args.out or results_path(device, "scale-")
    records, failed = [], []
    for name in args.configs.split(","):
        record = run_configuration(name, args, shape, model_bytes)
        records.append(record)
        failed += [name] if "failed" in record else []
        # Written after every configuration: a later one that fails loses nothing before it.
        write_results(path, device, records, model=f"{args.shape} shape, random bf16 weights",
                      model_bytes=model_bytes, nsamples=args.nsamples, seqlen=args.seqlen,
                      layers=args.layers,
                      memory_gib=round(os.sysconf("SC_PAGE_SIZE")
                                       * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                      h100_prediction=h100_prediction(args.nsamples, args.seqlen),
                      memory_arithmetic=memory_arithmetic())
    print(f"wrote {path}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (recorded in {path})")


def run_configuration(name: str, args, shape: dict, model_bytes: int) -> dict:
    """One configuration in its own process (in a memory cgroup with ``--memory-cap-gb``): its
    record, or ``{"config", "failed": exit status, "seconds"}`` when the process died (a
    negative status is the signal: -9 is the cgroup's out-of-memory kill)."""
    command = [sys.executable, __file__, "--child", name, "--model-dir", str(args.model_dir),
               "--layers", str(args.layers), "--nsamples", str(args.nsamples),
               "--seqlen", str(args.seqlen), "--shape", args.shape] + \
        (["--offload"] if args.offload else [])
    group = memory_cgroup(int(args.memory_cap_gb * 1e9)) if args.memory_cap_gb else None
    started = time.perf_counter()
    try:
        run = subprocess.run(command, stdout=subprocess.PIPE, text=True, preexec_fn=None
                             if group is None else lambda: (group / "cgroup.procs")
                             .write_text(str(os.getpid())))
    finally:
        if group is not None:
            group.rmdir()
    settings = dict(memory_cap_gb=args.memory_cap_gb, offload=args.offload, layers=args.layers)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        print(f"{name}: the pruning process failed ({run.returncode})", flush=True)
        return {"config": name, "failed": run.returncode,
                "seconds": round(time.perf_counter() - started, 1), **settings}
    record = json.loads(lines[-1][len("RESULT "):])
    record.update(settings)
    per_layer = sum(record["mean_seconds_per_layer"].values())
    # The whole-model pass before the first layer ran over the layers kept: it scales too.
    scale = shape["num_hidden_layers"] / args.layers
    record["extrapolated_all_layers_seconds"] = round(
        scale * record["whole_model_seconds"] + shape["num_hidden_layers"] * per_layer, 1)
    record["peak_over_model_gb"] = round((record["peak_rss"] - model_bytes) / 1e9, 2)
    print(f"{name}: load {record['load_seconds']} s, RSS after load "
          f"{record['rss_after_load'] / 1e9:.2f} GB, peak {record['peak_rss'] / 1e9:.2f} GB "
          f"(model {model_bytes / 1e9:.2f} GB + {record['peak_over_model_gb']} GB); "
          f"per layer {per_layer:.1f} s {record['mean_seconds_per_layer']}; all "
          f"{shape['num_hidden_layers']} layers ~"
          f"{record['extrapolated_all_layers_seconds'] / 60:.1f} min", flush=True)
    return record

if __name__ == "__main__":
    main()
