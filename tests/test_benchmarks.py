"""The benchmark scripts and the GPU script run (tiny sizes, CPU) and write what they promise.

They are the only way GPU numbers get made, on a machine lent now and then: a script that has
rotted would waste that machine's time.
"""
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
