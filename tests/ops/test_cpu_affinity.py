"""The paths of the CPU ProxyCLIP kernel (masked_affinity_forward in csrc/cpu/baseline_attention.cpp)
that the op-level tests may not reach: values read in place or packed, row- and column-major
features, query and key tiles with tails, every instruction set, images processed in groups, and
results that do not depend on the thread count."""
import pytest
import torch

from armfast import ops
from helpers.internals import library as _library
from helpers.baseline_math import affinity_inputs, masked_affinity_f64
from helpers.threads import with_threads as _with_threads

pytestmark = pytest.mark.skipif(ops.backend_status("cpu")["cpu"] is not None,
                                reason=f"cpu backend unavailable: {ops.backend_status('cpu')['cpu']}")

TOL = {torch.float32: dict(atol=3e-5, rtol=1e-4), torch.float64: dict(atol=1e-12, rtol=1e-10)}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Outputs start as NaN, so an element the kernel forgets to write fails the comparison."""
    monkeypatch.setattr(_library, "POISON_ALLOCATIONS", True)


def value_layouts(v):
    """v [B, H, n, d] in the layouts the kernel tells apart: contiguous, heads last ([B, n, H, d]
    seen as [B, H, n, d]), and column-major per head (as ProxyCLIP's values come out of the
    bilinear resampling: d is the slow axis)."""
    return {"contiguous": v.contiguous(),
            "heads_last": v.transpose(1, 2).contiguous().transpose(1, 2),
            "columns": v.transpose(2, 3).contiguous().transpose(2, 3)}


def run(f, v, beta, **kwargs):
    return ops.masked_affinity_attention(f, v, beta=beta, backend="cpu", **kwargs)


@pytest.mark.parametrize("n", [1, 7, 63, 64, 65, 130, 197])
@pytest.mark.parametrize("d", [64, 16, 8, 24])
def test_value_layouts_and_head_dims(n, d):
    # d a multiple of every vector width with unit column stride: v read in place; otherwise (d
    # = 8, 24, or the column-major layout) packed by the first pass, zero-padded past d
    g = torch.Generator().manual_seed(n * 100 + d)
    f, v, beta = affinity_inputs(2, n, 40, 3, d, generator=g)
    want = masked_affinity_f64(f, v, beta)
    for name, vl in value_layouts(v).items():
        torch.testing.assert_close(run(f, vl, beta).double(), want, **TOL[torch.float32], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [7, 130])
def test_column_major_features(n, dtype):
    # f as a VFM's [B, C, n] map seen as [B, n, C] (what ProxyCLIP passes)
    g = torch.Generator().manual_seed(n)
    f, v, beta = affinity_inputs(2, n, 37, 2, 16, dtype=dtype, generator=g)
    fc = f.transpose(1, 2).contiguous().transpose(1, 2)
    assert fc.stride(1) == 1
    torch.testing.assert_close(run(fc, v, beta).double(), masked_affinity_f64(f, v, beta), **TOL[dtype])


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_instruction_set_path(isa, monkeypatch):
    # The CPU may lack the requested set; the kernel then runs the best one it has. n = 197:
    # three full tiles of 64 and a tail of 5 rows (not a multiple of any micro-tile's rows).
    # One image on one thread takes the image path (symmetric S), on two the tile path: the
    # same bits.
    monkeypatch.setenv("ARMFAST_CPU_ISA", isa)
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        f, v, beta = affinity_inputs(2, 197, 72, 2, 32, dtype=dtype, generator=g)
        want = masked_affinity_f64(f, v, beta)
        for name, vl in value_layouts(v).items():
            torch.testing.assert_close(run(f, vl, beta).double(), want, **TOL[dtype],
                                       msg=f"{isa} {dtype} {name}")
            one, two = (_with_threads(t, lambda: run(f[:1], vl[:1], beta)) for t in (1, 2))
            assert torch.equal(one, two), f"{isa} {dtype} {name}"


@pytest.mark.parametrize("B", [1, 2, 3, 4])
def test_results_do_not_depend_on_thread_count(B):
    # Large enough for two threads. With one thread, or as many images as threads, each image is
    # one task (every tile of the symmetric S computed once), else one task per query tile: the
    # same arithmetic in the same order, so the results are equal bit for bit.
    g = torch.Generator().manual_seed(B)
    f, v, beta = affinity_inputs(B, 197, 48, 2, 64, generator=g)
    results = [_with_threads(t, lambda: run(f, v, beta)) for t in (1, 2, 1)]
    torch.testing.assert_close(results[0].double(), masked_affinity_f64(f, v, beta), **TOL[torch.float32])
    for other in results[1:]:
        assert torch.equal(results[0], other)


def test_images_in_groups_equal_one_image_at_a_time():
    # 10 key tiles of 4096 features pack to 10 MiB per image, so on the tile path (3 images on
    # 2 threads) the batch runs in groups (of 2: the packed operands' budget is 16 MiB, and 2
    # images give every thread 8 tasks); each image's output must equal its own call's, bit for
    # bit, and so must the image path's (one thread)
    g = torch.Generator().manual_seed(4)
    f, v, beta = affinity_inputs(3, 640, 4096, 1, 16, generator=g)
    v = v.transpose(2, 3).contiguous().transpose(2, 3)  # packed values too
    for threads in (1, 2):
        batch = _with_threads(threads, lambda: run(f, v, beta))
        for b in range(3):
            single = _with_threads(threads, lambda: run(f[b:b + 1], v[b:b + 1], beta))
            assert torch.equal(batch[b:b + 1], single), (threads, b)
    torch.testing.assert_close(batch.double(), masked_affinity_f64(f, v, beta), **TOL[torch.float32])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B,n", [(1, 7), (2, 130), (3, 197)])
def test_nan_reaches_the_outputs_the_reference_poisons(B, n, threads):
    # A NaN feature makes its image's mean(S), hence every score gamma (S - beta mean(S)), NaN:
    # the reference's whole image is NaN, the other images untouched. A NaN value reaches every
    # row of its image and head (0 * NaN in P V). The kernel once kept the mask's decisions but
    # not the NaN: every row but the NaN one kept only its diagonal and came out finite.
    g = torch.Generator().manual_seed(n)
    f, v, beta = affinity_inputs(B, n, 40, 2, 16, generator=g)
    nan_f = f.clone()
    nan_f[B - 1, n // 2, 3] = float("nan")
    nan_v = v.clone()
    nan_v[0, 1, n - 1, 4] = float("nan")
    for ff, vv in ((nan_f, v), (f, nan_v)):
        want = ops.masked_affinity_attention(ff, vv, beta=beta, backend="reference").isnan()
        got = _with_threads(threads, lambda: run(ff, vv, beta)).isnan()
        assert want.any() and not want.all() or B == 1
        assert torch.equal(got, want)
