"""Host time of the triton backend's eager attention at a tiny shape, against
F.scaled_dot_product_attention's (issue 22: within 1.2x over 1000 calls):

    python benchmarks/host_time.py [--json FILE]        # on a GPU: CPU timer, 1000 calls each
    TRITON_INTERPRET=1 python benchmarks/host_time.py --no-launch [--profile]   # on the CPU
    python benchmarks/host_time.py --compile-only [--profile]   # CPU, Triton's real launch path

On a GPU each side issues 1000 forward calls (then 1000 forward+backward steps) back to back and
is timed with a CPU timer up to one synchronize: at this shape the kernels take a few
microseconds, so the time is the host's. --no-launch (any machine) replaces every Triton launch
by a no-op and times the Python work of the dispatch path alone (validation, backend choice,
autograd Function, tuner lookup, grid, allocation); --profile prints cProfile's top entries of
that path. --compile-only (no GPU needed, TRITON_INTERPRET unset) runs the triton side through
tools/compile_only.py instead: kernels compiled for sm_90 and Triton's own launch path (argument
binding, specialisation, kernel cache) up to the driver's launch call, which records only; the
first call compiles every candidate config (a minute on a small CPU) and is not timed.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

SHAPE = (1, 2, 16, 64)  # B, H, N, d: tiny, so that only host time shows
CALLS = 1000
KERNELS = ("attn_fwd", "attn_fwd_tma", "attn_bwd_preprocess", "attn_bwd", "attn_bwd_dq")


class _NoLaunch:
    """Stands in for a kernel: takes a launch's arguments and launches nothing."""

    def run(self, *args, grid, warmup=False, **kwargs):
        return None


def no_launches() -> None:
    """Every attention kernel of the triton backend launches nothing from now on."""
    from armfast.ops._backends.triton import attention as launcher
    real = launcher.kernels()
    module = SimpleNamespace(**{**vars(real.module), **{n: _NoLaunch() for n in KERNELS}})
    fake = SimpleNamespace(**{**vars(real), "module": module})
    launcher.kernels = lambda: fake


def per_call_us(fn, calls: int = CALLS) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(20):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def _backend_steps(q, k, v, dout):
    """The triton side below the public op's dispatch (which refuses CPU tensors without the
    interpreter): the backend's forward, and forward then backward."""
    from armfast.ops._backends import triton as _triton
    scale = q.shape[-1] ** -0.5

    def forward():
        return _triton.BACKEND.attention.run_forward(q, k, v, scale, False)

    def fwd_bwd():
        out, lse = forward()
        _triton.attention.attention_backward(dout, q, k, v, out, lse, scale)
    return {("triton", "forward"): forward, ("triton", "fwd+bwd"): fwd_bwd}


def _steps(device, dtype, below_dispatch: bool):
    from armfast.ops import attention
    q, k, v = (torch.randn(SHAPE, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(SHAPE, device=device, dtype=dtype)
    ops = {"sdpa": F.scaled_dot_product_attention}
    if not below_dispatch:
        ops["triton"] = lambda a, b, c: attention(a, b, c, backend="triton")

    def forward(op):
        def call():
            with torch.no_grad():
                op(q, k, v)
        return call

    def fwd_bwd(op):
        def call():
            op(q, k, v).backward(dout)
        return call
    steps = _backend_steps(*(t.detach() for t in (q, k, v)), dout) if below_dispatch else {}
    return {**steps, **{(name, kind): make(op) for name, op in ops.items()
                        for kind, make in (("forward", forward), ("fwd+bwd", fwd_bwd))}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-launch", action="store_true",
                        help="time the dispatch path with every Triton launch a no-op")
    parser.add_argument("--compile-only", action="store_true",
                        help="Triton's launch path with a recording driver (sm_90, bfloat16)")
    parser.add_argument("--profile", action="store_true", help="cProfile the triton forward")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not (args.no_launch or args.compile_only):
        print("host_time: needs a CUDA GPU, or --no-launch (with TRITON_INTERPRET=1) or "
              "--compile-only", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if args.compile_only:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
            from compile_only import compile_only
            stack.enter_context(compile_only(90))
        return _measure(args, cuda and not args.compile_only)


def _measure(args, cuda: bool) -> int:
    if args.no_launch:
        no_launches()
    if not cuda:  # SDPA's CPU kernel would otherwise time the machine's other threads' load
        torch.set_num_threads(1)
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda or args.compile_only else torch.float32
    steps = _steps(device, dtype, args.compile_only)
    times = {key: [] for key in steps}
    for _ in range(args.rounds):  # interleaved: a loaded machine slows both sides alike
        for key, fn in steps.items():
            times[key].append(per_call_us(fn))
    median = {key: sorted(t)[len(t) // 2] for key, t in times.items()}
    rows = []
    for kind in ("forward", "fwd+bwd"):
        tri, ref = median[("triton", kind)], median[("sdpa", kind)]
        rows.append({"kind": kind, "triton_us": round(tri, 2), "sdpa_us": round(ref, 2),
                     "ratio": round(tri / ref, 3), "no_launch": args.no_launch,
                     "compile_only": args.compile_only,
                     "device": device, "shape": SHAPE, "dtype": str(dtype)})
        print(f"{kind:<8} triton {tri:8.2f} us/call   sdpa {ref:8.2f} us/call   "
              f"triton/sdpa {tri / ref:5.2f}" + ("  (triton launches are no-ops)"
                                                  if args.no_launch else "")
              + ("  (triton backend, below dispatch: recording driver; sdpa: CPU)"
                 if args.compile_only else ""))
    if args.profile:
        profile = cProfile.Profile()
        fn = steps[("triton", "forward")]
        profile.runcall(lambda: [fn() for _ in range(CALLS)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(18)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
