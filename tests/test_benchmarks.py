"""The benchmark scripts and the GPU script run (tiny sizes, CPU) and write what they promise.

They are the only way GPU numbers get made, on a machine lent now and then: a script that has
rotted would waste that machine's time.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import sparse_kernels as sk
from conftest import needs_cpu_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import bench_linear  # noqa: E402
import bench_prune_kernels  # noqa: E402


def test_bench_linear_writes_side_by_side_records(tmp_path):
    out, lines = tmp_path / "linear.json", tmp_path / "linear.jsonl"
    bench_linear.main(["--shapes", "48x80", "--batches", "1,17", "--mixes", "hybrid,all-dense",
                       "--bits", "16", "--iters", "2", "--warmup", "0", "--warm-cache", "--repeats", "2",
                       "--out", str(out), "--jsonl", str(lines)])
    payload = json.loads(out.read_text())
    assert {"device", "torch", "commit", "records"} <= payload.keys()
    records = payload["records"]
    # Per mix and batch the dense baseline first, then the kernel, each named.
    ours = [r for r in records if r["kernel"] != "F.linear"]
    assert [r["kernel"] for r in records] == ["F.linear", ours[0]["kernel"]] * 4
    assert {(r["mix"], r["batch"]) for r in ours} == {
        ("hybrid", 1), ("hybrid", 17), ("all-dense", 1), ("all-dense", 17)}
    for dense, r in zip(records[::2], records[1::2]):
        assert r["output_ok"] and r["max_rel_error"] <= bench_linear.TOLERANCE[torch.float32]
        assert len(r["ms_repeats"]) == 2 and r["ms"] > 0 and r["dense_ms"] == dense["ms"]
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["ms"], rel=1e-2)
        assert r["record"] == dense["record"] == "linear" and "speedup" not in dense
    # The same records, one per line, written as they were measured.
    assert [json.loads(line) for line in lines.read_text().splitlines()] == records


@needs_cpu_backend
def test_bench_linear_times_each_cpu_isa(tmp_path):
    isas = sk.supported_cpu_isas()
    active = sk.cpu_isa()
    out = tmp_path / "linear.json"
    bench_linear.main(["--shapes", "48x80", "--batches", "1", "--mixes", "hybrid", "--bits", "16",
                       "--backends", "cpu", "--cpu-isas", ",".join(isas), "--iters", "1",
                       "--warmup", "0", "--warm-cache", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["cpu_isa"] == active and sk.cpu_isa() == active  # restored afterwards
    labels = [r["kernel"] for r in payload["records"]]
    assert labels == ["F.linear"] + [f"cpu-{i}" for i in isas]
    assert all(r["output_ok"] for r in payload["records"])
    with pytest.raises(SystemExit, match="not \\['sse9'\\]"):
        bench_linear.main(["--shapes", "48x80", "--backends", "cpu", "--cpu-isas", "sse9"])


@needs_cpu_backend
def test_bench_linear_low_bit_rows_beside_torch_int8_and_int4(tmp_path):
    out = tmp_path / "linear.json"
    bench_linear.main(["--shapes", "48x128,40x80", "--batches", "1", "--mixes", "hybrid",
                       "--bits", "16,8,4", "--backends", "cpu", "--iters", "1", "--warmup", "0",
                       "--warm-cache", "--out", str(out)])
    records = json.loads(out.read_text())["records"]
    first = [(r["kernel"], r["bits"], r["dtype"]) for r in records if r["out_features"] == 48]
    ours = f"cpu-{sk.cpu_isa()}"
    assert first == [("F.linear", 16, "float32"),
                     ("torch-int8", 8, "float32"), ("torch-int8", 8, "bfloat16"),
                     ("torch-int4", 4, "float32"), ("torch-int4", 4, "bfloat16"),
                     (ours, 16, "float32"), (ours, 8, "float32"), (ours, 4, "float32")]
    assert all(r["output_ok"] for r in records)
    by_bits = {r["bits"]: r for r in records if r["kernel"] == ours and r["out_features"] == 48}
    assert by_bits[4]["packed_bytes"] < by_bits[8]["packed_bytes"] < by_bits[16]["packed_bytes"]
    assert by_bits[4]["group_size"] == 128 and "speedup_vs_torch_lowbit" not in by_bits[16]
    torch_int4 = min(r["ms"] for r in records if r["kernel"] == "torch-int4")
    assert by_bits[4]["torch_lowbit_ms"] == torch_int4
    # 80 columns: no torch baselines (its kernels need multiples of 32), ours all there.
    second = [(r["kernel"], r["bits"]) for r in records if r["out_features"] == 40]
    assert second == [("F.linear", 16), (ours, 16), (ours, 8), (ours, 4)]


def test_bench_linear_does_not_time_a_wrong_output(tmp_path, monkeypatch):
    real = sk.hybrid_linear
    monkeypatch.setattr(sk, "hybrid_linear", lambda x, w, backend=None: real(x, w) * 1.01)
    out = tmp_path / "linear.json"
    bench_linear.main(["--shapes", "32x64", "--batches", "3", "--mixes", "hybrid", "--bits", "16",
                       "--iters", "1", "--warmup", "0", "--warm-cache", "--out", str(out)])
    dense, r = json.loads(out.read_text())["records"]
    assert dense["output_ok"] and dense["ms"] > 0
    assert not r["output_ok"] and r["max_rel_error"] == pytest.approx(0.01, rel=1e-3)
    assert "ms" not in r and "speedup" not in r


def test_a_crashing_kernel_leaves_the_baselines_and_the_next_records(tmp_path, monkeypatch):
    """A kernel that raises is recorded with its error; the baseline written before it and the
    records after it (the next batch) are all there."""
    real = sk.hybrid_linear

    def crashes_on_three_rows(x, w, backend=None):
        if x.shape[0] == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(x, w, backend=backend)

    monkeypatch.setattr(sk, "hybrid_linear", crashes_on_three_rows)
    lines = tmp_path / "linear.jsonl"
    bench_linear.main(["--shapes", "32x64", "--batches", "3,2", "--mixes", "hybrid", "--bits",
                       "16", "--iters", "1", "--warmup", "0", "--warm-cache", "--out", str(tmp_path / "l.json"),
                       "--jsonl", str(lines)])
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [(r["kernel"] == "F.linear", r["batch"], r["output_ok"]) for r in records] == [
        (True, 3, True), (False, 3, False), (True, 2, True), (False, 2, True)]
    assert "illegal memory access" in records[1]["error"] and "ms" not in records[1]


def test_bench_prune_kernels_counts_bytes_against_copy(tmp_path):
    out = tmp_path / "prune.json"
    bench_prune_kernels.main(["--shape", "64x96", "--iters", "2", "--warmup", "0",
                              "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["copy_gb_per_s"] > 0
    ops = {r["op"] for r in payload["records"]}
    assert ops == {"wanda_scores", "block_topk_mask", "nm_mask", "compress_24"}
    for r in payload["records"]:
        assert r["output_ok"], r
        assert r["bytes"] == bench_prune_kernels.bytes_moved(r["op"], 64, 96, 4)
        assert r["fraction_of_copy"] == pytest.approx(r["gb_per_s"] / payload["copy_gb_per_s"],
                                                      rel=1e-3)


def test_plot_linear_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="plot_linear.py needs matplotlib (optional)")
    import plot_linear
    results = tmp_path / "linear.json"
    bench_linear.main(["--shapes", "32x48", "--batches", "1,4", "--mixes", "hybrid",
                       "--bits", "16", "--iters", "1", "--warmup", "0", "--warm-cache", "--out", str(results)])
    png = plot_linear.main([str(results)])
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_gpu_check_plan_names_files_that_exist(tmp_path):
    import gpu_check

    subprocess.run(["bash", "-n", os.path.join(BENCH, "gpu_check.sh")], check=True)
    out, scratch = str(tmp_path / "out"), str(tmp_path / "scratch")
    for dry in (True, False):
        steps = [gpu_check.environment_step("python3", out, dry),
                 *gpu_check.plan("python3", out, dry, scratch, "9.0a")]
        named = {a for s in steps for a in s.argv if a.endswith(".py")}
        assert named and all(os.path.exists(os.path.join(ROOT, p)) for p in named), named
        # Only the six files of the check are written into the output folder.
        inside = {os.path.basename(a) for s in steps for a in s.argv if os.path.dirname(a) == out}
        assert inside and inside <= set(gpu_check.OUT_FILES), inside


def test_bench_frontier_records_every_configuration_and_resumes(tmp_path):
    import bench_frontier
    from tiny_models import calibration_ids, llama

    out = tmp_path / "frontier.json"
    argv = ["--series", "wanda-matrix,sparsegpt-model", "--budgets", "0.6,0.8",
            "--fixed", "wanda-2:4,wanda-unstructured-50%", "--map-config", "sparsegpt-model@0.6",
            "--nsamples", "4", "--seqlen", "24", "--ppl-windows", "2", "--out", str(out)]
    eval_tokens = calibration_ids(8, 24, seed=1).flatten()
    bench_frontier.main(argv, model=llama(), calibration=calibration_ids(),
                        eval_text=eval_tokens)
    payload = json.loads(out.read_text())
    assert {"device", "torch", "commit", "dense_ppl", "budget_dtype"} <= payload.keys()
    records = {r["config"]: r for r in payload["records"]}
    assert set(records) == {"wanda-2:4", "wanda-unstructured-50%", "wanda-matrix@0.6",
                            "wanda-matrix@0.8", "sparsegpt-model@0.6", "sparsegpt-model@0.8"}
    for name, r in records.items():
        assert r["ppl"] > 1
        if "@" in name:  # a budget: its packed bytes (fp16, measured) stay within it
            assert r["packed_bytes_fraction"] <= r["arguments"]["budget"]
            assert abs(sum(r["tiers"].values()) - 1) < 1e-9
    assert records["wanda-2:4"]["packed_bytes_fraction"] > 0.5625  # values + meta + index
    assert "packed_bytes_fraction" not in records["wanda-unstructured-50%"]
    assert "per_module" in records["sparsegpt-model@0.6"]
    for png in (out.with_suffix(".png"), tmp_path / "frontier-allocation.png"):
        if importlib.util.find_spec("matplotlib"):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A resumed run measures only what is missing.
    payload["records"] = [r for r in payload["records"] if r["config"] != "wanda-matrix@0.8"]
    out.write_text(json.dumps(payload))
    bench_frontier.main(argv + ["--resume"], model=llama(), calibration=calibration_ids(),
                        eval_text=eval_tokens)
    again = json.loads(out.read_text())["records"]
    assert [r["config"] for r in again][-1] == "wanda-matrix@0.8"
    assert len(again) == len(records)


def test_allocation_heat_map_of_a_saved_prune(tmp_path):
    pytest.importorskip("matplotlib", reason="the heat map needs matplotlib (optional)")
    import bench_frontier
    import pruning
    from tiny_models import calibration_ids, llama

    result = pruning.prune(llama(), calibration_ids(), "wanda", "three_tier", budget=0.6,
                           progress=False)
    report = {"model": "tiny", "pattern": "three_tier", "pattern_spec": result.describe(),
              "ppl": {"pruned": 12.0}, "report": result.report}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    png = bench_frontier.main(["--allocation-of", str(path), "--out", str(tmp_path / "map.png")])
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_recovery_curves_keep_sparsity_and_resume(tmp_path):
    import bench_recovery
    from tiny_models import calibration_ids, llama

    out = tmp_path / "recovery.json"
    argv = ["--starts", "recipe@0.62,sparsegpt-2:4", "--runs", "masked-lm,lora-distill",
            "--tokens", str(6 * 2 * 24), "--train-seqlen", "24", "--batch-size", "2",
            "--eval-every", "3", "--progressive-budgets", "0.8,0.62",
            "--progressive-epochs", "1,1", "--nsamples", "4", "--seqlen", "24",
            "--ppl-windows", "2", "--out", str(out)]
    tiny = dict(calibration=calibration_ids(), eval_text=calibration_ids(8, 24, seed=1).flatten(),
                train_ids=calibration_ids(16, 24, seed=2).flatten())
    bench_recovery.main(argv, model=llama(), **tiny)
    payload = json.loads(out.read_text())
    runs = {(r["start"], r["run"]): r for r in payload["records"]}
    assert set(runs) == {(s, r) for s in ("recipe@0.62", "sparsegpt-2:4")
                         for r in ("masked-lm", "lora-distill")} | {("recipe@0.62", "progressive")}
    for key, r in runs.items():
        assert r["tokens"] == 6 * 2 * 23, key  # the loss counts 23 predicted tokens a window
        if key[1] == "progressive":
            assert r["packed_bytes_fraction"] <= 0.62 and len(r["iterations"]) == 2
            continue
        assert r["sparsity_kept"] == {"revived": 0, "tier_maps_pack": True}
        assert [p["step"] for p in r["curve"]] == [0, 3, 6]
        assert r["curve"][-1]["seconds"] > 0 and r["curve"][0]["ppl"] == r["start_ppl"]
        assert (r["lora"] is not None) == key[1].startswith("lora")
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload["records"] = [r for r in payload["records"] if r["run"] != "lora-distill"]
    out.write_text(json.dumps(payload))
    bench_recovery.main(argv + ["--resume"], model=llama(), **tiny)
    again = json.loads(out.read_text())["records"]
    assert len(again) == len(runs) and again[-1]["run"] == "lora-distill"


def test_gpu_script_dry_run_leaves_every_record_file(tmp_path):
    """The GPU check's plumbing on the CPU at tiny sizes, with python3 alone on the path: every
    step runs and is recorded, at most six files land in the folder, every record is labelled,
    and the summary is printed last."""
    import gpu_check

    out = tmp_path / "gpu"
    bin_dir = tmp_path / "bin"  # python3 only, as on the GPU machine's image
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    done = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--dry-run", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 6 and set(files) <= set(gpu_check.OUT_FILES), files
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    planned = ["environment"] + [s.name for s in gpu_check.plan("python3", str(out), True,
                                                                str(tmp_path), None)]
    assert [s["step"] for s in steps] == planned
    assert all(s["status"] == "ok" for s in steps), steps
    kernels = [json.loads(line) for line in (out / "kernels.jsonl").read_text().splitlines()]
    smoke = [r for r in kernels if r["record"] == "smoke"]
    assert {s["check"] for s in smoke} == {"metadata-2:4", "large-shape"}
    assert all(s["ok"] for s in smoke)
    linear = [r for r in kernels if r["record"] == "linear"]
    assert {r["kernel"] for r in linear} == {"F.linear", f"cpu-{sk.cpu_isa()}", "triton"}
    assert all(r["output_ok"] and (r["kernel"] == "F.linear" or r["speedup"] > 0)
               for r in linear)
    assert {r["record"] for r in kernels} == {"smoke", "linear", "sanitizer", "ncu",
                                             "prune-kernel"}
    model = [json.loads(line) for line in (out / "model.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["batch"]) for r in model] == [
        ("prefill", 1), ("decode", 1), ("decode-step", 1), ("decode", 2), ("decode-step", 2)]
    env_json = json.loads((out / "env.json").read_text())
    assert env_json["dry_run"] and env_json["copy_gb_per_s"] > 0 and "backends" in env_json
    assert "==== GPU check summary" in done.stdout[-6000:]
    assert re.search(r"\d+ (passed|skipped)", (out / "tests.txt").read_text())


def test_gpu_check_cuts_a_slow_step_and_runs_the_next(tmp_path):
    """One deadline: a step past its cap is killed and recorded as cut, one that no time is left
    for is cut without running, and the steps after either still run."""
    import gpu_check

    python = sys.executable
    runner = gpu_check.Runner(str(tmp_path), deadline_s=8, reserve_s=1, min_step_s=0.5)
    fast = gpu_check.Step("fast", 30, [python, "-c", "print('fast')"], needs=None)
    slow = gpu_check.Step("slow", 2, [python, "-c", "import time; print('slow', flush=True); "
                                                    "time.sleep(60)"], needs=None)
    tail = gpu_check.Step("after", 30, [python, "-c", "print('after')"], needs=None)
    t0 = time.monotonic()
    statuses = [runner.run(s)["status"] for s in (fast, slow, tail)]
    assert statuses == ["ok", "cut", "ok"] and time.monotonic() - t0 < 20
    runner.skip_reasons["cuda"] = "no CUDA kernels"
    assert runner.run(gpu_check.Step("kernels", 30, [python, "-c", "1"]))["status"] == "skipped"
    late = gpu_check.Runner(str(tmp_path), deadline_s=1, reserve_s=1, min_step_s=0.5)
    assert late.run(fast)["why"].startswith("no time left")
    recorded = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [(r["step"], r["status"]) for r in recorded] == [
        ("fast", "ok"), ("slow", "cut"), ("after", "ok"), ("kernels", "skipped"), ("fast", "cut")]
    assert recorded[1]["why"] == "hit its cap of 2 s"
    log = (tmp_path / gpu_check.LOG).read_text()
    assert "slow" in log and "after" in log


def test_gpu_steps_read_ncu_and_sanitizer_output():
    import gpu_steps

    csv_text = "\n".join([
        "==PROF== Disconnected",
        '"ID","Kernel Name","dram__bytes_read.sum","dram__bytes_write.sum",'
        '"dram__throughput.avg.pct_of_peak_sustained_elapsed","gpu__time_duration.sum",'
        '"launch__grid_size","launch__registers_per_thread"',
        '"","","byte","byte","%","nsecond","",""',
        '"0","hybrid_decode_kernel<__half, 1>","56,260,000","90,112","81.5","21,400","1056","48"'])
    got = gpu_steps.parse_ncu_csv(csv_text)
    assert got == dict(kernel_name="hybrid_decode_kernel<__half, 1>", dram_bytes_read=56260000.0,
                       dram_bytes_write=90112.0, dram_throughput_pct=81.5, duration_ns=21400.0,
                       grid_size=1056.0, registers_per_thread=48.0)
    assert gpu_steps.parse_ncu_csv("no profile") == {}
    assert gpu_steps.sanitizer_errors("memcheck", "========= ERROR SUMMARY: 0 errors") == 0
    assert gpu_steps.sanitizer_errors(
        "racecheck", "========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, 1 warning)") == 2
    assert gpu_steps.sanitizer_errors("synccheck", "Segmentation fault") is None


def test_plot_gpu_summarizes_a_check_folder(tmp_path):
    import plot_gpu

    out = tmp_path / "run"
    out.mkdir()
    rows = [dict(record="linear", kernel="cublas", out_features=11008, in_features=4096,
                 batch=1, output_ok=True, ms=0.06),
            dict(record="linear", kernel="cuda-v2", out_features=11008, in_features=4096,
                 batch=1, output_ok=True, ms=0.04, dense_ms=0.06, speedup=1.5, gb_per_s=2300,
                 tasks=4224),
            dict(record="linear", kernel="cuda-v1", out_features=4096, in_features=4096,
                 batch=16, output_ok=False, error="RuntimeError: boom"),
            dict(record="ncu", kernel="cuda-v2", fraction_of_copy=0.7, ok=True)]
    (out / "kernels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut')
    (out / "env.json").write_text(json.dumps(dict(gpu="NVIDIA H100", commit="abc")))
    summary = plot_gpu.summarize(str(out))
    assert [(t["target"].split(" >=")[0], t["met"]) for t in summary["targets"]] == [
        ("decode v2 11008x4096 batch 1", True), ("ncu DRAM rate of v2", False)]
    text = plot_gpu.format_summary(summary)
    assert "RuntimeError: boom" in text and "1.50x" in text
    plot_gpu.main([str(out), "--out", str(tmp_path / "summary")])
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert len(saved["records"]["kernels"]) == 4


def test_gpu_smoke_names_a_misplaced_2_4_entry(monkeypatch):
    import gpu_smoke

    real = sk.hybrid_linear

    def swapped(x, w, backend=None):  # reads the first two kept columns of every group swapped
        return real(x[:, [1, 0] + list(range(2, x.shape[1]))], w, backend=backend)

    assert gpu_smoke.check_metadata("cpu", torch.device("cpu"), torch.float32)["ok"]
    monkeypatch.setattr(sk, "hybrid_linear", swapped)
    result = gpu_smoke.check_metadata("cpu", torch.device("cpu"), torch.float32)
    assert not result["ok"] and result["wrong_entries"] > 0
    assert {e["col"] for e in result["first_wrong"]} <= {0, 1}


def test_bench_model_checks_logits_then_times_both_sides(tmp_path):
    import bench_model

    out = tmp_path / "model.json"
    bench_model.main(["--shape", "tiny", "--batches", "1,3", "--new-tokens", "3", "--prompt", "24",
                      "--repeats", "1", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["logits_error"] <= bench_model.TOLERANCE[torch.float32]
    assert 0.55 < payload["packed_fraction"] < 0.65  # the default mix in fp32
    assert [(r["phase"], r["batch"]) for r in payload["records"]] == [
        ("prefill", 1), ("decode", 1), ("decode", 3)]
    for r in payload["records"]:
        assert r["speedup"] == pytest.approx(r["hybrid_tokens_per_s"] / r["dense_tokens_per_s"],
                                             rel=1e-2)


def test_bench_model_low_bit_times_a_torch_int4_model_beside(tmp_path):
    import bench_model

    out = tmp_path / "model.json"
    bench_model.main(["--shape", "tiny", "--batches", "1", "--new-tokens", "2", "--prompt", "32",
                      "--repeats", "1", "--bits", "4", "--group-size", "32", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["bits"] == 4 and payload["group_size"] == 32
    # The dense side multiplies the rounded weights, so the packed codes reproduce it.
    assert payload["logits_error"] <= bench_model.TOLERANCE[torch.float32]
    assert payload["packed_fraction"] < 0.3  # int4 codes of the default mix, vs fp32
    assert payload["torch_lowbit_logits_error"] < 0.05  # torch's kernel runs x in bf16
    for r in payload["records"]:
        assert r["speedup_vs_torch_lowbit"] == pytest.approx(
            r["hybrid_tokens_per_s"] / r["torch_lowbit_tokens_per_s"], rel=1e-2)


def test_decode_step_with_a_static_cache_is_the_next_token_of_the_prompt():
    import bench_model

    model = bench_model.build_model("tiny", torch.float32, torch.device("cpu"))
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    ms, error, mode = bench_model.decode_step_ms(model, ids, steps=2)
    assert mode == "eager" and ms > 0
    assert error < 1e-5  # the step's logits = the full forward's last logits


def test_bench_structured_compares_importances_speed_and_composition(tmp_path):
    import bench_structured
    from tiny_models import calibration_ids, llama

    out = tmp_path / "structured.json"
    argv = ["--ratio", "0.3", "--finetune-steps", "2", "--train-seqlen", "24", "--seqlen", "24",
            "--ppl-windows", "2", "--nsamples", "4", "--new-tokens", "4", "--repeats", "1",
            "--budget", "0.7", "--out", str(out)]
    bench_structured.main(argv, model=llama(), calibration=calibration_ids(),
                          eval_text=calibration_ids(8, 24, seed=1).flatten(),
                          train_ids=calibration_ids(16, 24, seed=2).flatten())
    payload = json.loads(out.read_text())
    rows = [r for r in payload["records"] if r["config"] == "structured"]
    assert {(r["importance"], r["temperature"]) for r in rows} == {
        (i, t) for i in ("taylor", "taylor_2nd", "wanda", "magnitude") for t in (0.0, 1.0)}
    assert all(0.2 < r["removed_fraction"] <= 0.3 for r in rows)  # within one head group
    assert sum("finetuned" in r for r in rows) == 2
    speed = {r["model"]: r for r in payload["records"] if r["config"] == "speed"}
    assert speed["dense"]["speedup"] == 1.0
    assert speed["structured"]["params"] == speed["structured+three_tier"]["params"] < \
        speed["dense"]["params"] == speed["three_tier"]["params"]
    assert speed["structured+three_tier"]["decoder_linear_bytes_fraction"] < \
        speed["structured"]["decoder_linear_bytes_fraction"] < 1
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match=r"--importances: unknown \['fisher'\]"):
        bench_structured.main(["--importances", "taylor,fisher"])


def test_bench_moe_reports_tokens_per_expert_and_checks_the_packed_model(tmp_path):
    import bench_moe

    out = tmp_path / "moe.json"
    records = bench_moe.main(["--nsamples", "2", "--seqlen", "16", "--experts", "4",
                              "--min-tokens", "12", "--out", str(out)])
    assert [r["arch"] for r in records] == ["mixtral", "qwen2_moe", "qwen3_moe"]
    for r in records:
        assert sum(r["tokens_per_expert"].values()) == 2 * r["routed_tokens"]  # two layers
        low = {n for n, t in r["tokens_per_expert"].items() if t < 12}
        assert low == {n for n in r["magnitude_fallback"] if ".gate_up." in n}
        assert r["packed_generate_equal"] and r["unpruned_weight_fraction"] < 0.01


def test_bench_scale_measures_memory_and_phases_of_each_configuration(tmp_path):
    out = tmp_path / "scale.json"
    model = tmp_path / "model"
    done = subprocess.run([sys.executable, os.path.join(BENCH, "bench_scale.py"), "--shape",
                           "tiny", "--model-dir", str(model), "--layers", "2", "--nsamples", "2",
                           "--seqlen", "32", "--offload", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(out.read_text())
    index = json.loads((model / "model.safetensors.index.json").read_text())
    assert payload["model_bytes"] == index["metadata"]["total_size"]
    assert [r["config"] for r in payload["records"]] == ["sparsegpt-2:4", "recipe-0.62-layer"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("pruned-layers-")]
    for r in payload["records"]:
        assert r["offload"] and r["peak_rss"] >= r["rss_after_load"] > 0
        phases = r["seconds_per_layer"]
        assert {"statistics", "allocation", "sweep", "forward"} <= set(phases)
        assert all(len(phases[p]) == 2 for p in ("statistics", "sweep", "forward"))
    two_four, recipe = payload["records"]
    assert two_four["sparsity"] == pytest.approx(0.5)  # of the pruned layers' matrices
    assert 0.55 < recipe["packed_fraction"] < 0.65
    assert payload["h100_prediction"]["seconds_32_layers"] > 0


def test_bench_scale_records_a_configuration_whose_process_died(tmp_path):
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, os.path.join(BENCH, "bench_scale.py"), "--shape",
                           "tiny", "--model-dir", str(tmp_path / "model"), "--layers", "2",
                           "--nsamples", "0", "--configs", "sparsegpt-2:4", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "failed: sparsegpt-2:4" in done.stderr
    record, = json.loads(out.read_text())["records"]
    assert record["config"] == "sparsegpt-2:4" and record["failed"] != 0
