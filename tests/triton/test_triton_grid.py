"""Launch grids within CUDA's limits (2**31 - 1 programs on axis 0, 65535 on axes 1 and 2) and
offsets past 2**31 elements.

The grid checks swap the kernels for recorders, so they run the wrappers' real grid arithmetic
on batches far too big for the interpreter (it runs about 40 attention programs a second) and
cost nothing. Running such shapes, and tensors of more than 2**31 elements, needs a GPU.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from armfast.ops import _triton, attention
from conftest import assert_close, attention_f64

# CLIP ViT-B's last block on 5462 crops: B * H = 65544 passes axis 1's limit of 65535.
CROPS, HEADS = 5462, 12
# The smallest tile any config (GPU or interpreter) uses: the most programs per axis.
SMALLEST_TILES = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_R": 32, "BLOCK_C": 32, "BLOCK_E": 32}


class _Recorder:
    """Stands in for a kernel: keeps the grid each launch asks for and launches nothing."""

    def __init__(self, name: str, grids: dict):
        self.name, self.grids = name, grids

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids[self.name] = grid({**SMALLEST_TILES, **kwargs}) if callable(grid) else grid
        return launch


@pytest.fixture
def grids(monkeypatch):
    """Routes every launch of the wrappers to a recorder; yields {kernel name: grid}."""
    from armfast.kernels import _common, attention as attn_module, patch_text_logits as ptl_module
    recorded = {}

    def recorders(module, names):
        return SimpleNamespace(**{name: _Recorder(name, recorded) for name in names},
                               **{name: getattr(module, name) for name in dir(module)
                                  if name.isupper()})  # BLOCK_M_PREPROCESS and the like
    kernels = SimpleNamespace(
        common=_common,
        attention=recorders(attn_module, ("attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv",
                                          "attn_bwd_dq")),
        logits=recorders(ptl_module, ("ptl_fwd", "row_norm", "ptl_bwd_gcos", "ptl_bwd_dx",
                                      "ptl_bwd_dtext")))
    monkeypatch.setattr(_triton, "_kernels", lambda: kernels)
    return recorded


def _within_limits(grid):
    return all(1 <= n <= limit for n, limit in zip(grid, _triton.MAX_GRID))


def _tiny(*shape):
    """A tensor of `shape` that owns one element: the wrappers only read shapes and strides."""
    return torch.zeros((1,) * len(shape)).expand(*shape)


def test_attention_puts_batch_heads_on_axis_0(grids):
    B, H, N, d = CROPS, HEADS, 40, 1
    q = _tiny(B, H, N, d)
    out, lse = _triton.BACKEND.attention.run_forward(q, q, q, 0.25, False)
    _triton.attention_backward(out, q, q, q, out, lse, 0.25)
    assert set(grids) == {"attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"}
    for name, grid in grids.items():
        assert len(grid) == 2 and grid[0] == B * H > 65535, (name, grid)
        assert _within_limits(grid), (name, grid)


def test_patch_text_logits_grids_stay_within_limits(grids):
    # 5462 crops x 577 tokens: 3.2 million rows, ~98k row tiles; then as many text rows.
    for B, N, C in ((CROPS, 577, 3), (1, 2, CROPS * 577)):
        grids.clear()
        x, text, scale = _tiny(B, N, 1), _tiny(C, 1), torch.ones(())
        out = _triton.patch_text_logits_forward(x, text, scale)
        _triton.patch_text_logits_backward(out, x, text, scale)
        assert len(grids) == 5
        for name, grid in grids.items():
            assert _within_limits(grid), (B, N, C, name, grid)
        assert max(grids["ptl_fwd"]) > 65535  # the case that needs the flat grid


def test_grid_past_cuda_limits_names_the_tensor():
    with pytest.raises(ValueError, match=r"attention of q \(1, 1, 2097153, 64\).*axis 1"):
        _triton.attention_grid(1, 2**21 + 1, 32, "triton attention of q (1, 1, 2097153, 64)")
    with pytest.raises(ValueError, match="axis 0, expected at most 2147483647"):
        _triton.launch_grid(2**31, 1, what="a test grid")
    assert _triton.attention_grid(CROPS * HEADS, 577, 64, "q") == (CROPS * HEADS, 10)


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
