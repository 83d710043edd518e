"""The baseline attentions of armfast.ops (SCLIP, ClearCLIP, NACLIP, ProxyCLIP) on the reference,
sdpa and cpu backends against independent float64 formulas; their validation, layouts, autograd
(the reference recomputation behind the fused forwards) and torch.compile paths."""
from __future__ import annotations

import pytest
import torch

from armfast import ops
from helpers.internals import library as _library, registry as _registry
from helpers.baseline_math import (GRIDS, affinity_inputs, gaussian_self_correlation_f64, heads,
                                   masked_affinity_f64, self_correlation_f64,
                                   self_correlation_sum_f64, two_cluster_features)

CPU_READY = ops.backend_status("cpu")["cpu"] is None
BACKENDS = ["reference", "sdpa", pytest.param("cpu", marks=pytest.mark.skipif(
    not CPU_READY, reason=f"cpu backend unavailable: {ops.backend_status('cpu')['cpu']}"))]
DTYPES = (torch.float32, torch.float64)
TOL = {torch.float32: dict(atol=3e-5, rtol=1e-4), torch.float64: dict(atol=1e-12, rtol=1e-10)}
OPS = ("self_correlation", "self_correlation_sum", "gaussian_self_correlation",
       "masked_affinity_attention")


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Fused outputs start as NaN, so an element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(_library, "POISON_ALLOCATIONS", True)


