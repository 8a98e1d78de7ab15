"""The GPU check: everything only a GPU can tell, most valuable first, within one call of a lent
GPU machine (one command of at most 10 minutes, at most 8 files back from its output folder,
``python3``, no package index). Started by ``benchmarks/gpu_check.sh``:

  bash benchmarks/gpu_check.sh OUT_DIR [--deadline-s 540]
  bash benchmarks/gpu_check.sh --dry-run OUT_DIR       every step on the CPU at tiny sizes

Steps, in order of value, each in its own process (a fault in one cannot take another's numbers):
environment -> build for this GPU only -> backends (the CUDA ops registered, or every CUDA step
skipped with the reason) -> smoke (the CUDA kernels' outputs) -> decode v2, then v1 (three
LLaMA-2-7B shapes, batch 1 and 16, against cuBLAS and torch's 2:4) -> int4 / int8 values decoded
by Triton (against cuBLAS fp16) -> the CUDA kernel tests ->
compute-sanitizer -> one ncu reading of v2 -> Triton decode -> prefill 2048 -> whole-model
decode tokens/s -> pruning kernels.

**One deadline** for the whole run: a step gets the smaller of its own cap and the time left
before the deadline less a reserve for the summary; a step that runs out is killed and recorded
as ``cut``, one that no time is left for is recorded as ``cut`` without running, and the run goes
on. OUT_DIR holds at most six files, each appended and flushed as it is measured:

  env.json        versions, GPU, nvcc, build target, copy bandwidth, backends, CUDA ops
  steps.jsonl     one line per step: status ok | failed | cut | skipped, exit, seconds, limit, why
  kernels.jsonl   kernel records: smoke checks, bench_linear rows, sanitizer, ncu, pruning kernels
  model.jsonl     whole-model tokens/s (bench_model.py)
  tests.txt       pytest and compute-sanitizer output
  gpu-check.log   everything else printed, the build log included

The last lines printed are a summary of those files (``plot_gpu.py``), so the console's tail
alone carries the numbers; plots and the summary JSON are made later, on any machine:
``python benchmarks/plot_gpu.py OUT_DIR``. Exit status 1 when any step failed or was cut.
"""
import argparse
import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import plot_gpu  # noqa: E402
from common import append_jsonl  # noqa: E402

LOG, TESTS = "gpu-check.log", "tests.txt"
OUT_FILES = ("env.json", "steps.jsonl", "kernels.jsonl", "model.jsonl", TESTS, LOG)
SEVEN_B = "4096x4096,11008x4096,4096x11008"
# Of the tests' and sanitizer's output only these lines reach the console (all go to tests.txt).
SHOWN_TEST_LINE = re.compile(r"passed|failed|FAIL|ERROR|SUMMARY|^----|^ok  ")


@dataclasses.dataclass
class Step:
    """One command of the check. ``needs``: ``"cuda"`` (our CUDA kernels; skipped when the
    backends step found them unusable), ``"gpu"`` (any GPU code) or None."""

    name: str
    cap_s: float
    argv: list[str]
    needs: str | None = "cuda"
    log: str = LOG
    env: dict = dataclasses.field(default_factory=dict)


