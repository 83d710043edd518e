"""The `cuda` backend (CUDA kernels of armfast._C_cuda) against independent float64 math.

Half-precision results are held to the accuracy of the same math done by PyTorch in that dtype:
the kernel's error against float64 may be at most a few times PyTorch's own. float32 runs the
exact kernels unless a test allows TF32 (`tf32` fixture). The backward accumulates dQ with
atomics by default; `deterministic` runs it with torch.use_deterministic_algorithms(True).
"""
import warnings

import pytest
import torch

from armfast import ops
from helpers.internals import cuda_backend, library as _library
from helpers.tensors import AWKWARD_N, attention_f64, make_qkv, patch_text_logits_f64

CUDA_BACKEND = cuda_backend.BACKEND

pytestmark = pytest.mark.gpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {"ids": lambda dtype: str(dtype).removeprefix("torch.")}
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # absolute error always allowed
TF32_FLOOR = 5e-3  # relative to the largest value: ~10 units of TF32 rounding (2^-11)


@pytest.fixture(autouse=True)
def cuda_backend_available():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the cuda backend needs compute capability 8.0 or newer")
    reason = ops.backend_status("cuda")["cuda"]
    if reason is not None:  # a GPU is there, so a broken build must not pass as a skip
        pytest.fail(f"a CUDA device is present but the cuda backend is unavailable: {reason}")


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs start as NaN, so an element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(_library, "POISON_ALLOCATIONS", True)


@pytest.fixture
def deterministic():
    """Bitwise-reproducible backward kernels (no atomics), as torch selects them. warn_only: the
    float64 truth's own cuBLAS calls may not be deterministic, and need not be."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.fixture
def tf32(monkeypatch):
    """float32 may run on TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)


def assert_close_to_truth(got, truth, peer, name, factor=3.0):
    """|got - truth| <= factor * |peer - truth| + floor, with peer the same math in got's dtype
    (the floor of TF32, whose rounding PyTorch's exact float32 peer lacks, scales with the values)."""
    assert got.dtype == peer.dtype and got.shape == truth.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - truth).abs().max().item()
    peer_err = (peer.double() - truth).abs().max().item()
    floor = FLOOR[got.dtype]
    if got.dtype == torch.float32 and not exact_float32(got.dtype):
        floor = TF32_FLOOR * max(1.0, truth.abs().max().item())
    assert err <= factor * peer_err + floor, f"{name}: error {err:.3g}, PyTorch in {got.dtype}: {peer_err:.3g}"


