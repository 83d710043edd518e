"""What the kernels compile to for Hopper (sm_90), checked without a GPU through the backend's
real launch path (tools/compile_only.py): tensor-core wgmma products, TMA in the TMA forward and no
spills for every candidate config; and one compile per config: a new length, batch or class
count never recompiles.

These run in a subprocess with TRITON_INTERPRET=0 (this directory's tests run interpreted).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"  # compile_only.py, compile_for_gpu.py
# kernels whose products must run on wgmma (row_norm and attn_bwd_preprocess have no dot)
DOT_KERNELS = {"attn_fwd", "attn_fwd_tma", "attn_bwd", "attn_bwd_dq", "ptl_fwd", "ptl_bwd_gcos",
               "ptl_bwd_dx", "ptl_bwd_dtext"}


def _needs_nvidia_backend():
    backends = pytest.importorskip("triton.backends")
    if "nvidia" not in getattr(backends, "backends", {}):
        pytest.skip("this Triton has no NVIDIA backend")


def _python(args, timeout=900) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                            timeout=timeout, cwd=TOOLS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


@pytest.mark.slow
def test_hopper_half_precision_configs_use_wgmma_and_do_not_spill(tmp_path):
    _needs_nvidia_backend()
    rows = []
    # every config list: d = 64 and 32 share the narrow lists, d = 128 has the wide ones
    for i, args in enumerate((["--dtype", "bfloat16", "--head-dim", "64", "--head-dim", "128"],
                              ["--dtype", "float16", "--head-dim", "32", "--skip-logits"])):
        report = tmp_path / f"kernels{i}.json"
        _python(["compile_for_gpu.py", "--arch", "90", *args, "--json", str(report)])
        rows += json.loads(report.read_text())
    assert DOT_KERNELS <= {row["kernel"] for row in rows}
    for row in rows:
        where = f"{row['what']}: {row['kernel']} {row['config']}"
        assert row["spill_bytes"] == 0 and not row["local"], where
        assert row["shared"] <= 232448, where  # fits an H100/H200 block
        if row["kernel"] in DOT_KERNELS:
            assert row["wgmma"], where
        assert row["tma"] == (row["kernel"] == "attn_fwd_tma"), where


COUNT_COMPILES = r"""
import json, torch
from compile_only import compile_only
from armfast.kernels import attention, patch_text_logits as logits
from armfast.ops._backends import triton as _triton

def attention_call(B, H, N, d=64, dtype=torch.bfloat16):
    q = torch.randn(B, H, N, d, dtype=dtype)
    k = torch.randn(B, H, N + 3, d, dtype=dtype)
    out, lse = _triton.BACKEND.attention.run_forward(q, k, k, 0.125, False)
    _triton.attention.attention_backward(out, q, k, k, out, lse, 0.125)

def logits_call(B, N, C, E=512, dtype=torch.bfloat16):
    x = torch.randn(B, N, E, dtype=dtype)
    text = torch.randn(C, E, dtype=dtype)
    out = _triton.patch_text_logits.patch_text_logits_forward(x, text, torch.tensor(10.0))
    _triton.patch_text_logits.patch_text_logits_backward(out, x, text, torch.tensor(10.0))

# (call, first arguments, more in the same buckets, others in new buckets)
CASES = {"attention": (attention_call, (2, 8, 197), [(2, 8, 150), (2, 8, 250), (2, 8, 129)],
                       [(1, 8, 1), (16, 12, 785), (1, 1, 4096)]),
         "logits": (logits_call, (2, 196, 171), [(2, 200, 150), (1, 392, 171), (3, 130, 255)],
                    [(1, 7, 21), (16, 785, 171), (1, 196, 1000)])}
steps = {}
with compile_only(90) as driver:
    ks = {"attn_fwd": _triton.attention.kernels().fwd,
          "ptl_fwd": _triton.patch_text_logits.kernels().fwd}
    for name, (call, first, same, other) in CASES.items():
        for step, calls in (("first", [first]), ("same bucket", same), ("other buckets", other)):
            for args in calls:
                call(*args)
            steps[f"{name} {step}"] = {
                "compiles": dict(driver.compiles),
                "measures": {t: tuner.measures for t, tuner in ks.items()}}
print(json.dumps({"steps": steps,
                  "fwd": len(attention.fwd_configs("sm90", "half", 64)),
                  "fwd_tma": len(attention.fwd_tma_configs("sm90", "half", 64)),
                  "bwd": len(attention.bwd_configs("sm90", "half", 64)),
                  "ptl_fwd": len(logits.fwd_configs("sm90", "half")),
                  "ptl_dx": len(logits.dx_configs("sm90", "half")),
                  "ptl_dtext": len(logits.dtext_configs("sm90", "half"))}))
"""


@pytest.mark.slow
def test_compiles_once_per_config_never_per_length():
    """A cold bucket compiles each candidate config once; further lengths, batches and class
    counts in that bucket neither compile nor measure; other buckets measure again but compile
    nothing (lengths are runtime arguments, never specialised)."""
    _needs_nvidia_backend()
    result = json.loads(_python(["-c", COUNT_COMPILES]).strip().splitlines()[-1])
    steps = result["steps"]
    attention_compiles = {"attn_fwd": result["fwd"], "attn_bwd_preprocess": 1,
                          "attn_bwd": result["bwd"]}
    assert steps["attention first"]["compiles"] == attention_compiles
    assert steps["attention same bucket"] == steps["attention first"]
    # B * H * N = 150720 rows: TMA configs join the candidates (and compile once)
    attention_compiles["attn_fwd_tma"] = result["fwd_tma"]
    other = steps["attention other buckets"]
    assert other["compiles"] == attention_compiles
    assert other["measures"]["attn_fwd"] == 4 * result["fwd"] + result["fwd_tma"]

    logits_compiles = {**attention_compiles, "ptl_fwd": result["ptl_fwd"], "row_norm": 1,
                       "ptl_bwd_gcos": result["ptl_fwd"], "ptl_bwd_dx": result["ptl_dx"],
                       "ptl_bwd_dtext": result["ptl_dtext"]}
    assert steps["logits first"]["compiles"] == logits_compiles
    assert steps["logits same bucket"] == steps["logits first"]
    assert steps["logits other buckets"]["compiles"] == logits_compiles
    assert steps["logits other buckets"]["measures"]["ptl_fwd"] == 4 * result["ptl_fwd"]


@pytest.mark.gpu
def test_lengths_never_recompile_gpu():
    """The same on a GPU, through Triton's own post-compile hook: lengths in and beyond one
    bucket compile the forward, the preprocess and the backward once (configs untuned here;
    d = 48, which no other test uses, so the first call compiles here)."""
    import torch
    from triton import knobs

    from armfast.ops import attention
    compiled = []
    hook, knobs.runtime.jit_post_compile_hook = (knobs.runtime.jit_post_compile_hook,
                                                 lambda *, fn, **kw: compiled.append(fn.name))
    try:
        for n in (197, 150, 250, 1, 785):
            q = torch.randn(2, 8, n, 48, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            attention(q, q, q, backend="triton").sum().backward()
    finally:
        knobs.runtime.jit_post_compile_hook = hook
    assert sorted(compiled) == ["attn_bwd", "attn_bwd_preprocess", "attn_fwd"], compiled
