"""A compact table of one `armfast bench --json` run: per case, sdpa's time and each other
backend's time as a ratio to it (above 1 is faster), with the best TFLOP/s; then the cold
first calls of `armfast.bench.first_calls` and the whole-image pipeline (issue 16), if given.
The last thing the GPU check prints.

    python benchmarks/summary.py gpu-check/cuda.json --first-calls gpu-check/first_calls.json
    python benchmarks/summary.py --pipeline gpu-check/cuda-pipeline.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from armfast.bench.ceilings import compute_ceiling
from armfast.bench.report import format_time


def bench_table(data: dict) -> list[str]:
    results = data["results"]
    backends = []
    for r in results:
        if r["backend"] not in backends and r["backend"] != "sdpa":
            backends.append(r["backend"])
    cases: dict[tuple, dict[str, dict]] = {}
    for r in results:
        key = (r["op"] + (f" {r['variant']}" if r.get("variant") else ""), r["mode"], r["label"])
        cases.setdefault(key, {})[r["backend"]] = r
    ceiling = compute_ceiling(data.get("ceilings"))  # the larger of the matmul and the FMA peak
    head = f"{'op':<24} {'mode':<7} {'shape':<34} {'sdpa':>9} " + " ".join(f"{b:>13}" for b in backends)
    lines = [head + f" {'best TF/s':>10}", "-" * (len(head) + 11)]
    for (op, mode, label), by_backend in cases.items():
        sdpa = by_backend.get("sdpa", {}).get("median_s")
        cells = []
        for b in backends:
            r = by_backend.get(b)
            if r is None or r.get("skipped"):
                cells.append(f"{'-':>13}")
            elif r.get("error"):
                cells.append(f"{'FAILED':>13}")
            else:
                ratio = f"{sdpa / r['median_s']:.2f}x" if sdpa else "?"
                cells.append(f"{format_time(r['median_s']):>7} {ratio:>5}")
        rates = [r["tflops"] for r in by_backend.values() if r.get("tflops")]
        best = f"{max(rates):.3g}" if rates else "-"
        if rates and ceiling:
            best += f" {100 * max(rates) / ceiling:.0f}%"
        lines.append(f"{op:<24} {mode:<7} {label:<34} {format_time(sdpa):>9} " + " ".join(cells)
                     + f" {best:>10}")
    env = data.get("environment", {})
    lines.append(f"(backend cells: time, sdpa's time / it; best TF/s: % of the measured compute "
                 f"ceiling {ceiling and f'{ceiling:.3g}'} TFLOP/s; {env.get('device_name')}, "
                 f"torch {env.get('torch')}, triton {env.get('triton')})")
    return lines


def first_call_table(data: dict) -> list[str]:
    lines = [f"{'first call (cold)':<20} {'backend':<8} {'dtype':<9} {'dim':>4} {'size':>5} "
             f"{'first':>9} {'second':>9}"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"{r['op']:<20} {r['backend']:<8} {r['dtype']:<9} {r['dim']:>4} "
                         f"{r['size']:>5} {r['error'][:60]}")
        else:
            lines.append(f"{r['op']:<20} {r['backend']:<8} {r['dtype']:<9} {r['dim']:>4} "
                         f"{r['size']:>5} {format_time(r['first_s']):>9} {format_time(r['second_s']):>9}")
    for b, why in data.get("skipped", {}).items():
        lines.append(f"{b}: not measured ({why})")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench_json", nargs="?", help="armfast bench --json (optional: a short "
                        "run of the GPU check may have measured only the other parts)")
    parser.add_argument("--first-calls", metavar="JSON")
    parser.add_argument("--pipeline", metavar="JSON", help="armfast bench --ops pipeline --json")
    args = parser.parse_args(argv)
    lines = bench_table(json.loads(Path(args.bench_json).read_text())) if args.bench_json else []
    if args.first_calls and Path(args.first_calls).exists():
        lines += [""] + first_call_table(json.loads(Path(args.first_calls).read_text()))
    if args.pipeline and Path(args.pipeline).exists():
        from armfast.bench import pipeline

        records = json.loads(Path(args.pipeline).read_text())["pipeline"]
        lines += ["", pipeline.format_table(records), *pipeline.summary_lines(records)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
