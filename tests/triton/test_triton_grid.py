"""Launch grids within CUDA's limits (2**31 - 1 programs on axis 0, 65535 on axes 1 and 2) and
offsets past 2**31 elements.

Every kernel runs on a flat axis-0 grid and decodes (batch * head, tile) itself. The grid checks
swap the kernels for recorders, so they run the wrappers' real grid arithmetic on batches far too
big for the interpreter (it runs about 40 attention programs a second) and cost nothing. Running
such shapes, and tensors of more than 2**31 elements, needs a GPU.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from armfast.ops._backends import triton as _triton
from armfast.ops import attention
from helpers.tensors import DEVICE, assert_close, attention_f64

# CLIP ViT-B's last block on 5462 crops: B * H = 65544 passes axis 1's limit of 65535.
CROPS, HEADS = 5462, 12
ATTENTION_KERNELS = ("attn_fwd", "attn_bwd_preprocess", "attn_bwd", "attn_bwd_dq")
LOGITS_KERNELS = ("ptl_fwd", "row_norm", "ptl_bwd_gcos", "ptl_bwd_dx", "ptl_bwd_dtext")


class _Recorder:
    """Stands in for a kernel: keeps the grid, keywords and arguments of each launch, launches
    nothing."""

    def __init__(self, name: str, launches: dict):
        self.name, self.launches = name, launches

    def run(self, *args, grid, warmup, **kwargs):
        self.launches[self.name] = (grid, kwargs, args)


@pytest.fixture
def launches(monkeypatch):
    """Routes every launch of the wrappers to a recorder; yields {kernel name: (grid, kwargs)}."""
    recorded = {}

    def recorders(family, names):
        real = family.kernels()
        module = SimpleNamespace(**{**vars(real.module),
                                    **{n: _Recorder(n, recorded) for n in names}})
        kernels = SimpleNamespace(**{**vars(real), "module": module})
        monkeypatch.setattr(family, "kernels", lambda: kernels)
    recorders(_triton.attention, ATTENTION_KERNELS)
    recorders(_triton.patch_text_logits, LOGITS_KERNELS)
    return recorded


def _tiny(*shape):
    """A tensor of `shape` that owns one element: the wrappers only read shapes and strides (and
    the device: on a GPU it must be a CUDA tensor, as the launchers tune per CUDA device)."""
    return torch.zeros((1,) * len(shape), device=DEVICE).expand(*shape)


def _programs(launch):
    grid = launch[0]
    assert len(grid) == 1 and 1 <= grid[0] <= _triton._launch.MAX_PROGRAMS, grid
    return grid[0]


def test_attention_grids_are_flat_past_65535_heads(launches):
    B, H, N, d = CROPS, HEADS, 40, 1
    q = _tiny(B, H, N, d)
    out, lse = _triton.BACKEND.attention.run_forward(q, q, q, 0.25, False)
    _triton.attention.attention_backward(out, q, q, q, out, lse, 0.25)
    assert set(launches) == {"attn_fwd", "attn_bwd_preprocess", "attn_bwd"}
    for name, launch in launches.items():
        block = launch[1]["BLOCK_N" if name == "attn_bwd" else "BLOCK_M"]
        assert _programs(launch) == B * H * -(-N // block) > 65535, name


def test_deterministic_backward_launches_the_dq_kernel(launches, monkeypatch):
    """`torch.use_deterministic_algorithms(True)` swaps the atomic dQ for its own kernel, which
    also computes delta: two launches, no preprocess (the atomic path's zeroing of dQ)."""
    q = _tiny(2, 3, 40, 8)
    out, lse = _triton.BACKEND.attention.run_forward(q, q, q, 0.25, False)
    _triton.attention.attention_backward(out, q, q, q, out, lse, 0.25)
    assert launches["attn_bwd"][1]["DQ_ATOMIC"] and "attn_bwd_preprocess" in launches
    assert "attn_bwd_dq" not in launches
    launches.clear()
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    _triton.attention.attention_backward(out, q, q, q, out, lse, 0.25)
    assert list(launches) == ["attn_bwd_dq", "attn_bwd"]  # dQ writes the delta dK, dV read
    assert not launches["attn_bwd"][1]["DQ_ATOMIC"]
    assert _programs(launches["attn_bwd_dq"]) == 2 * 3 * 2  # 40 queries: 2 tiles of 32


def test_patch_text_logits_grids_stay_within_limits(launches):
    # 5462 crops x 577 tokens: 3.2 million rows, ~98k row tiles; then as many text rows.
    for B, N, C in ((CROPS, 577, 3), (1, 2, CROPS * 577)):
        launches.clear()
        x, text, scale = _tiny(B, N, 1), _tiny(C, 1), torch.ones((), device=DEVICE)
        out = _triton.patch_text_logits.patch_text_logits_forward(x, text, scale)
        _triton.patch_text_logits.patch_text_logits_backward(out, x, text, scale)
        assert set(launches) == set(LOGITS_KERNELS)
        assert all(_programs(launch) for launch in launches.values())
        assert _programs(launches["ptl_fwd"]) > 65535  # the case that needs the flat grid
        _, meta, args = launches["ptl_fwd"]
        rows, per_batch, classes, _ = args[-4:]  # R, N, C, E
        assert (rows, classes) == (B * N, C) and per_batch in (N, B * N)
        assert _programs(launches["ptl_fwd"]) == (-(-rows // meta["BLOCK_R"])
                                                  * -(-classes // meta["BLOCK_C"]))


def test_grid_past_cuda_limits_names_the_tensor():
    q = _tiny(2**10, 1, 2**21 + 1, 64)
    with pytest.raises(ValueError, match=r"attention of q \(1024, 1, 2097153, 64\) needs "
                                         r"2147484672 programs on launch grid axis 0, "
                                         r"expected at most 2147483647"):
        _triton._launch.flat_grid(2**10, 2**21 + 1, 1, _triton.attention.ATTENTION, q)
    assert _triton._launch.flat_grid(CROPS * HEADS, 577, 64, _triton.attention.ATTENTION, q) == (CROPS * HEADS * 10,)


@pytest.mark.gpu
def test_batch_heads_past_65535_gpu():
    """Runs (the interpreter would take half an hour): 70000 heads of 3 tokens, forward and
    backward, checked on the last heads, whose program ids lie past 65535."""
    torch.manual_seed(9)
    q, k, v = (torch.randn(5834, 12, 3, 16, device="cuda", requires_grad=True) for _ in range(3))
    out = attention(q, k, v, backend="triton")
    dout = torch.randn_like(out)
    out.backward(dout)
    tail = [t[-10:].detach().requires_grad_() for t in (q, k, v)]
    ref = attention_f64(*tail)
    ref.backward(dout[-10:].double())
    assert_close(out[-10:], ref, atol=1e-4, rtol=1e-3, name="out")
    for name, t, r in zip(("dq", "dk", "dv"), (q, k, v), tail):
        assert_close(t.grad[-10:], r.grad, atol=1e-4, rtol=1e-3, name=name)


@pytest.mark.gpu
def test_offsets_past_2_31_elements_gpu():
    """q, k, v as sequence-major views of one packed [N, H, 3, d] buffer: row stride 3 * H * d,
    so rows >= 683 sit past 2**31 elements from the start and int32 offsets would wrap."""
    torch.manual_seed(10)
    N, H, d = 700, 2**14, 64
    qkv = torch.randn(N, H, 3, d, device="cuda")  # 8.8 GB; float32 keeps the check tight
    assert (N - 1) * qkv.stride(0) >= 2**31
    q, k, v = (qkv[:, :, i].permute(1, 0, 2).unsqueeze(0).detach().requires_grad_()
               for i in range(3))
    out = attention(q, k, v, backend="triton")
    dout = torch.randn_like(out)
    out.backward(dout)
    heads = slice(H - 2, H)  # the largest offsets
    tail = [t[:, heads].detach().requires_grad_() for t in (q, k, v)]
    ref = attention_f64(*tail)
    ref.backward(dout[:, heads].double())
    assert_close(out[:, heads], ref, atol=1e-4, rtol=1e-3, name="out")
    for name, t, r in zip(("dq", "dk", "dv"), (q, k, v), tail):
        assert_close(t.grad[:, heads], r.grad, atol=1e-4, rtol=1e-3, name=name)