class Runner:
    """Runs steps under one deadline and records each in ``steps.jsonl`` (module docstring)."""

    def __init__(self, out_dir: str, deadline_s: float, reserve_s: float = 20.0,
                 min_step_s: float = 5.0, clock=time.monotonic):
        self.out_dir, self.deadline_s = out_dir, deadline_s
        self.reserve_s, self.min_step_s = reserve_s, min_step_s
        self.clock, self.start = clock, clock()
        self.skip_reasons: dict[str, str] = {}
        self.records: list[dict] = []

    def left_s(self) -> float:
        return self.deadline_s - (self.clock() - self.start) - self.reserve_s

    def say(self, text: str) -> None:
        print(text, flush=True)
        with open(os.path.join(self.out_dir, LOG), "a") as f:
            f.write(text + "\n")

    def record(self, step: Step, status: str, **fields) -> dict:
        rec = dict(step=step.name, status=status, **fields)
        self.records.append(rec)
        append_jsonl(os.path.join(self.out_dir, "steps.jsonl"), rec)
        return rec

    def run(self, step: Step) -> dict:
        if step.needs in self.skip_reasons:
            self.say(f"\n== {step.name}: skipped ({self.skip_reasons[step.needs]})")
            return self.record(step, "skipped", why=self.skip_reasons[step.needs])
        limit = min(step.cap_s, self.left_s())
        if limit < self.min_step_s:
            why = f"no time left ({max(0, self.left_s()):.0f} s before the deadline's reserve)"
            self.say(f"\n== {step.name}: cut, {why}")
            return self.record(step, "cut", why=why, limit_s=round(limit, 1))
        self.say(f"\n== {step.name} ({time.strftime('%H:%M:%S')}, at most {limit:.0f} s)")
        t0 = self.clock()
        code, timed_out = self._execute(step, limit)
        seconds = round(self.clock() - t0, 1)
        if timed_out:
            why = ("hit the deadline" if limit < step.cap_s
                   else f"hit its cap of {step.cap_s:.0f} s")
            self.say(f"!! {step.name}: cut after {seconds} s ({why})")
            return self.record(step, "cut", why=why, exit=code, seconds=seconds,
                               limit_s=round(limit, 1))
        status = "ok" if code == 0 else "failed"
        if code:
            self.say(f"!! {step.name} failed (exit {code})")
        return self.record(step, status, exit=code, seconds=seconds, limit_s=round(limit, 1))

    def _execute(self, step: Step, limit: float) -> tuple[int, bool]:
        """Run the step's command in its own process group, its output line by line to the
        console (a short view for the tests file) and to its file; kill the group at ``limit``."""
        path = os.path.join(self.out_dir, step.log)
        env = {**os.environ, **step.env}
        with open(path, "a") as sink:
            sink.write(f"\n== {step.name}: {' '.join(step.argv)}\n")
            sink.flush()
            proc = subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    cwd=ROOT, env=env, start_new_session=True, text=True,
                                    errors="replace", bufsize=1)

            def pump():
                for line in proc.stdout:
                    sink.write(line)
                    sink.flush()
                    if step.log == LOG or SHOWN_TEST_LINE.search(line):
                        sys.stdout.write(line)
                        sys.stdout.flush()

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                code = proc.wait(timeout=limit)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(timeout=grace)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                code = proc.wait()
            reader.join(timeout=5)
        return code, timed_out


def environment_step(python: str, out: str, dry: bool) -> Step:
    return Step("environment", 60, [python, os.path.join(HERE, "gpu_steps.py"), "env", "--out",
                                    os.path.join(out, "env.json"), *(["--dry-run"] if dry else [])],
                needs=None)


def plan(python: str, out: str, dry: bool, scratch: str, arch: str | None) -> list[Step]:
    """The steps after the environment's, in order of value (module docstring); ``arch``: the
    GPU's build target; ``dry``: the same flow at tiny sizes on the CPU, against the installed
    package (no build)."""
    kernels, model = os.path.join(out, "kernels.jsonl"), os.path.join(out, "model.jsonl")
    env_json = os.path.join(out, "env.json")
    bench = os.path.join(HERE, "bench_linear.py")
    if dry:
        dev, dtype, native, shapes, decode, prefill, iters = ("cpu", "float32", "cpu",
                                                              "64x48,40x200", "1,4", "64", "2")
        smoke = ["--shapes", "96x64", "--batches", "1,3"]
        model_args = ["--shape", "tiny", "--batches", "1,2", "--new-tokens", "4", "--prompt",
                      "32", "--repeats", "1", "--graph-steps", "2"]
        prune_shape, dry_flag = "64x96", ["--dry-run"]
    else:
        dev, dtype, native, shapes, decode, prefill, iters = ("cuda", "float16", "cuda", SEVEN_B,
                                                              "1,16", "2048", "50")
        smoke = ["--shapes", "4096x4096,11008x4096", "--batches", "1,16,2048"]
        model_args = ["--shape", "llama2-7b", "--batches", "1,16", "--new-tokens", "16",
                      "--repeats", "2"]
        prune_shape, dry_flag = "4096x11008", []

    def linear(name, cap, backends, batches, *extra, needs="cuda", iters=iters):
        bits = [] if "--bits" in extra else ["--bits", "16"]
        return Step(name, cap, [python, bench, "--device", dev, "--dtype", dtype, "--iters",
                                iters, "--backends", backends, "--mixes", "hybrid", "--shapes",
                                shapes, "--batches", batches, *bits, *extra, "--jsonl", kernels,
                                "--out", os.path.join(scratch, name.replace(" ", "-") + ".json")],
                    needs=needs)

    steps = []
    if not dry:
        # This GPU's capability only: half the compile time of the default two targets. In place,
        # so no pip (it would hide the compiler's log) and nothing installed.
        steps.append(Step(f"build (sm {arch})", 300,
                          [python, "setup.py", "build_ext", "--inplace"],
                          env={"TORCH_CUDA_ARCH_LIST": arch or "", "MAX_JOBS": str(os.cpu_count()),
                               "SPARSE_KERNELS_REQUIRE_CUDA": "1"}))
    steps += [
        Step("backends", 60, [python, os.path.join(HERE, "gpu_steps.py"), "backends", "--out",
                              env_json, *dry_flag], needs="gpu"),
        Step("smoke", 90, [python, os.path.join(HERE, "gpu_smoke.py"), "--device", dev,
                           "--dtype", dtype, "--backends", native, *smoke, "--jsonl", kernels]),
        linear("decode v2", 90, native, decode, "--cuda-kernels", "v2"),
        linear("decode v1", 90, native, decode, "--cuda-kernels", "v1"),
        linear("decode int4 / int8 (triton)", 90, "triton", decode, "--bits", "4,8",
               needs="gpu"),
        Step("tests: cuda kernels", 75,
             [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--maxfail", "10",
              *(["--timeout", "20"] if has_module(python, "pytest_timeout") else []),
              os.path.join(ROOT, "tests", "test_cuda_backend.py"), "-k",
              "decode or hybrid_linear or unpack"], log=TESTS),
        Step("compute-sanitizer", 90, [python, os.path.join(HERE, "gpu_steps.py"), "sanitize",
                                       "--jsonl", kernels, *dry_flag], log=TESTS),
        Step("ncu: decode v2 11008x4096 batch 1", 60,
             [python, os.path.join(HERE, "gpu_steps.py"), "profile", "--env", env_json,
              "--jsonl", kernels, *dry_flag]),
        linear("decode triton", 90, "triton", decode, needs="gpu"),
        linear("prefill", 90, f"{native},triton", prefill, "--cuda-kernels", "v1,unpack",
               iters="3" if dry else "20"),
        Step("whole model: greedy decode tokens/s", 150,
             [python, os.path.join(HERE, "bench_model.py"), "--device", dev, *model_args,
              "--jsonl", model, "--out", os.path.join(scratch, "model.json")], needs="gpu"),
        Step("pruning kernels", 60,
             [python, os.path.join(HERE, "bench_prune_kernels.py"), "--device", dev, "--shape",
              prune_shape, "--iters", iters, "--jsonl", kernels,
              "--out", os.path.join(scratch, "prune-kernels.json")], needs="gpu"),
    ]
    return steps


