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

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import bench_linear  # noqa: E402
import bench_prune_kernels  # noqa: E402


def test_bench_linear_writes_side_by_side_records(tmp_path):
    out = tmp_path / "linear.json"
    bench_linear.main(["--shapes", "48x80", "--batches", "1,17", "--mixes", "hybrid,all-dense",
                       "--iters", "2", "--warmup", "0", "--warm-cache", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert {"device", "torch", "commit", "records"} <= payload.keys()
    records = payload["records"]
    assert {(r["mix"], r["batch"]) for r in records} == {
        ("hybrid", 1), ("hybrid", 17), ("all-dense", 1), ("all-dense", 17)}
    for r in records:
        assert r["dense_ms"] > 0 and r["hybrid_ms"] > 0
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["hybrid_ms"], rel=1e-2)


def test_bench_prune_kernels_counts_bytes_against_copy(tmp_path):
    out = tmp_path / "prune.json"
    bench_prune_kernels.main(["--shape", "64x96", "--iters", "2", "--warmup", "0",
                              "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["copy_gb_per_s"] > 0
    ops = {r["op"] for r in payload["records"]}
    assert ops == {"wanda_scores", "block_topk_mask", "nm_mask", "compress_24"}
    for r in payload["records"]:
        assert r["bytes"] == bench_prune_kernels.bytes_moved(r["op"], 64, 96, 4)
        assert r["fraction_of_copy"] == pytest.approx(r["gb_per_s"] / payload["copy_gb_per_s"],
                                                      rel=1e-3)


def test_plot_linear_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="plot_linear.py needs matplotlib (optional)")
    import plot_linear
    results = tmp_path / "linear.json"
    bench_linear.main(["--shapes", "32x48", "--batches", "1,4", "--mixes", "hybrid",
                       "--iters", "1", "--warmup", "0", "--warm-cache", "--out", str(results)])
    png = plot_linear.main([str(results)])
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_gpu_script_parses_and_names_files_that_exist():
    script = os.path.join(BENCH, "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    with open(script) as f:
        text = f.read()
    named = set(re.findall(r"((?:tests|benchmarks)/[\w./-]+\.py)", text))
    assert named, "gpu_check.sh names no test or benchmark files"
    missing = [p for p in sorted(named) if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f"gpu_check.sh names files that do not exist: {missing}"


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
    report = {"model": "tiny", "pattern": "three_tier", "pattern_spec": result.pattern.describe(),
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
