"""Tables of benchmark results: plain text for the terminal, Markdown for RESULTS.md, JSON.

Rows keep the order of the run (case by case, reference and sdpa first). "runs" is rounds x
calls per round; the median is over rounds. Speed-ups are
``time(reference) / time(backend)`` and ``time(sdpa) / time(backend)`` on the same case, same
inputs, same run: above 1 means faster.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

from .ceilings import Ceilings, compute_ceiling
from .memory import METHOD
from .runner import Result

TITLES = {"cpu": "CPU", "cuda": "GPU"}  # RESULTS.md section per device type
COLUMNS = ("op", "mode", "shape", "backend", "median", "runs", "vs ref", "vs sdpa", "peak mem",
           "TFLOP/s", "% mm peak", "GB/s", "% bw peak", "max err", "note")
LEFT = ("op", "mode", "shape", "backend", "note")  # text columns; the others are numbers


def _sig(x: float) -> str:
    """Three significant digits, without the exponent that ``:.3g`` gives from 1000 up."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def format_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{_sig(seconds / scale)} {unit}"
    return f"{_sig(seconds / 1e-9)} ns"


def format_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if abs(value) < 1024:
            return f"{_sig(value)} {unit}"
        value /= 1024
    return f"{_sig(value)} GiB"


def format_ratio(ratio: Optional[float]) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _number(value: Optional[float]) -> str:
    return "-" if value is None else _sig(value)


def _percent(value: Optional[float], ceiling: Optional[float]) -> str:
    if value is None or not ceiling:
        return "-"
    return f"{100 * value / ceiling:.1f}%"


def speedups(results: Sequence[Result]) -> dict[int, tuple[Optional[float], Optional[float]]]:
    """id(result) -> (speed-up over reference, over sdpa) on the same case and device."""
    peers: dict[tuple, dict[str, float]] = {}
    for r in results:
        if r.backend in ("reference", "sdpa") and r.median_s is not None:
            peers.setdefault((r.case, r.device), {})[r.backend] = r.median_s
    out = {}
    for r in results:
        p = peers.get((r.case, r.device), {})
        ratio = [None if r.median_s is None or name not in p else p[name] / r.median_s
                 for name in ("reference", "sdpa")]
        out[id(r)] = (ratio[0], ratio[1])
    return out


def rows(records: Sequence[dict], ceilings: Optional[dict] = None) -> list[dict[str, str]]:
    """One dict of formatted cells per result record (as in `to_json`), keyed by COLUMNS."""
    ceilings = ceilings or {}
    compute = compute_ceiling(ceilings)  # the larger of the matmul and the CPU's FMA peak
    table = []
    for r in records:
        note = (r.get("error") and f"FAILED: {r['error']}"
                or r.get("skipped") and f"skipped: {r['skipped']}" or "")
        table.append({
            "op": r["op"] + (f" {r['variant']}" if r.get("variant") else ""),
            "mode": r["mode"],
            "shape": r["label"],
            "backend": r["backend"],
            "median": format_time(r.get("median_s")),
            "runs": f"{r['rounds']}x{r['calls_per_round']}" if r.get("rounds") else "-",
            "vs ref": format_ratio(r.get("speedup_vs_reference")),
            "vs sdpa": format_ratio(r.get("speedup_vs_sdpa")),
            "peak mem": format_bytes(r.get("peak_bytes")),
            "TFLOP/s": _number(r.get("tflops")),
            "% mm peak": _percent(r.get("tflops"), compute),
            "GB/s": _number(r.get("gbps")),
            "% bw peak": _percent(r.get("gbps"), ceilings.get("copy_gbps")),
            "max err": "-" if r.get("max_error") is None else f"{r['max_error']:.1e}",
            "note": note,
        })
    return table


def format_table(table: Sequence[dict[str, str]], columns: Iterable[str] = COLUMNS,
                 left: Iterable[str] = LEFT) -> str:
    """Aligned plain-text table; text columns (`left`) left-aligned, numbers right-aligned."""
    columns = list(columns)
    widths = {c: max([len(c)] + [len(row[c]) for row in table]) for c in columns}
    left = set(left)

    def line(cells: dict[str, str]) -> str:
        return "  ".join(cells[c].ljust(widths[c]) if c in left else cells[c].rjust(widths[c])
                         for c in columns).rstrip()

    header = line({c: c for c in columns})
    return "\n".join([header, "-" * len(header)] + [line(row) for row in table])


def format_markdown(table: Sequence[dict[str, str]], columns: Iterable[str] = COLUMNS,
                    left: Iterable[str] = LEFT) -> str:
    columns = list(columns)
    right = {c for c in columns if c not in set(left)}
    lines = ["| " + " | ".join(columns) + " |",
             "| " + " | ".join("---:" if c in right else "---" for c in columns) + " |"]
    for row in table:
        lines.append("| " + " | ".join(row[c].replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


def to_json(results: Sequence[Result], environment: dict, ceilings: Optional[Ceilings],
            command: str) -> dict:
    """Everything a reader needs to trust or redo the numbers."""
    ratios = speedups(results)
    return {
        "command": command,
        "environment": environment,
        "ceilings": ceilings.to_dict() if ceilings else None,
        "memory_method": METHOD.get(environment["device"], "unknown"),
        "results": [dict(r.to_dict(), speedup_vs_reference=ratios[id(r)][0],
                         speedup_vs_sdpa=ratios[id(r)][1]) for r in results],
    }


def _loads(values) -> str:
    return "-" if not values else ", ".join(f"{x:.2f}" for x in values)


def markdown_section(data: dict, title: str) -> str:
    """A RESULTS.md section for one `to_json` document: provenance, ceilings, the table."""
    env, ceilings = data["environment"], data.get("ceilings")
    backends = ", ".join(f"{name} ({'available' if reason is None else 'unavailable: ' + reason})"
                         for name, reason in env["backends"].items())
    lines = [
        f"## {title}",
        "",
        f"- device: {env['device_name']} ({env['device']}; {env['cpu_count']} CPUs, "
        f"{env['torch_threads']} torch threads)",
        f"- date: {env['date']}",
        f"- versions: armfast {env['armfast']}"
        + (f" (commit {env['commit']})" if env.get("commit") else "") + f", torch {env['torch']}, triton {env['triton']}, "
        f"open_clip {env['open_clip']}, python {env['python']}"
        + (f", CUDA {env['cuda']}" if env.get("cuda") else ""),
        f"- command: `{data['command']}`",
        *([f"- load average (1/5/15 min) at the start: {_loads(env['load_average'])}; at the end: "
           f"{_loads(env.get('load_average_end'))} (the run itself adds about "
           f"{env['torch_threads']}; more means other processes shared the machine)"]
          if env.get("load_average") else []),
        f"- backends: {backends}",
    ]
    if ceilings:
        peak = ceilings.get("peak_tflops")
        lines.append(f"- measured ceilings ({ceilings['dtype']}): matmul "
                     f"{ceilings['matmul_tflops']:.3g} TFLOP/s (n={ceilings['matmul_n']}), "
                     + (f"FMA peak {peak:.3g} TFLOP/s ({ceilings.get('peak_isa')}), " if peak else "")
                     + f"copy {ceilings['copy_gbps']:.3g} GB/s ({format_bytes(ceilings['copy_bytes'])})"
                     + ("; % mm peak is of the larger compute ceiling" if peak else ""))
    lines.append(f"- peak mem: {data.get('memory_method', 'extra bytes allocated during one call')}")
    lines += ["", format_markdown(rows(data["results"], ceilings)), ""]
    return "\n".join(lines)
