"""The op layer: the eager fast path against the custom-op path, output layouts, torch.compile,
`auto` choosing from the measured table (issue 12), `explain` saying why, and each backend's
limits, declared once, refusing the same calls on the eager and the compiled path."""
from __future__ import annotations

import json

import pytest
import torch

from armfast import ops
from armfast.cli import main
from helpers.internals import auto as _auto, registry as _registry
from helpers.tensors import attention_f64, make_qkv

EAGER_BACKENDS = ("reference", "cpu")


@pytest.fixture
def table(tmp_path, monkeypatch):
    """An empty auto table of the test's own, and no cached choices before or after."""
    path = tmp_path / "auto_table.json"
    monkeypatch.setenv(_auto.TABLE_ENV, str(path))
    _registry.clear_cache()
    yield path
    _registry.clear_cache()


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


# ---- eager fast path == custom-op path ------------------------------------------------------

@pytest.mark.parametrize("backend", EAGER_BACKENDS)
@pytest.mark.parametrize("heads_last", [False, True])
def test_attention_fast_path_equals_custom_ops(backend, heads_last):
    g = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(2, 3, 7, 197, 32, strided=True, requires_grad=True, generator=g)
    impl = _registry.load(backend).attention
    eager = impl(q, k, v, 0.2, heads_last)
    compiled = impl.compiled(q, k, v, 0.2, heads_last)
    assert torch.equal(eager, compiled)
    dout = torch.randn(eager.shape, generator=g)
    for a, b in zip(_grads(eager, (q, k, v), dout), _grads(compiled, (q, k, v), dout)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_patch_text_logits_fast_path_equals_custom_ops(backend):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 16, generator=g).requires_grad_()
    text = torch.randn(5, 16, generator=g).requires_grad_()
    scale = torch.tensor(30.0, requires_grad=True)
    impl = _registry.load(backend).patch_text_logits
    eager, compiled = impl(x, text, scale), impl.compiled(x, text, scale)
    assert torch.equal(eager, compiled)
    dout = torch.randn(eager.shape, generator=g)
    for a, b in zip(_grads(eager, (x, text, scale), dout), _grads(compiled, (x, text, scale), dout)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_frozen_text_skips_its_gradient_and_keeps_the_others(backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 16, generator=g).requires_grad_()
    text = torch.randn(4, 16, generator=g)
    scale = torch.tensor(20.0, requires_grad=True)
    dout = torch.randn(2, 7, 4, generator=g)
    frozen = _grads(ops.patch_text_logits(x, text, logit_scale=scale, backend=backend), (x, scale), dout)
    full = _grads(ops.patch_text_logits(x, text.requires_grad_(), logit_scale=scale, backend=backend),
                  (x, scale), dout)
    for a, b in zip(frozen, full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # and the backend really is asked to skip it
    impl = _registry.load(backend).patch_text_logits
    dx, dtext, _ = impl.backward(dout, x.detach(), text.detach(), scale.detach(), False)
    assert dtext is None and dx.shape == x.shape


def test_no_grad_calls_build_no_graph():
    q, k, v = make_qkv(1, 2, 5, 5, 8, requires_grad=True)
    assert ops.attention(q, k, v, backend="cpu").grad_fn is not None
    with torch.no_grad():
        assert ops.attention(q, k, v, backend="cpu").grad_fn is None
    assert ops.attention(q.detach(), k.detach(), v.detach(), backend="cpu").grad_fn is None


def test_gradients_flow_only_through_the_output():
    # the log-sum-exp is saved for the backward, never returned: one output, one gradient
    q, k, v = make_qkv(1, 1, 4, 6, 8, requires_grad=True)
    out = ops.attention(q, k, v, backend="cpu")
    assert isinstance(out, torch.Tensor) and out.grad_fn.next_functions
    out.sum().backward()
    assert all(t.grad is not None for t in (q, k, v))


# ---- output layout --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "sdpa", "cpu"])
def test_heads_last_layout(backend):
    g = torch.Generator().manual_seed(6)
    q, k, v = make_qkv(2, 3, 7, 9, 16, strided=True, requires_grad=True, generator=g)
    out = ops.attention(q, k, v, backend=backend, layout="bnhd")
    assert out.shape == (2, 7, 3, 16)
    torch.testing.assert_close(out.double(), attention_f64(q, k, v).transpose(1, 2), atol=2e-5, rtol=1e-4)
    if backend != "sdpa":  # the fused and reference backends write it contiguous: merging is a view
        merged = out.flatten(2)
        assert out.is_contiguous() and merged.data_ptr() == out.data_ptr()
    dout = torch.randn(out.shape, generator=g)
    got = _grads(out, (q, k, v), dout)
    want = _grads(attention_f64(q, k, v).transpose(1, 2), (q, k, v), dout.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=5e-5, rtol=1e-4)


def test_layout_is_checked():
    q, k, v = make_qkv(1, 1, 3, 3, 8)
    with pytest.raises(ValueError, match="layout must be 'bhnd'"):
        ops.attention(q, k, v, layout="nhd")


# ---- custom ops called directly still check what the kernels read ---------------------------

def test_backward_op_checks_saved_tensors():
    q, k, v = make_qkv(1, 2, 5, 5, 8)
    impl = _registry.load("cpu").attention
    out, lse = impl.forward_op(q, k, v, 0.3)
    with pytest.raises(ValueError, match="lse must be torch.float32"):
        impl.backward_op(out, q, k, v, out, lse.double(), 0.3)
    with pytest.raises(ValueError, match="dout must be"):
        impl.backward_op(out[:, :, :4], q, k, v, out, lse, 0.3)


# ---- torch.compile ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [*EAGER_BACKENDS, "auto"])
def test_compile_fullgraph_forward_and_backward(backend):
    g = torch.Generator().manual_seed(7)
    q, k, v = make_qkv(1, 2, 9, 11, 16, strided=True, requires_grad=True, generator=g)
    x = torch.randn(1, 9, 16, generator=g).requires_grad_()
    text = torch.randn(3, 16, generator=g)

    def f(q, k, v, x):
        o = ops.attention(q, k, v, backend=backend, layout="bnhd").flatten(2)
        return ops.patch_text_logits(x + o[..., :16], text, logit_scale=10.0, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, want = compiled(q, k, v, x), f(q, k, v, x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    dout = torch.randn(got.shape, generator=g)
    for a, b in zip(_grads(got, (q, k, v, x), dout), _grads(want, (q, k, v, x), dout)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_compile_with_dynamic_shapes(backend):
    # sizes are symbolic while tracing: the backend choice must not need their values
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: ops.attention(q, k, v, backend=backend, layout="bnhd").flatten(2),
                      backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (5, 300):
        q, k, v = make_qkv(1, 2, n, n, 16, requires_grad=True)
        got, want = f(q, k, v), attention_f64(q, k, v).transpose(1, 2).flatten(2)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
        got.sum().backward()
        assert q.grad is not None


# ---- auto: the measured table ------------------------------------------------------------------

def _write(path, entries):
    path.write_text(json.dumps({"format": 1, "measurements": [], "entries": entries}))
    _registry.clear_cache()


def _entry(backend, *, op="attention", dim=32, mode="forward", work=4 * 1 * 2 * 9 * 9 * 32,
           dtype="float32"):
    return {"op": op, "device": "cpu", "dtype": dtype, "dim": dim, "mode": mode,
            "bucket": _auto.bucket(work), "backend": backend, "vs_sdpa": 1.5, "shapes": ["x"]}


def test_auto_without_an_entry_takes_sdpa(table):
    q, k, v = make_qkv(1, 2, 9, 9, 32)
    assert ops.resolve_backend("attention", "auto", q, work=4 * 2 * 81 * 32) == "sdpa"
    assert ops.resolve_backend("patch_text_logits", "auto", torch.randn(1, 9, 32), work=100) == "sdpa"


def test_auto_follows_the_table(table):
    work = 4 * 1 * 2 * 9 * 9 * 32
    _write(table, [_entry("cpu", work=work)])
    q, k, v = make_qkv(1, 2, 9, 9, 32)
    assert ops.resolve_backend("attention", "auto", q, work=work) == "cpu"
    # other keys of the same call kind have no entry: sdpa
    assert ops.resolve_backend("attention", "auto", q, work=work, train=True) == "sdpa"
    assert ops.resolve_backend("attention", "auto", q, work=work * 16) == "sdpa"
    assert ops.resolve_backend("attention", "auto", q.double(), work=work) == "sdpa"
    # what the public op does with it: q k v of that size, no gradients -> the cpu backend
    choice = ops.auto_choice("attention", "cpu", torch.float32, 32, train=False, work=work)
    assert choice.backend == "cpu" and "measured" in choice.source
    calls = []
    impl = _registry.load("cpu").attention
    original = impl.forward
    impl.forward = lambda *a: calls.append(1) or original(*a)
    try:
        ops.attention(q, k, v)
    finally:
        impl.forward = original
    assert calls == [1]


def test_auto_falls_back_when_the_table_names_an_unusable_backend(table):
    work = 4 * 1 * 2 * 9 * 9 * 32
    _write(table, [_entry("triton", work=work), _entry("cpu", work=work, dtype="float16")])
    q, k, v = make_qkv(1, 2, 9, 9, 32)
    # triton needs TRITON_INTERPRET=1 on the CPU; cpu takes no float16
    assert ops.resolve_backend("attention", "auto", q, work=work) == "sdpa"
    assert ops.resolve_backend("attention", "auto", q.half(), work=work) == "sdpa"


def test_a_broken_table_is_named(table):
    table.write_text("{not json")
    _registry.clear_cache()
    q, k, v = make_qkv(1, 1, 3, 3, 8)
    with pytest.raises(RuntimeError, match="auto table .* cannot be read"):
        ops.attention(q, k, v)


def _record(backend, label, seconds, *, mode="forward", shape=None):
    shape = shape or {"B": 1, "H": 8, "Nq": 196, "Nk": 196, "d": 64}
    return {"op": "attention", "mode": mode, "dtype": "float32", "label": label, "shape": shape,
            "backend": backend, "median_s": seconds, "error": None}


def test_choose_needs_a_win_at_every_shape_of_a_bucket():
    big = {"B": 1, "H": 8, "Nq": 200, "Nk": 200, "d": 64}  # same bucket as 196 tokens
    assert _auto.case_key("attention", big) == _auto.case_key(
        "attention", {"B": 1, "H": 8, "Nq": 196, "Nk": 196, "d": 64})
    records = [_record("sdpa", "a", 1.0), _record("cpu", "a", 0.5),
               _record("sdpa", "b", 1.0, shape=big), _record("cpu", "b", 1.1, shape=big),
               _record("sdpa", "a", 1.0, mode="train"), _record("cpu", "a", 0.9, mode="train"),
               _record("reference", "a", 0.8, mode="train")]
    entries = {e["mode"]: e for e in _auto.choose(records, "cpu")}
    assert entries["forward"]["backend"] == "sdpa"  # faster at one shape, slower at the other
    assert entries["train"]["backend"] == "reference"  # the fastest of those that beat sdpa
    assert entries["train"]["vs_sdpa"] == pytest.approx(1.25)
    failed = [_record("sdpa", "a", 1.0), {**_record("cpu", "a", 0.1), "error": "wrong"}]
    assert _auto.choose(failed, "cpu")[0]["backend"] == "sdpa"


def test_write_table_replaces_only_what_was_measured(tmp_path):
    path = tmp_path / "t.json"
    old = [_entry("cpu"), {**_entry("cuda"), "device": "cuda-sm90"}]
    path.write_text(json.dumps({"format": 1, "measurements": [{"device": "cpu", "dtype": "float32"}],
                                "entries": old}))
    new = [{**_entry("sdpa"), "mode": "train"}]
    data = _auto.write_table(path, new, {"device": "cpu", "dtype": "float32", "date": "today"})
    assert sorted(e["device"] + e["mode"] for e in data["entries"]) == ["cputrain", "cuda-sm90forward"]
    assert data["measurements"] == [{"device": "cpu", "dtype": "float32", "date": "today"}]
    assert json.loads(path.read_text()) == data
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temporary file left behind


def test_bench_tune_writes_the_table_and_backends_shows_it(table, monkeypatch, capsys):
    monkeypatch.setenv("ARMFAST_BENCH_SHAPES", "host")
    assert main(["bench", "--tune", "--no-ceilings", "--modes", "forward", "--write-table",
                 "--ops", "attention,patch_text_logits,self_correlation_sum"]) == 0
    data = json.loads(table.read_text())
    ops_written = {e["op"] for e in data["entries"]}
    assert ops_written == {"attention", "patch_text_logits", "self_correlation_sum"}
    assert all(e["device"] == "cpu" and e["mode"] == "forward" for e in data["entries"])
    assert data["measurements"][0]["command"].startswith("armfast bench --tune")
    capsys.readouterr()
    assert main(["backends", "--device", "cpu"]) == 0
    shown = capsys.readouterr().out
    assert str(table) in shown and "anything else" in shown
    for e in data["entries"]:
        assert f"-> {e['backend']}" in shown


# ---- explain: which backend a call runs on, and why not the others -----------------------------

def _verdicts(why) -> dict:
    return {c.backend: c.verdict for c in why.candidates}


def test_explain_agrees_with_the_call_and_runs_nothing(table, monkeypatch):
    q, k, v = make_qkv(1, 2, 9, 9, 32)
    work = 4 * 2 * 81 * 32
    _write(table, [_entry("cpu", work=work)])
    why = ops.explain(ops.attention, q, k, v)
    assert why.backend == ops.resolve_backend("attention", "auto", q, work=work) == "cpu"
    assert why.table.backend == "cpu" and why.table.source.startswith("measured: 1.50x sdpa")
    assert _verdicts(why) == {"cpu": "picked", "sdpa": "not tried", "reference": "not tried",
                              "triton": "not considered", "cuda": "not considered"}
    reasons = {c.backend: c.reasons for c in why.candidates}
    assert "runs on cuda tensors, not cpu" in reasons["cuda"][0] and reasons["cpu"] == ()
    # the call as written: with gradients needed it is another key of the table (no entry)
    q.requires_grad_()
    assert ops.explain("attention", q, k, v).backend == "sdpa"

    def boom(*args, **kwargs):
        raise AssertionError("explain ran the op")
    monkeypatch.setitem(_registry.load("cpu").ops, "attention", boom)
    assert ops.explain(ops.attention, q.detach(), k, v).backend == "cpu"
    text = str(ops.explain(ops.attention, q.detach(), k, v))
    assert text.splitlines()[0].startswith("attention on cpu, float32, dim 32, forward")
    assert "cuda       not considered" in text and "-> cpu" in text.splitlines()[0]


def test_explain_says_why_the_table_choice_lost(table, monkeypatch):
    x, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    work = 4 * 2 * 81 * 16
    _write(table, [_entry("cpu", op="self_correlation", dim=16, work=work)])
    monkeypatch.setitem(_registry._loaded, "cpu", "failed to load (ImportError: no armfast._C)")
    _registry.clear_cache()
    why = ops.explain(ops.self_correlation, x, v)
    assert why.backend == "sdpa" == ops.resolve_backend("self_correlation", "auto", v, work=work)
    assert _verdicts(why)["cpu"] == "cannot run" and _verdicts(why)["sdpa"] == "picked"
    (lost,) = [c for c in why.candidates if c.backend == "cpu"]
    assert lost.reasons == ("backend 'cpu' is not available: failed to load (ImportError: no "
                            "armfast._C)",)


def test_explain_an_explicit_backend_and_bad_calls():
    x, text = torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    why = ops.explain("patch_text_logits", x, text, backend="cpu")
    assert why.backend is None and why.table is None
    assert why.candidates[0].reasons == ("backend 'cpu' supports dtypes float32, float64 on cpu, "
                                         "got bfloat16",)
    assert ops.explain("patch_text_logits", x, text, backend="sdpa").backend == "sdpa"
    with pytest.raises(ValueError, match="op must be one of the ops attention, "):
        ops.explain(torch.matmul, x, x)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ops.explain("patch_text_logits", x, text, backend="fast")
    with pytest.raises(ValueError, match="text must have x's embedding dim"):  # validated as called
        ops.explain(ops.patch_text_logits, x, text[:, :4])


def test_limits_are_declared_once_and_checked_on_both_paths():
    for name in ("reference", "sdpa", "triton", "cuda", "cpu"):
        backend = _registry.load(name)
        if isinstance(backend, str):
            continue
        for op, impl in backend.ops.items():
            assert getattr(impl, "limits", backend.limits) is backend.limits, (name, op)
    q, k, v = make_qkv(1, 1, 4, 4, 8, dtype=torch.bfloat16)
    cpu = _registry.load("cpu")
    message = "backend 'cpu' supports dtypes float32, float64 on cpu, got bfloat16"
    with pytest.raises(TypeError, match=message):
        ops.attention(q, k, v, backend="cpu")  # eager: resolved once, then cached
    with pytest.raises(TypeError, match=message):
        cpu.attention.forward_op(q, k, v, 0.5)  # the custom op, as torch.compile calls it
    with pytest.raises(TypeError, match=message):
        cpu.ops["self_correlation"].forward_op(q, v, 0.5, False)


def test_head_dim_limit_on_the_custom_op():
    triton = _registry.load("triton")
    if isinstance(triton, str):
        pytest.skip(triton)
    q = torch.randn(1, 1, 4, 130)
    with pytest.raises(ValueError, match=r"backend 'triton' supports head dims 1\.\.128, got d=130"):
        triton.attention.forward_op(q, q, q, 0.1)
    with pytest.raises(ValueError, match=r"supports head dims 1\.\.128, got d=130"):
        triton.ops["self_correlation"].forward_op(q, q, 0.1, False)