def has_module(python: str, name: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    return subprocess.run([python, "-c", code], capture_output=True, timeout=60).returncode == 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder for the six files (created; files are appended to)")
    p.add_argument("--deadline-s", type=float, default=540,
                   help="seconds for the whole run, summary included (default 540)")
    p.add_argument("--dry-run", action="store_true",
                   help="every step on the CPU at tiny sizes (no GPU, no build)")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    python = sys.executable
    # Triton with one config per kernel: autotuning would spend minutes the check does not have.
    os.environ.update(PYTHONUNBUFFERED="1", SPARSE_KERNELS_TRITON_ONE_CONFIG="1",
                      PYTHONPATH=os.pathsep.join(filter(None, [ROOT,
                                                               os.environ.get("PYTHONPATH")])))
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # the Triton steps run interpreted: plumbing only
    runner = Runner(args.out_dir, args.deadline_s, min_step_s=1 if args.dry_run else 5)
    env_ok = runner.run(environment_step(python, args.out_dir, args.dry_run))["status"] == "ok"
    env = plot_gpu.read_env(args.out_dir)
    if not args.dry_run and "gpu" not in env:
        runner.skip_reasons["gpu"] = runner.skip_reasons["cuda"] = "no GPU (env.json)"
    elif not env_ok and not args.dry_run:
        runner.skip_reasons["cuda"] = "; ".join(env.get("problems") or ["see gpu-check.log"])
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for step in plan(python, args.out_dir, args.dry_run, scratch, env.get("arch")):
            rec = runner.run(step)
            if rec["status"] == "ok" or step.needs == "cuda" and rec["status"] == "skipped":
                continue
            if step.name.startswith("build"):
                runner.skip_reasons["cuda"] = f"the build {rec['status']} (gpu-check.log)"
            elif step.name == "backends":
                runner.skip_reasons["cuda"] = (plot_gpu.read_env(args.out_dir)
                                               .get("cuda_unavailable") or "see gpu-check.log")
    summary = plot_gpu.format_summary(plot_gpu.summarize(args.out_dir))
    runner.say("\n" + summary)
    bad = [r["step"] for r in runner.records if r["status"] in ("failed", "cut")]
    runner.say(f"== done: {len(runner.records)} steps, "
               f"{'all ok or skipped' if not bad else 'not ok: ' + ', '.join(bad)}; "
               f"files in {args.out_dir}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