def exact_float32(dtype):
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def attention_peer(q, k, v, scale=None):
    """PyTorch in the inputs' dtype (softmax in float32, as the kernels do), exact float32 matmuls."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        s = torch.matmul(q, k.transpose(-2, -1)).float() * scale
        return torch.matmul(torch.softmax(s, dim=-1).to(q.dtype), v)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def cuda_qkv(B, H, nq, nk, d, dtype, *, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_qkv(B, H, nq, nk, d, dtype=dtype, device="cuda", strided=strided, requires_grad=True,
                    generator=g)


def check_attention(q, k, v, *, scale=None, seed=0):
    out = ops.attention(q, k, v, scale=scale, backend="cuda")
    truth = attention_f64(q, k, v, scale)
    peer = attention_peer(q, k, v, scale)
    assert_close_to_truth(out, truth, peer, "out")
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device="cuda", dtype=q.dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    truth_grads = torch.autograd.grad(truth, (q, k, v), dout.double())
    peer_grads = torch.autograd.grad(peer, (q, k, v), dout)
    for name, got, want, ref in zip(("dq", "dk", "dv"), grads, truth_grads, peer_grads):
        assert_close_to_truth(got, want.double(), ref, name)


# ---- attention --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("n", AWKWARD_N + (1025,))
@pytest.mark.parametrize("strided", [False, True])
def test_attention_matches_float64(dtype, n, strided, poisoned):
    check_attention(*cuda_qkv(2, 3, n, n, 64, dtype, strided=strided, seed=n), seed=n)


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("d", [32, 64, 128])
def test_attention_head_dims(dtype, d, poisoned):
    check_attention(*cuda_qkv(1, 2, 100, 77, d, dtype, strided=True, seed=d), seed=d)


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("d", [32, 64, 128])
def test_attention_deterministic_kernels(dtype, d, deterministic, poisoned):
    check_attention(*cuda_qkv(2, 2, 197, 130, d, dtype, strided=True, seed=d), seed=d)


@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("n", [7, 785])
@pytest.mark.parametrize("det", [False, True], ids=["atomic_dq", "deterministic"])
def test_attention_float32_on_tf32_tensor_cores(d, n, det, tf32, poisoned, request):
    if det:
        request.getfixturevalue("deterministic")
    check_attention(*cuda_qkv(1, 2, n, n, d, torch.float32, strided=True, seed=n), seed=n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], **DTYPE_IDS)
def test_attention_writes_through_the_strides_of_out(dtype):
    # The op layer passes out as a [B, H, Nq, d] view of a [B, Nq, H, d] buffer (merging heads is a view).
    q, k, v = (t.detach() for t in cuda_qkv(2, 3, 197, 150, 64, dtype, strided=True))
    buf = torch.full((2, 197, 3, 64), float("nan"), dtype=dtype, device="cuda")
    cuda_backend.cuda_attention_forward(q, k, v, 0.125, buf.transpose(1, 2))
    assert torch.isfinite(buf).all()
    assert_close_to_truth(buf.transpose(1, 2), attention_f64(q, k, v, 0.125), attention_peer(q, k, v, 0.125), "out")
    out, _ = CUDA_BACKEND.attention.run_forward(q, k, v, 0.125, True)  # the op layer's heads-last output
    assert out.shape == (2, 197, 3, 64) and torch.equal(out, buf)


def test_attention_batch_one_vit_b16():
    # ViT-B/16 at batch 1 (8 heads, 785 tokens): B*H*ceil(785/128) < SMs, so the 64-row tiles run.
    check_attention(*cuda_qkv(1, 8, 785, 785, 64, torch.bfloat16, seed=8), seed=8)


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("nq,nk,d", [(7, 197, 64), (197, 1, 32), (5, 33, 128), (300, 65, 128)])
def test_attention_cross_lengths_and_scale(dtype, nq, nk, d, poisoned):
    check_attention(*cuda_qkv(2, 2, nq, nk, d, dtype, strided=True, seed=nq), scale=0.3, seed=nq)


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
def test_attention_saves_log_sum_exp(dtype):
    q, k, v = (t.detach() for t in cuda_qkv(1, 2, 70, 90, 64, dtype, strided=True))
    out, lse = CUDA_BACKEND.attention.forward_op(q, k, v, 0.2)
    assert lse.dtype == torch.float32 and lse.is_contiguous() and out.is_contiguous()
    truth = torch.logsumexp(q.double() @ k.double().transpose(-2, -1) * 0.2, dim=-1)
    torch.testing.assert_close(lse.double(), truth, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-4)


def test_attention_expanded_grad():
    # out.sum().backward() hands the kernel a zero-stride dout
    q, k, v = cuda_qkv(1, 2, 65, 70, 64, torch.float32)
    ops.attention(q, k, v, backend="cuda").sum().backward()
    expected = torch.autograd.grad(attention_f64(q, k, v).sum(), (q, k, v))
    for got, want in zip((q.grad, k.grad, v.grad), expected):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
def test_attention_backward_is_deterministic(dtype, deterministic):
    q, k, v = cuda_qkv(2, 4, 197, 197, 64, dtype)
    dout = torch.randn(2, 4, 197, 64, device="cuda", dtype=dtype)
    runs = []
    for _ in range(3):
        out = ops.attention(q, k, v, backend="cuda")
        runs.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_attention_runs_on_the_current_stream():
    q, k, v = (t.detach() for t in cuda_qkv(2, 2, 150, 150, 64, torch.float16))
    expected = ops.attention(q, k, v, backend="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = ops.attention(q, k, v, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got, expected)


# The layouts the kernels use on sm_86/sm_89/sm_120, which let a block use only 99 KiB of shared
# memory; the cap makes an A100 or H100 run them too.
SMEM_99_KIB = 99 * 1024


@pytest.mark.parametrize("smem_cap", [None, SMEM_99_KIB], ids=["device-tiles", "99KiB-tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], **DTYPE_IDS)
def test_attention_d128_long_sequence(dtype, smem_cap, monkeypatch, poisoned):
    # d=128 has the largest layouts (fp32 forward 117.5 KiB, bf16 dK/dV 145 KiB), too large for
    # 99 KiB; N=785 leaves partial query and key tiles at every tile size.
    if smem_cap is not None:
        monkeypatch.setenv("ARMFAST_CUDA_MAX_SHARED_MEMORY", str(smem_cap))
    check_attention(*cuda_qkv(1, 2, 785, 785, 128, dtype, strided=True, seed=785), seed=785)


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("d", [32, 64, 128])
def test_attention_fits_99_kib_of_shared_memory(dtype, d, monkeypatch, poisoned):
    monkeypatch.setenv("ARMFAST_CUDA_MAX_SHARED_MEMORY", str(SMEM_99_KIB))
    check_attention(*cuda_qkv(1, 2, 100, 77, d, dtype, strided=True, seed=d), seed=d)


def test_attention_too_little_shared_memory_is_a_clear_error(monkeypatch):
    q, k, v = make_qkv(1, 1, 8, 8, 128, device="cuda", dtype=torch.float16)
    monkeypatch.setenv("ARMFAST_CUDA_MAX_SHARED_MEMORY", "40000")
    with pytest.raises(ValueError, match=r"forward kernel for float16 with head dim 128 needs \d+ bytes "
                                         r"of shared memory per block, but cuda:\d+ allows 40000 "
                                         r"\(the cap set by ARMFAST_CUDA_MAX_SHARED_MEMORY\); use "
                                         r"backend='triton' or backend='sdpa'"):
        CUDA_BACKEND.attention.run_forward(q, k, v, 0.125, False)
    monkeypatch.setenv("ARMFAST_CUDA_MAX_SHARED_MEMORY", "64k")
    with pytest.raises(ValueError, match="ARMFAST_CUDA_MAX_SHARED_MEMORY must be a number of bytes"):
        CUDA_BACKEND.attention.run_forward(q, k, v, 0.125, False)
    monkeypatch.delenv("ARMFAST_CUDA_MAX_SHARED_MEMORY")
    out, _ = CUDA_BACKEND.attention.run_forward(q, k, v, 0.125, False)
    assert_close_to_truth(out, attention_f64(q, k, v, 0.125), attention_peer(q, k, v, 0.125), "out")


def test_attention_many_heads_exceed_a_grid_dimension():
    q, k, v = cuda_qkv(70000, 1, 3, 5, 32, torch.float16)
    check_attention(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], **DTYPE_IDS)
def test_attention_opcheck(dtype):
    q, k, v = cuda_qkv(1, 2, 9, 11, 32, dtype, strided=True)
    torch.library.opcheck(CUDA_BACKEND.attention.forward_op, (q, k, v, 0.25))
    q, k, v = q.detach(), k.detach(), v.detach()  # the backward op itself has no autograd
    out, lse = CUDA_BACKEND.attention.forward_op(q, k, v, 0.25)
    torch.library.opcheck(CUDA_BACKEND.attention.backward_op,
                          (torch.randn_like(out), q, k, v, out, lse, 0.25))


# ---- patch_text_logits --------------------------------------------------------------------------

def logits_peer(x, text, scale):
    xn = torch.nn.functional.normalize(x.float(), dim=-1).to(x.dtype)
    tn = torch.nn.functional.normalize(text.float(), dim=-1).to(x.dtype)
    return scale.to(x.dtype) * (xn @ tn.t())


def check_logits(x, text, scale, seed=0):
    out = ops.patch_text_logits(x, text, logit_scale=scale, backend="cuda")
    truth = patch_text_logits_f64(x, text, scale)
    peer = logits_peer(x, text, scale)
    assert_close_to_truth(out, truth, peer, "logits")
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device="cuda", dtype=x.dtype)
    inputs = (x, text, scale)
    grads = torch.autograd.grad(out, inputs, dout)
    truth_grads = torch.autograd.grad(truth, inputs, dout.double())
    peer_grads = torch.autograd.grad(peer, inputs, dout)
    for name, got, want, ref in zip(("dx", "dtext"), grads, truth_grads, peer_grads):
        assert_close_to_truth(got, want.double(), ref, name)
    # dlogit_scale sums B*N*C products: compare relative to its size
    assert grads[2].dtype == scale.dtype and grads[2].shape == scale.shape
    torch.testing.assert_close(grads[2].double(), truth_grads[2].double(),
                               rtol=1e-4 if exact_float32(x.dtype) else 2e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("n", [1, 7, 197, 1500])  # 2 * 1500 rows: dtext's reduction is split
def test_patch_text_logits_matches_float64(dtype, n, poisoned):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, 96, generator=g).to("cuda", dtype).requires_grad_()
    text = torch.randn(71, 96, generator=g).to("cuda", dtype).requires_grad_()
    check_logits(x, text, torch.tensor(40.0, device="cuda", requires_grad=True), seed=n)


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
def test_patch_text_logits_strided(dtype, poisoned):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 66, 2, generator=g).to("cuda", dtype).transpose(1, 2)[:, :, ::2]  # [3, 2, 33]
    text = torch.randn(33, 17, generator=g).to("cuda", dtype).t()  # [17, 33]
    x, text = x.requires_grad_(), text.requires_grad_()
    assert not x.is_contiguous() and not text.is_contiguous()
    check_logits(x, text, torch.tensor(2.5, device="cuda", requires_grad=True))


@pytest.mark.parametrize("n", [7, 1500])  # 1500: dtext's reduction would be split
def test_patch_text_logits_frozen_text_skips_dtext(n, poisoned):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, 64, generator=g).to("cuda").requires_grad_()
    text = torch.randn(19, 64, generator=g).to("cuda")
    scale = torch.tensor(20.0, device="cuda", requires_grad=True)
    dout = torch.randn(2, n, 19, generator=g).to("cuda")
    frozen = torch.autograd.grad(ops.patch_text_logits(x, text, logit_scale=scale, backend="cuda"),
                                 (x, scale), dout)
    full = torch.autograd.grad(ops.patch_text_logits(x, text.clone().requires_grad_(),
                                                     logit_scale=scale, backend="cuda"), (x, scale), dout)
    for a, b in zip(frozen, full):
        assert torch.equal(a, b)  # the same kernels for dx and dlogit_scale either way
    dx, dtext, _ = cuda_backend.cuda_patch_text_logits_backward(dout, x.detach(), text, scale.detach(), False)
    assert dtext is None and dx.shape == x.shape


def test_patch_text_logits_zero_rows_follow_the_eps_clamp():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(1, 4, 8, generator=g)
    x[0, 1] = 0
    text = torch.randn(3, 8, generator=g)
    text[2] = 0
    scale = torch.tensor(1.5)
    dout = torch.randn(1, 4, 3, generator=g)
    results = []
    for backend, device in (("cuda", "cuda"), ("reference", "cpu")):
        xs, ts, ss = (t.to(device).requires_grad_() for t in (x, text, scale))
        out = ops.patch_text_logits(xs, ts, logit_scale=ss, backend=backend)
        results.append([r.cpu() for r in (out, *torch.autograd.grad(out, (xs, ts, ss), dout.to(device)))])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 7, 197])
def test_patch_text_logits_float32_on_tf32_tensor_cores(n, tf32, poisoned):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, 96, generator=g).to("cuda").requires_grad_()
    text = torch.randn(71, 96, generator=g).to("cuda").requires_grad_()
    check_logits(x, text, torch.tensor(40.0, device="cuda", requires_grad=True), seed=n)


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
def test_patch_text_logits_backward_is_deterministic(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 785, 64, generator=g).to("cuda", dtype).requires_grad_()
    text = torch.randn(21, 64, generator=g).to("cuda", dtype).requires_grad_()
    scale = torch.tensor(10.0, device="cuda", requires_grad=True)
    dout = torch.randn(4, 785, 21, device="cuda", dtype=dtype)
    runs = []
    for _ in range(3):
        out = ops.patch_text_logits(x, text, logit_scale=scale, backend="cuda")
        runs.append(torch.autograd.grad(out, (x, text, scale), dout))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_patch_text_logits_opcheck():
    g = torch.Generator().manual_seed(16)
    x = torch.randn(2, 5, 12, generator=g).cuda().requires_grad_()
    text = torch.randn(4, 12, generator=g).cuda().requires_grad_()
    scale = torch.tensor(10.0, device="cuda", requires_grad=True)
    torch.library.opcheck(CUDA_BACKEND.patch_text_logits.forward_op, (x, text, scale))
    torch.library.opcheck(CUDA_BACKEND.patch_text_logits.backward_op,
                          (torch.randn(2, 5, 4, device="cuda"), x.detach(), text.detach(), scale.detach()))


# ---- errors -------------------------------------------------------------------------------------

def test_cuda_backend_rejects_what_it_cannot_run():
    q, k, v = make_qkv(1, 1, 4, 4, 48, device="cuda")
    with pytest.raises(ValueError, match=r"head dims \(32, 64, 128\), got d=48"):
        ops.attention(q, k, v, backend="cuda")
    q, k, v = make_qkv(1, 1, 4, 4, 32, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match="backend 'cuda' supports dtypes"):
        ops.attention(q, k, v, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available on cuda"):
        ops.attention(q.float(), k.float(), v.float(), backend="cpu")
