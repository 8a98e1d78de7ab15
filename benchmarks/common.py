"""What every benchmark shares: timing, the machine's name, and the JSON results file."""
import datetime
import glob
import json
import os
import platform
import re
import statistics
import subprocess
import time

import torch

from sparse_kernels.atomic import atomic_file

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Tier mixes (dense, 2:4, top-K ratios) of bench_linear.py. "all-dense" runs the hybrid kernel
# on dense blocks only: the same bytes as F.linear, so it separates what the kernel gains from
# what the format gains.
TIER_MIXES = {"hybrid": (0.35, 0.45, 0.20), "all-2:4": (0.0, 1.0, 0.0),
              "all-top-K": (0.0, 0.0, 1.0), "all-dense": (1.0, 0.0, 0.0)}


def mix_name(record: dict) -> str:
    """The tier mix of a bench_linear record (older files store only its ratios)."""
    if "mix" in record:
        return record["mix"]
    ratios = tuple(record["tier_ratios"])
    return next((name for name, r in TIER_MIXES.items() if r == ratios), str(ratios))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"model name\s*:\s*(.+)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"{model} x{torch.get_num_threads()} threads"


def cpu_features() -> list[str]:
    """The vector extensions the CPU kernels' speed depends on, as /proc/cpuinfo lists them (a
    CPU model name alone, e.g. a VM's "AMD EPYC", does not say AVX2 from AVX-512)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(re.search(r"flags\s*:\s*(.+)", f.read()).group(1).split())
    except (OSError, AttributeError):
        return []
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_bf16")
    return [f for f in wanted if f in flags]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_last_level_cache_bytes() -> int:
    """The largest CPU cache sysfs reports (Linux), or 0 where it says nothing."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=0)


class CacheFlusher:
    """Evicts the weights from the caches between timed calls, as decode does: a model's layers
    together are far larger than any cache, so each layer's weight arrives from memory. Writing
    a buffer larger than the last-level cache (CPU L3, GPU L2) does it; the write is not timed.
    On the CPU the buffer is twice the largest cache sysfs reports (some of these machines have
    a 480 MiB L3), at least 256 MiB.
    """

    def __init__(self, device: torch.device, nbytes: int | None = None):
        if nbytes is None:
            llc = cpu_last_level_cache_bytes() if device.type == "cpu" else 0
            nbytes = max(256 << 20, 2 * llc)
        self.buffer = torch.empty(nbytes // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buffer.fill_(1.0)


def median_ms(fn, device: torch.device, warmup: int, iters: int, flush=None) -> float:
    """Median wall time of one call of ``fn`` in milliseconds (GPU: CUDA events).

    ``flush``, if given, runs untimed before every timed call (see ``CacheFlusher``).
    """
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if flush is not None:
            flush()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def kernel_ms(fn, device: torch.device, iters: int, flush=None) -> float:
    """GPU time of one call of ``fn`` without the host: CUDA events around a loop of ``iters``
    calls with no synchronisation between them (each after ``flush``, if given), minus the same
    loop of flushes alone, divided by ``iters``. While the GPU runs a flush the host queues the
    next call, so Python and dispatch overhead leave the measurement; CPU: ``median_ms``."""
    if device.type != "cuda":
        return median_ms(fn, device, 1, iters, flush)

    def loop(work) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            work()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def both():
        if flush is not None:
            flush()
        fn()

    loop(both)  # warm: compiles, autotunes, allocations
    flushes = loop(flush) if flush is not None else 0.0
    return max(loop(both) - flushes, 0.0) / iters


def default_backends(device: torch.device) -> list[str]:
    """The backends a benchmark times on ``device`` by default: the compiled ones that natively
    serve it (the pure-torch reference only when there is none)."""
    import sparse_kernels as sk

    return sk.backends.native_backends(device.type) or ["torch"]


def append_jsonl(path: str | None, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path`` (if given) and flush it to disk now: a
    run killed later keeps every record measured before."""
    if path is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|, in fp32 (what every benchmark's output check uses)."""
    got, expected = got.float(), expected.float()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def significant(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits: GPU kernel times are microseconds, so a fixed
    number of decimals in milliseconds would keep too few."""
    return float(f"{value:.{digits}g}")


def results_path(device: torch.device, prefix: str = "") -> str:
    """benchmarks/results/<prefix><device>-<YYYYMMDD>.json"""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()
    day = datetime.date.today().strftime("%Y%m%d")
    return os.path.join(RESULTS_DIR, f"{prefix}{slug}-{day}.json")


def write_results(path: str, device: torch.device, records: list[dict], **extra) -> None:
    """Write ``{device, torch, commit, ..., records}`` atomically."""
    payload = {"device": device_name(device), "cpu_features": cpu_features(),
               "torch": torch.__version__, "commit": git_commit(), **extra, "records": records}
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")


def resumed_records(path: str, settings: dict, resume: bool) -> tuple[list, float | None]:
    """``(records, dense_ppl)`` already in the results file ``path`` when ``resume`` (else
    nothing); a file measured with other ``settings`` (threads aside) cannot be resumed."""
    if not resume or not os.path.exists(path):
        return [], None
    with open(path) as f:
        old = json.load(f)
    if any(old.get(k) != v for k, v in settings.items() if k != "threads"):
        raise SystemExit(f"--resume: {path} was measured with other settings "
                         f"({ {k: old.get(k) for k in settings} }, now {settings})")
    return old["records"], old["dense_ppl"]


def add_prune_run_args(p, nsamples: int) -> None:
    """The arguments every pruning-quality benchmark shares (see :class:`PruneRun`)."""
    p.add_argument("--nsamples", type=int, default=nsamples,
                   help=f"calibration samples (default {nsamples})")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per sample and eval window")
    p.add_argument("--ppl-windows", type=int, default=64,
                   help="last N windows of the held-out text (default 64 = 32k tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")


class PruneRun:
    """A model, its dense weights, calibration samples and held-out perplexity: every pruning
    configuration starts from the same dense weights and the same samples.

    By default the embedded SmolLM2-135M-Instruct, ``nsamples`` x ``seqlen`` samples of the
    embedded text's calibration part, perplexity on the last ``ppl_windows`` windows of its
    held-out part; ``model`` / ``tokenizer`` / ``calibration`` (ids ``[n, seqlen]``) /
    ``eval_text`` replace them (tests use a tiny model).
    """

    def __init__(self, nsamples: int, seqlen: int, ppl_windows: int, seed: int, *, model=None,
                 tokenizer=None, calibration=None, eval_text="embedded"):
        from pruning.calibration import get_calibration
        from pruning.embedded import EMBEDDED_MODEL_NAME, load_embedded_model

        self.name = EMBEDDED_MODEL_NAME if model is None else type(model).__name__
        if model is None:
            model, tokenizer = load_embedded_model()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.dense_state = {k: v.clone() for k, v in model.state_dict().items()}
        self.ids = calibration if calibration is not None else get_calibration(
            "embedded", tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)
        self.seqlen, self.ppl_windows, self.eval_text = seqlen, ppl_windows, eval_text

    def ppl(self) -> float:
        from pruning.evaluation import perplexity

        return perplexity(self.model, self.tokenizer, self.eval_text, seqlen=self.seqlen,
                          max_windows=self.ppl_windows, progress=False)

    def prune(self, **arguments):
        """``(PruneResult, seconds)`` of ``pruning.prune`` from the dense weights."""
        import pruning

        self.model.load_state_dict(self.dense_state)
        t0 = time.perf_counter()
        result = pruning.prune(self.model, self.ids, batch_size=4, progress=False, **arguments)
        return result, time.perf_counter() - t0
