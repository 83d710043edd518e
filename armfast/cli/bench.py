"""`armfast bench`: every backend of a device against the reference and SDPA, on the same inputs.

Prints one row per op, shape and backend: median time, speed-up over reference and sdpa, peak
memory, TFLOP/s and GB/s with their fraction of the device ceilings measured at the start.
``--ops pipeline`` times whole-image slide inference instead (armfast.bench.pipeline): images/s
of the baseline alone and with ARM at the VOC, Context and Cityscapes protocols against an
official-style path (float32, one window at a time), and the share of the time ARM adds.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

SHAPES_ENV = "ARMFAST_BENCH_SHAPES"  # overrides the shape preset (tests use "tiny")
DTYPES = ("float32", "float16", "bfloat16")
PIPELINE = "pipeline"  # the whole-image benchmark, next to the op cases


def _list(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list drawn from {','.join(choices)}; got {text!r}")
        return items
    return parse


def add_parser(sub) -> argparse.ArgumentParser:
    from ..bench.cases import MODES, OPS, PRESETS, TABLE_OPS
    from ..ops import BACKENDS

    p = sub.add_parser("bench", help="time the ops and modules on every backend of a device",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small shapes and short timing (under two minutes on a 2-core CPU)")
    p.add_argument("--shapes", choices=PRESETS,
                   help=f"shape preset (default: quick with --quick, else full; env {SHAPES_ENV})")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present, else cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--ops", type=_list(OPS + (PIPELINE,)),
                   help=f"comma-separated, from {','.join(OPS)} (default: all; with --tune: "
                        f"{','.join(TABLE_OPS)}), and {PIPELINE}: whole images, armfast against "
                        f"the official-style path")
    p.add_argument("--baseline", default="sclip", choices=("sclip", "clearclip", "naclip"),
                   help=f"{PIPELINE}: the baseline (default %(default)s)")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"{PIPELINE}: timed rounds per variant (default 3, 1 with --quick)")
    p.add_argument("--modes", type=_list(MODES), default=list(MODES),
                   help="forward and/or train (forward+backward; a training step for arm)")
    p.add_argument("--backends", type=_list(BACKENDS),
                   help="backends to time besides reference and sdpa (default: all available)")
    p.add_argument("--no-ceilings", action="store_true",
                   help="skip measuring the matmul, FMA peak and copy ceilings")
    p.add_argument("--json", metavar="OUT", help="write results and environment as JSON")
    p.add_argument("--markdown", metavar="OUT", help="write a RESULTS.md section for this run")
    p.add_argument("--tune", action="store_true",
                   help="measure what the auto table needs: the ops of the table on the 'tune' "
                        "shapes (host-overhead sizes and the design's shapes)")
    p.add_argument("--write-table", nargs="?", const="", metavar="PATH",
                   help="write the fastest backend per (op, dtype, dim, mode, size bucket) of this "
                        "run into the auto table (default: the one armfast reads, "
                        "$ARMFAST_AUTO_TABLE or the packaged armfast/ops/auto_table.json)")
    return p


def resolve(args) -> dict:
    """Settings after defaults: device, dtype, preset, timer."""
    import torch

    from ..bench import timer
    from ..bench.cases import PRESETS, default_dtype

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("armfast bench: --device cuda given but torch sees no CUDA device")
    preset = args.shapes or os.environ.get(SHAPES_ENV) or (
        "tune" if args.tune else "quick" if args.quick else "full")
    if preset not in PRESETS:
        raise SystemExit(f"armfast bench: {SHAPES_ENV} must be one of {', '.join(PRESETS)}; "
                         f"got {preset!r}")
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    config = timer.QUICK if args.quick or preset == "tiny" else timer.FULL
    from ..bench.cases import OPS, TABLE_OPS

    ops = args.ops or list(TABLE_OPS if preset in ("host", "tune") else OPS)
    if args.rounds is not None and args.rounds < 1:
        raise SystemExit(f"armfast bench: --rounds must be at least 1, got {args.rounds}")
    if args.write_table is not None and not set(ops) & set(TABLE_OPS):
        raise SystemExit(f"armfast bench: --write-table needs at least one of "
                         f"{', '.join(TABLE_OPS)} in --ops")
    return {"device": device, "dtype": dtype, "preset": preset, "timer": config, "ops": ops}


def command_line(args, settings: dict) -> str:
    """The command that redoes this run, defaults spelt out."""
    parts = ["armfast", "bench"] + (["--quick"] if args.quick else []) + (["--tune"] if args.tune else [])
    parts += ["--shapes", settings["preset"], "--device", settings["device"]]
    if settings["ops"] != [PIPELINE]:  # the pipeline has its own precision and no modes
        parts += ["--dtype", str(settings["dtype"]).replace("torch.", "")]
    parts += ["--ops", ",".join(settings["ops"])]
    if settings["ops"] != [PIPELINE]:
        parts += ["--modes", ",".join(args.modes)]
    if args.backends:
        parts += ["--backends", ",".join(args.backends)]
    if args.no_ceilings:
        parts.append("--no-ceilings")
    for flag in ("json", "markdown"):
        if getattr(args, flag):
            parts += [f"--{flag}", getattr(args, flag)]
    if args.write_table is not None:
        parts += ["--write-table"] + ([args.write_table] if args.write_table else [])
    if PIPELINE in settings["ops"]:
        parts += ["--baseline", args.baseline] + (["--rounds", str(args.rounds)] if args.rounds else [])
    return shlex.join(parts)


def _progress(total: int):
    done = [0]

    def report(result) -> None:
        done[0] += 1
        c = result.case
        what = (f"FAILED {result.error}" if result.error else f"skipped: {result.skipped}"
                if result.skipped else f"{result.median_s * 1e3:.3f} ms")
        print(f"[{done[0]}/{total}] {c.group} [{c.label}] {result.backend}: {what}",
              file=sys.stderr, flush=True)
    return report


def run(args) -> int:
    from ..bench import report, runner, timer
    from ..bench.cases import make_cases
    from ..bench.ceilings import measure_ceilings

    settings = resolve(args)
    device, dtype, config = settings["device"], settings["dtype"], settings["timer"]
    op_names = [op for op in settings["ops"] if op != PIPELINE]
    cases = make_cases(op_names, settings["preset"], dtype=dtype, modes=args.modes)
    backends = runner.select_backends(device, args.backends)
    command = command_line(args, settings)
    print(f"# {command}", file=sys.stderr)
    env = runner.environment(device)  # before the run: date and load at the start

    ceilings = None
    if not args.no_ceilings and cases:
        ceilings = measure_ceilings(device, dtype, config, quick=config is not timer.FULL)
        print(f"# ceilings: {ceilings.summary()}", file=sys.stderr)
    results = runner.run(cases, device, backends=args.backends, config=config,
                         progress=_progress(len(cases) * len(backends)))
    if ceilings is not None:  # again after the cases: the best of both is the ceiling
        ceilings = ceilings.best(measure_ceilings(device, dtype, config,
                                                  quick=config is not timer.FULL))
    pipeline_results = []
    if PIPELINE in settings["ops"]:
        from ..bench import pipeline

        rounds = args.rounds or (1 if config is not timer.FULL else 3)
        pipeline_results = pipeline.run(device, preset=settings["preset"], rounds=rounds,
                                        baseline=args.baseline,
                                        progress=lambda line: print(line, file=sys.stderr, flush=True))
    if hasattr(os, "getloadavg"):  # the run itself adds about its torch thread count
        env["load_average_end"] = os.getloadavg()
    data = report.to_json(results, env, ceilings, command)
    print(f"armfast bench on {env['device_name']} ({device}, {str(dtype).replace('torch.', '')}), "
          f"{env['date']}")
    if ceilings:
        print(f"ceilings: {ceilings.summary()}")
    if results:
        print(report.format_table(report.rows(data["results"], data["ceilings"])))
    if pipeline_results:
        from ..bench import pipeline

        data["pipeline"] = [r.to_dict() for r in pipeline_results]
        data["pipeline_summary"] = pipeline.summary(data["pipeline"])
        print(pipeline_report(data["pipeline"], env, args.baseline))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            title = f"{report.TITLES.get(device, device)}: {env['device_name']}"
            f.write(report.markdown_section(data, title) if results else f"## {title}\n\n")
            if pipeline_results:
                from ..bench import pipeline

                f.write("\n#" + pipeline.markdown_section(
                    data, f"Pipeline: {args.baseline} slide inference, images/s"))
    if args.write_table is not None:
        write_table(args.write_table, data, env, command, dtype)
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"error: {r.case.group} [{r.case.label}] {r.backend}: {r.error}", file=sys.stderr)
    broken = [r for r in pipeline_results if r.error]
    for r in broken:
        print(f"error: pipeline {r.case.name} {r.variant}: {r.error}", file=sys.stderr)
    return 1 if failed or broken else 0


def pipeline_report(records: list[dict], env: dict, baseline: str) -> str:
    """The pipeline table and one line per protocol: speed-ups, ARM's share, load average."""
    from ..bench import pipeline

    lines = [f"\npipeline: {baseline} slide inference, random CLIP ViT-B/16, synthetic images; "
             f"medians over rounds",
             pipeline.format_table(records), *pipeline.summary_lines(records)]
    if env.get("load_average"):
        lines.append(f"load average at the start {', '.join(f'{x:.2f}' for x in env['load_average'])}"
                     f", at the end {', '.join(f'{x:.2f}' for x in env.get('load_average_end', ()))}")
    return "\n".join(lines)


def write_table(path: str, data: dict, env: dict, command: str, dtype) -> None:
    """Writes this run's choices into the auto table and says what it wrote."""
    import torch

    from ..ops import _auto, _registry

    kind = _auto.device_kind(torch.device(env["device"]))
    entries = _auto.choose(data["results"], kind)
    target = path or _auto.table_path()
    measurement = {"device": kind, "device_name": env["device_name"],
                   "dtype": str(dtype).replace("torch.", ""),
                   "date": env["date"], "torch": env["torch"], "triton": env["triton"],
                   "armfast": env["armfast"], "command": command}
    _auto.write_table(target, entries, measurement)
    _registry.clear_cache()
    print(f"auto table {target}: {len(entries)} entries for {kind}")
    for e in entries:
        print(f"  {e['op']} {e['dtype']} dim={e['dim']} {e['mode']} "
              f"{_auto.bucket_range(e['bucket'])}: {e['backend']} ({e['vs_sdpa']:.2f}x sdpa)")
