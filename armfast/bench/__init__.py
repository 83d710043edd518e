"""Benchmarks of the armfast ops and modules, shared by `armfast bench` and benchmarks/.

- `cases`: what is measured (op, mode, shapes) and how much work it is (FLOPs, byte floor);
- `workloads`: the inputs and timed callables, each checked against the reference backend;
- `timer`: median per-call time, device synchronised once per round;
- `memory`: peak extra memory of one call; `ceilings`: measured matmul and copy ceilings;
- `runner`: all of it over the backends of a device; `report`: text, Markdown and JSON;
- `pipeline`: whole-image slide inference against `official`, the baselines' own loop.
"""
from .cases import MODES, OPS, PRESETS, Case, default_dtype, make_cases
from .runner import Result, environment, run
from .timer import FULL, QUICK, TimerConfig, measure

__all__ = ["OPS", "MODES", "PRESETS", "Case", "make_cases", "default_dtype", "Result", "run",
           "environment", "TimerConfig", "FULL", "QUICK", "measure"]