def _check(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


def call(op, inputs, backend, **kwargs):
    """One call of `op` on `inputs` (as `make_inputs` gives them), and its float64 formula."""
    if op == "self_correlation":
        x, v = inputs
        return ops.self_correlation(x, v, backend=backend, **kwargs), self_correlation_f64(x, v)
    if op == "self_correlation_sum":
        q, k, v = inputs
        return (ops.self_correlation_sum(q, k, v, backend=backend, **kwargs),
                self_correlation_sum_f64(q, k, v))
    if op == "gaussian_self_correlation":
        x, v, grid, class_token = inputs
        return (ops.gaussian_self_correlation(x, v, grid=grid, class_token=class_token,
                                              backend=backend, **kwargs),
                gaussian_self_correlation_f64(x, v, grid, class_token=class_token))
    f, v, beta = inputs
    return (ops.masked_affinity_attention(f, v, beta=beta, backend=backend, **kwargs),
            masked_affinity_f64(f, v, beta))


def make_inputs(op, grid=(7, 5), *, class_token=True, B=2, H=2, d=64, dtype=torch.float32,
                strided=False, generator=None):
    n = grid[0] * grid[1]
    N = n + class_token
    if op == "masked_affinity_attention":  # patches only, features of another width
        return affinity_inputs(B, n, 48, H, d, dtype=dtype, strided=strided, generator=generator)
    count = 3 if op == "self_correlation_sum" else 2
    ts = heads(B, H, N, d, dtype=dtype, strided=strided, generator=generator, count=count)
    if op == "gaussian_self_correlation":
        return (*ts, grid, class_token)
    return ts


# ---- values against float64 -----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("op", OPS)
def test_matches_float64_formula(op, grid, backend):
    g = torch.Generator().manual_seed(grid[0] * 100 + grid[1])
    big = grid[0] * grid[1] > 400
    inputs = make_inputs(op, grid, B=1 if big else 2, generator=g)
    got, want = call(op, inputs, backend)
    _check(got, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_dtypes_and_strided_inputs(op, dtype, backend):
    g = torch.Generator().manual_seed(5)
    inputs = make_inputs(op, (14, 14), dtype=dtype, strided=True, d=32, generator=g)
    got, want = call(op, inputs, backend)
    _check(got, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid", [(1, 1), (7, 5), (28, 28)])
def test_gaussian_without_class_token(grid, backend):
    g = torch.Generator().manual_seed(7)
    inputs = make_inputs("gaussian_self_correlation", grid, class_token=False, B=1, generator=g)
    got, want = call("gaussian_self_correlation", inputs, backend, scale=0.05)
    want = gaussian_self_correlation_f64(inputs[0], inputs[1], grid, class_token=False, scale=0.05)
    _check(got, want, torch.float32)


# (N, grid): one token, a few, ViT-B/16 at 224 and 448 px (the key tiles' last rows partial)
AWKWARD = ((1, (1, 1)), (7, (2, 3)), (197, (14, 14)), (785, (28, 28)))
SELF_OPS = OPS[:3]


def self_inputs(op, N, grid, *, B, H, d, strided, generator, dtype=torch.float32):
    """Inputs of a self-correlation op with N tokens (a class token unless grid covers them all)."""
    ts = heads(B, H, N, d, dtype=dtype, strided=strided, generator=generator,
               count=3 if op == "self_correlation_sum" else 2)
    return (*ts, grid, N > grid[0] * grid[1]) if op == "gaussian_self_correlation" else ts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,grid", AWKWARD)
@pytest.mark.parametrize("op", SELF_OPS)
def test_self_correlations_at_awkward_sizes(op, N, grid, backend):
    # one head, strided views of a fused projection, head dims with and without a vector tail
    for d, strided in ((32, True), (20, False), (128, N < 500)):
        g = torch.Generator().manual_seed(N * 1000 + d)
        inputs = self_inputs(op, N, grid, B=1, H=1, d=d, strided=strided, generator=g)
        got, want = call(op, inputs, backend)
        _check(got, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", SELF_OPS)
def test_self_correlations_propagate_nan(op, backend):
    # a NaN feature makes every score with that token NaN: the softmax (and its exp) must carry
    # it into the output as std::exp does, not drop it as a max or a clamp would
    g = torch.Generator().manual_seed(12)
    inputs = list(self_inputs(op, 197, (14, 14), B=1, H=2, d=64, strided=False, generator=g))
    inputs[0][0, 1, 150, 7] = float("nan")
    got, want = call(op, tuple(inputs), backend)
    assert want[0, 1].isnan().all() and not want[0, 0].isnan().any()
    torch.testing.assert_close(got.double(), want, equal_nan=True, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", SELF_OPS)
def test_self_correlations_with_peaked_scores(op, backend):
    # scores up to a few hundred: a row's maximum found in a late key tile rescales what came first
    g = torch.Generator().manual_seed(13)
    inputs = self_inputs(op, 197, (14, 14), B=1, H=2, d=64, strided=False, generator=g)
    got = call(op, inputs, backend, scale=1.0)[0]
    if op == "gaussian_self_correlation":
        want = gaussian_self_correlation_f64(*inputs[:3], class_token=True, scale=1.0)
    elif op == "self_correlation_sum":
        want = self_correlation_sum_f64(*inputs, scale=1.0)
    else:
        want = self_correlation_f64(*inputs, scale=1.0)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_sigma_and_scale(backend):
    g = torch.Generator().manual_seed(8)
    x, v = heads(2, 3, 1 + 6 * 11, 16, generator=g, count=2)
    got = ops.gaussian_self_correlation(x, v, grid=(6, 11), sigma=1.5, scale=0.3, backend=backend)
    _check(got, gaussian_self_correlation_f64(x, v, (6, 11), sigma=1.5, scale=0.3), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_affinity_keeps_the_diagonal(backend):
    # identical features: S = 1 everywhere, the threshold 1.2 * mean(S) is above every entry,
    # so only the diagonal is left and each token attends to itself
    f = torch.ones(2, 9, 4, dtype=torch.float64)
    v = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(ops.masked_affinity_attention(f, v, backend=backend), v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_affinity_gamma_and_zero_feature_rows(backend):
    g = torch.Generator().manual_seed(9)
    f, v, beta = affinity_inputs(1, 40, 24, 2, 16, dtype=torch.float64, generator=g)
    f[0, 3] = 0  # normalised with the eps clamp, as F.normalize: S = 0 on its row and column
    got = ops.masked_affinity_attention(f, v, beta=beta, gamma=7.5, backend=backend)
    fn = torch.nn.functional.normalize(f, dim=-1)
    S = fn @ fn.transpose(1, 2)
    A = 7.5 * (S - beta * S.mean())
    A = A.masked_fill((A < 0) & ~torch.eye(40, dtype=torch.bool), float("-inf"))
    torch.testing.assert_close(got, A.softmax(-1).unsqueeze(1) @ v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_affinity_rows_that_start_with_masked_key_tiles(backend):
    g = torch.Generator().manual_seed(14)
    f = two_cluster_features(150, 90, generator=g)
    v = torch.randn(1, 2, 240, 8, generator=g)
    _check(ops.masked_affinity_attention(f, v, backend=backend), masked_affinity_f64(f, v), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_heads_last_layout(op, backend):
    g = torch.Generator().manual_seed(10)
    inputs = make_inputs(op, (5, 9), strided=True, d=16, H=3, generator=g)
    got, want = call(op, inputs, backend, layout="bnhd")
    _check(got, want.transpose(1, 2), torch.float32)
    if backend == "cpu":  # the fused backends write [B, N, H, d]: merging the heads is a view
        assert got.is_contiguous() and got.flatten(2).data_ptr() == got.data_ptr()


# ---- gradients: the reference math recomputed behind the fused forward -------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_gradients(op, backend):
    g = torch.Generator().manual_seed(11)
    inputs = make_inputs(op, (3, 4), B=1, H=2, d=8, dtype=torch.float64, generator=g)
    tensors = [t.requires_grad_() for t in inputs if isinstance(t, torch.Tensor)]
    got, want = call(op, inputs, backend, layout="bnhd")
    dout = torch.randn(got.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(got, tensors, dout)
    expected = torch.autograd.grad(want.transpose(1, 2), tensors, dout)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_gaussian_first_built_under_inference_mode_serves_autograd(backend):
    """NACLIP's G is cached per grid: built first by an inference (a Segmentor runs under
    inference mode), it must still serve a call whose gradients autograd records."""
    grid = (5, 3)  # a grid of its own, so that this test builds the cache entry
    x, v = heads(1, 2, 16, 8, generator=torch.Generator().manual_seed(17), count=2)
    with torch.inference_mode():
        ops.gaussian_self_correlation(x, v, grid=grid, backend=backend)
    x.requires_grad_()
    out = ops.gaussian_self_correlation(x, v, grid=grid, backend=backend)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_no_grad_call_builds_no_graph():
    x, v = heads(1, 1, 5, 8, count=2)
    x.requires_grad_()
    assert ops.self_correlation(x, v, backend="cpu").grad_fn is not None
    with torch.no_grad():
        assert ops.self_correlation(x, v, backend="cpu").grad_fn is None


# ---- the custom-op path (torch.compile) --------------------------------------------------------

@pytest.mark.skipif(not CPU_READY, reason="cpu backend unavailable")
@pytest.mark.parametrize("op", OPS)
def test_fast_path_equals_custom_ops_and_opcheck(op):
    g = torch.Generator().manual_seed(12)
    inputs = make_inputs(op, (3, 4), B=1, H=2, d=8, strided=True, generator=g)
    impl = _registry.load("cpu").ops[op]
    tensors = [t.requires_grad_() for t in inputs if isinstance(t, torch.Tensor)]
    args = _op_args(op, inputs) + (True,)
    eager, compiled = impl(*args), impl.compiled(*args)
    assert torch.equal(eager, compiled)
    dout = torch.randn(eager.shape, generator=g)
    for a, b in zip(torch.autograd.grad(eager, tensors, dout), torch.autograd.grad(compiled, tensors, dout)):
        assert torch.equal(a, b)
    torch.library.opcheck(impl.forward_op, args)
    # The backward op is torch.func.vjp of the reference math: opcheck's other checks run it under
    # dispatch modes that cannot read functorch's wrapped tensors, so its fake is checked here.
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(impl.op.backward_op, (dout, *detached),
                          test_utils=("test_autograd_registration",))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in (dout, *detached)]
        shapes = [t.shape for t in impl.op.backward_op(*fake)]
    assert shapes == [t.shape for t in tensors]


def _op_args(op, inputs):
    """The positional arguments of the backends' op implementations (before heads_last)."""
    if op == "gaussian_self_correlation":
        x, v, grid, class_token = inputs
        return (x, v, 8 ** -0.5, grid[0], grid[1], 5.0, class_token)
    if op == "masked_affinity_attention":
        f, v, beta = inputs
        return (f, v, beta, 3.0)
    return (*inputs, 8 ** -0.5)


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
def test_compile_fullgraph(backend):
    g = torch.Generator().manual_seed(13)
    q, k, v = (t.requires_grad_() for t in heads(1, 2, 13, 8, generator=g))
    f = torch.randn(1, 12, 6, generator=g)

    def fn(q, k, v, f):
        a = ops.self_correlation_sum(q, k, v, backend=backend, layout="bnhd").flatten(2)
        b = ops.gaussian_self_correlation(k, v, grid=(3, 4), backend=backend)
        c = ops.masked_affinity_attention(f, v[:, :, 1:], backend=backend)
        return a.sum() + b.sum() + ops.self_correlation(c, c, backend=backend).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got, want = compiled(q, k, v, f), fn(q, k, v, f)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(want, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- bad arguments ----------------------------------------------------------------------------

def _xv(N=13, d=8):
    return torch.randn(1, 2, N, d), torch.randn(1, 2, N, d)


@pytest.mark.parametrize("call_it,error,match", [
    (lambda x, v: ops.self_correlation(x, v[..., :4]), ValueError, r"v must have the shape of x"),
    (lambda x, v: ops.self_correlation(x, v.double()), TypeError, "v must have the dtype of x"),
    (lambda x, v: ops.self_correlation(x[0], v), ValueError, r"x must be 4-D \[B, H, N, d\]"),
    (lambda x, v: ops.self_correlation(x, v, scale=0.0), ValueError, "scale must be finite and > 0"),
    (lambda x, v: ops.self_correlation_sum(x, x[:, :1], v), ValueError, "k must have the shape of q"),
    (lambda x, v: ops.self_correlation(x, v, layout="nhd"), ValueError, "layout must be 'bhnd'"),
    (lambda x, v: ops.gaussian_self_correlation(x, v, grid=(3, 3)), ValueError,
     r"grid \(3, 3\) has 9 patches plus the class token, 10 tokens, but x has N=13 tokens"),
    (lambda x, v: ops.gaussian_self_correlation(x, v, grid=(3, 4), class_token=False), ValueError,
     "grid .* 12 tokens, but x has N=13"),
    (lambda x, v: ops.gaussian_self_correlation(x, v, grid=(3, 4), sigma=0), ValueError,
     "sigma must be finite and > 0"),
    (lambda x, v: ops.gaussian_self_correlation(x, v, grid=(3, 4), sigma=float("inf")), ValueError,
     "sigma must be finite"),
    (lambda x, v: ops.gaussian_self_correlation(x, v, grid=12), TypeError, "grid must be a pair of ints"),
    (lambda x, v: ops.gaussian_self_correlation(x, v, grid=(3.0, 4)), TypeError, "grid must be a pair"),
    (lambda x, v: ops.gaussian_self_correlation(x, v, grid=(0, 4)), ValueError, "grid must be positive"),
    (lambda x, v: ops.gaussian_self_correlation(x, v, grid=(3, 4), class_token=1), TypeError,
     "class_token must be a bool"),
    (lambda x, v: ops.masked_affinity_attention(x[0], v), ValueError,
     r"v must be \[B, H, n, d\] with f's B=2 and n=13"),
    (lambda x, v: ops.masked_affinity_attention(x[:, 0], v, beta=float("nan")), ValueError,
     "beta must be finite"),
    (lambda x, v: ops.masked_affinity_attention(x[:, 0, :, :5], v, gamma=-1.0), ValueError,
     "gamma must be finite and > 0"),
    (lambda x, v: ops.masked_affinity_attention(x[:, 0], v, beta="1"), TypeError,
     "beta must be a real number"),
    (lambda x, v: ops.masked_affinity_attention(x, v), ValueError, r"f must be 3-D \[B, n, C\]"),
    (lambda x, v: ops.masked_affinity_attention(x[:, 0].long(), v), TypeError, "f must be a floating"),
])
def test_bad_arguments(call_it, error, match):
    with pytest.raises(error, match=match):
        call_it(*_xv())


# ---- auto: the measured table ------------------------------------------------------------------

@pytest.mark.skipif(not CPU_READY, reason="cpu backend unavailable")
def test_auto_follows_the_table(tmp_path, monkeypatch):
    import json

    from helpers.internals import auto as _auto, specs as _specs

    path = tmp_path / "auto_table.json"
    monkeypatch.setenv(_auto.TABLE_ENV, str(path))
    q, k, v = heads(1, 2, 17, 16, count=3)
    dim, work = _specs.self_correlation_sum_key(*q.shape)
    entry = {"op": "self_correlation_sum", "device": "cpu", "dtype": "float32", "dim": dim, "mode": "forward",
             "bucket": _auto.bucket(work), "backend": "cpu", "vs_sdpa": 1.5, "shapes": ["x"]}
    path.write_text(json.dumps({"format": 1, "measurements": [], "entries": [entry]}))
    _registry.clear_cache()
    try:
        assert ops.resolve_backend("self_correlation_sum", "auto", v, work=work) == "cpu"
        # no entry for the other ops, for training, or for another size: sdpa
        assert ops.resolve_backend("self_correlation", "auto", v, work=work) == "sdpa"
        assert ops.resolve_backend("self_correlation_sum", "auto", v, work=work, train=True) == "sdpa"
        impl = _registry.load("cpu").ops["self_correlation_sum"]
        calls = []
        original = impl.forward
        impl.forward = lambda *a: calls.append(1) or original(*a)
        try:
            out = ops.self_correlation_sum(q, k, v)
        finally:
            impl.forward = original
        assert calls == [1]
        _check(out, self_correlation_sum_f64(q, k, v), torch.float32)
    finally:
        _registry.clear_cache()
