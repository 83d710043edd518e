"""The paths of the CPU kernels of SC-CLIP's ops (csrc/cpu/similarity.cpp) that the op-level tests
may not reach: values read in place or packed, row- and column-major features, tiles with tails,
every instruction set, images in groups, results that do not depend on the thread count, and the
custom ops torch.compile runs."""
import pytest
import torch

from armfast import ops
from helpers.internals import registry as _registry
from helpers.threads import with_threads

pytestmark = [pytest.mark.skipif(ops.backend_status("cpu")["cpu"] is not None,
                                 reason=f"cpu backend unavailable: {ops.backend_status('cpu')['cpu']}"),
              pytest.mark.usefixtures("poisoned_allocations")]  # outputs start as NaN

TOL = {torch.float32: dict(atol=3e-5, rtol=1e-4), torch.float64: dict(atol=1e-12, rtol=1e-10)}


def inputs(B, N, C, H, d, dtype=torch.float32, seed=0):
    """f [B, N, C] (a shared direction plus noise), k and v [B, H, N, d], float64 before the cast;
    threshold and beta are picked per test away from every S (see `clear_of`)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, N, C, dtype=torch.float64, generator=g) + torch.randn(C, dtype=torch.float64, generator=g)
    k, v = (torch.randn(B, H, N, d, dtype=torch.float64, generator=g) for _ in range(2))
    return f.to(dtype), k.to(dtype), v.to(dtype)


def clear_of(values, lo, hi):
    """The middle of the widest gap of `values` in [lo, hi]."""
    inside = values[(values > lo) & (values < hi)].sort().values
    edges = torch.cat([inside.new_tensor([lo]), inside, inside.new_tensor([hi])])
    i = int((edges[1:] - edges[:-1]).argmax())
    return float(edges[i] + edges[i + 1]) / 2


def cosines(f):
    fn = torch.nn.functional.normalize(f.double(), dim=-1)
    return fn @ fn.transpose(1, 2)


def threshold_and_beta(f):
    S = cosines(f)
    ratio = S / S.mean(dim=(1, 2), keepdim=True)
    return clear_of(S.flatten(), 0.3, 0.7), clear_of(ratio.flatten(), 0.8, 1.3)


def expected(f, k, v, threshold, beta):
    """The float64 reference math of both ops (the reference backend on float64 copies)."""
    f, k, v = f.double(), k.double(), v.double()
    x = v[:, 0]
    return (ops.similarity_aggregation(f, x, threshold=threshold, backend="reference"),
            ops.averaged_dual_softmax(f, k, v, beta=beta, backend="reference"))


def both(f, k, v, threshold, beta):
    return (ops.similarity_aggregation(f, v[:, 0], threshold=threshold, backend="cpu"),
            ops.averaged_dual_softmax(f, k, v, beta=beta, backend="cpu"))


def layouts(t):
    """t [B, H, N, d] contiguous, heads last ([B, N, H, d] seen as [B, H, N, d]) and column-major
    per head (d the slow axis): read in place, or packed by the first pass."""
    return {"contiguous": t.contiguous(), "heads_last": t.transpose(1, 2).contiguous().transpose(1, 2),
            "columns": t.transpose(2, 3).contiguous().transpose(2, 3)}


@pytest.mark.parametrize("N", [1, 7, 63, 64, 65, 130])
@pytest.mark.parametrize("d", [64, 16, 24])
def test_value_layouts_and_widths(N, d):
    f, k, v = inputs(2, N, 40, 3, d, seed=N * 100 + d)
    threshold, beta = threshold_and_beta(f)
    want = expected(f, k, v, threshold, beta)
    for name, vl in layouts(v).items():
        for got, w in zip(both(f, layouts(k)[name], vl, threshold, beta), want):
            torch.testing.assert_close(got.double(), w, **TOL[torch.float32], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_column_major_features(dtype):
    # f as a feature map [B, C, N] seen as [B, N, C]
    f, k, v = inputs(2, 77, 37, 2, 16, dtype=dtype, seed=1)
    fc = f.transpose(1, 2).contiguous().transpose(1, 2)
    assert fc.stride(1) == 1
    threshold, beta = threshold_and_beta(f)
    for got, w in zip(both(fc, k, v, threshold, beta), expected(f, k, v, threshold, beta)):
        torch.testing.assert_close(got.double(), w, **TOL[dtype])


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_instruction_set_and_thread_count(isa, monkeypatch):
    # The CPU may lack the requested set; the kernel then runs the best one it has. N = 197:
    # three full tiles of 64 and a tail of 5 rows (not a multiple of any micro-tile's rows).
    # One image on one thread takes the image path (each tile of the symmetric S and k k^T once,
    # for both row blocks), on two the tile path: the same bits. Three images: the image path.
    monkeypatch.setenv("ARMFAST_CPU_ISA", isa)
    for dtype, B in ((torch.float32, 1), (torch.float64, 1), (torch.float32, 3)):
        f, k, v = inputs(B, 197, 72, 2, 32, dtype=dtype, seed=3)
        threshold, beta = threshold_and_beta(f)
        want = expected(f, k, v, threshold, beta)
        one, two = (with_threads(t, lambda: both(f, k, v, threshold, beta)) for t in (1, 2))
        for a, b, w in zip(one, two, want):
            assert torch.equal(a, b)  # each task writes its own rows, in a fixed order
            torch.testing.assert_close(a.double(), w, **TOL[dtype])


def test_paths_and_groups_give_the_same_bits():
    # 9 key tiles of 2048 features: 4.7 MB of packed features per image. On two threads five
    # images take the tile path, in groups of 3 and 2 (16 MiB of packed operands per group); on
    # one thread the image path (each image packed by its own task). Same bits, and each image
    # as if alone.
    f, k, v = inputs(5, 520, 2048, 2, 8, seed=4)
    threshold, beta = threshold_and_beta(f)
    tiles = with_threads(2, lambda: both(f, k, v, threshold, beta))
    images = with_threads(1, lambda: both(f, k, v, threshold, beta))
    for b in (0, 4):
        single = with_threads(2, lambda: both(f[b:b + 1], k[b:b + 1], v[b:b + 1], threshold, beta))
        for got, alone in zip(tiles, single):
            assert torch.equal(got[b:b + 1], alone), b
    for a, b in zip(tiles, images):
        assert torch.equal(a, b)
    sdpa = (ops.similarity_aggregation(f, v[:, 0], threshold=threshold, backend="sdpa"),
            ops.averaged_dual_softmax(f, k, v, beta=beta, backend="sdpa"))
    for got, want in zip(tiles, sdpa):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("op", ["similarity_aggregation", "averaged_dual_softmax"])
def test_fast_path_equals_custom_op_and_opcheck(op):
    f, k, v = inputs(1, 12, 6, 2, 8, seed=5)
    threshold, beta = threshold_and_beta(f)
    if op == "similarity_aggregation":
        x = v[:, 0].transpose(1, 2).contiguous().transpose(1, 2)  # strided
        args, tensors = (f, x, threshold, False), (f, x)
    else:
        args, tensors = (f, k, v, 8 ** -0.5, beta, 3.0, False), (f, k, v)
    impl = _registry.load("cpu").ops[op]
    for t in tensors:
        t.requires_grad_()
    eager, compiled = impl(*args), impl.compiled(*args)
    assert torch.equal(eager, compiled)
    dout = torch.randn(eager.shape)
    for a, b in zip(torch.autograd.grad(eager, tensors, dout), torch.autograd.grad(compiled, tensors, dout)):
        assert torch.equal(a, b)
    torch.library.opcheck(impl.forward_op, args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in (dout, *args)]
        shapes = [t.shape for t in impl.op.backward_op(*fake)]
    assert shapes == [t.shape for t in tensors]
