"""Plot a bench_linear.py JSON: speedup over dense per batch size, one panel per weight shape.

  python benchmarks/plot_linear.py benchmarks/results/<file>.json [--out plot.png] [--mix hybrid]

Lines: each kernel on the chosen tier mix, and torch's semi-structured 2:4 where it was
measured. The dotted line at 1.0 is dense; the dashed one is the byte limit of the mix
(dense bytes / packed bytes), the most a purely memory-bound kernel could gain. Needs
matplotlib (``pip install matplotlib``), which the package itself does not.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import mix_name  # noqa: E402
from plot_gpu import speedup_panels  # noqa: E402


def kernel_of(rec: dict) -> str:
    """A record's kernel label (older files name only the backend)."""
    return rec.get("kernel", rec["backend"])


def load_series(records: list[dict], mix: str) -> dict:
    """{shape: {kernel: [(batch, speedup), ...]}} for the mix and the torch 2:4 baseline."""
    series = {}
    for rec in records:
        if mix_name(rec) != mix and kernel_of(rec) != "torch-2:4" or "speedup" not in rec:
            continue  # another mix, the dense baseline itself, or a wrong output (not timed)
        shape = f"{rec['out_features']}x{rec['in_features']}"
        series.setdefault(shape, {}).setdefault(kernel_of(rec), []).append(
            (rec["batch"], rec["speedup"]))
    return series


def byte_limits(records: list[dict], mix: str) -> dict:
    return {f"{r['out_features']}x{r['in_features']}": r["dense_bytes"] / r["packed_bytes"]
            for r in records if mix_name(r) == mix and kernel_of(r) != "torch-2:4"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a JSON file written by bench_linear.py")
    p.add_argument("--mix", default="hybrid", help="tier mix to plot (default hybrid)")
    p.add_argument("--out", default=None, help="PNG path (default: the JSON path with .png)")
    args = p.parse_args(argv)
    with open(args.results) as f:
        payload = json.load(f)
    series = load_series(payload["records"], args.mix)
    if not series:
        raise SystemExit(f"{args.results} has no records for mix {args.mix!r}")
    dtype = payload["records"][0]["dtype"]
    out = args.out or os.path.splitext(args.results)[0] + ".png"
    if not speedup_panels(series, out, f"{payload['device']}, {dtype}, mix {args.mix}, commit "
                                       f"{payload['commit']}",
                          byte_limits(payload["records"], args.mix)):
        raise SystemExit("plot_linear.py needs matplotlib: pip install matplotlib")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
