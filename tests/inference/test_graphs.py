"""CUDA graphs: the capture policy (checked on CPU with a stand-in capture), and on a GPU the
graph replays against eager calls for the fused ops, ARM and the whole crop forward."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from armfast import ARM, ops
from armfast.bench.workloads import randomize_residual_outputs
from armfast.inference.graphs import Captured, GraphedCall, capture_cuda_graph, relative_difference


class FakeGraph:
    """Stands for a CUDA graph: replay reruns the captured function on the static input."""

    def __init__(self, fn, x, offset=0.0):
        self.fn, self.x, self.offset = fn, x, offset
        self.out = None

    def replay(self):
        self.out.copy_(self.fn(self.x) + self.offset)


def fake_capture(offset=0.0, fail=False):
    captured = []

    def capture(fn, x):
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        static = x.clone()
        graph = FakeGraph(fn, static, offset)
        graph.out = fn(static) + offset
        captured.append(graph)
        return Captured(graph, static, graph.out)
    return capture, captured


def counting(fn):
    calls = []

    def wrapped(x):
        calls.append(tuple(x.shape))
        return fn(x)
    return wrapped, calls


def test_policy_eager_eager_then_replay():
    fn, calls = counting(lambda x: x * 2 + 1)
    capture, graphs = fake_capture()
    g = GraphedCall(fn, capture=capture, device_types=("cpu",))
    with torch.no_grad():
        x = torch.randn(3, 4)
        assert torch.equal(g(x), x * 2 + 1) and not graphs  # warm-up, eager
        assert torch.equal(g(x), x * 2 + 1) and len(graphs) == 1  # eager, then captured
        n = len(calls)
        y = torch.randn(3, 4)
        out = g(y)
        assert torch.equal(out, y * 2 + 1) and out is graphs[0].out  # replayed static buffer
        assert len(calls) == n + 1  # FakeGraph.replay runs fn; a real graph runs no Python
        assert g(torch.randn(5, 4)).shape == (5, 4) and len(graphs) == 1  # new shape: eager
    assert g.captures == 1


def test_lru_keeps_max_graphs():
    capture, graphs = fake_capture()
    g = GraphedCall(lambda x: x + 1, capture=capture, device_types=("cpu",), max_graphs=2)
    with torch.no_grad():
        for n in (1, 2, 3):
            for _ in range(2):
                g(torch.zeros(n))
    assert [k[0] for k in g.graphs] == [(2,), (3,)]


def test_mismatch_or_failed_capture_turns_graphs_off():
    for capture in (fake_capture(offset=1.0)[0], fake_capture(fail=True)[0]):
        fn, calls = counting(lambda x: x * 3)
        g = GraphedCall(fn, capture=capture, device_types=("cpu",))
        x = torch.randn(4)
        with torch.no_grad(), pytest.warns(RuntimeWarning, match="CUDA graphs turned off"):
            g(x), g(x)
        assert g.disabled and not g.graphs
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(g(x), x * 3)  # eager from now on, silently


def test_inactive_under_autograd_off_device_or_disabled():
    capture, graphs = fake_capture()
    g = GraphedCall(lambda x: x + 1, capture=capture, device_types=("cpu",))
    x = torch.randn(2, requires_grad=True)
    for _ in range(3):
        g(x)  # grad mode on: autograd needs the eager graph
    assert not graphs
    cuda_only = GraphedCall(lambda x: x + 1, capture=capture)  # the default: CUDA tensors only
    off = GraphedCall(lambda x: x + 1, capture=capture, device_types=("cpu",), enabled=False)
    with torch.no_grad():
        for _ in range(3):
            cuda_only(torch.zeros(2)), off(torch.zeros(2))
    assert not graphs and off.disabled and cuda_only.disabled is None


def test_relative_difference():
    a = torch.tensor([1.0, 2.0])
    assert relative_difference(a, a) == 0.0
    assert relative_difference(a + 0.5, a) == pytest.approx(0.25)
    assert relative_difference(torch.tensor([1.0, float("nan")]), a) == float("inf")
    assert relative_difference(a[:1], a) == float("inf")


# ---------------------------------------------------------------------------------------- GPU

def _cuda_backends() -> list[str]:
    return [b for b in ("sdpa", "reference", "triton", "cuda") if b in ops.available_backends("cuda")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_are_capture_safe(dtype):
    g = torch.Generator("cuda").manual_seed(0)
    for backend in _cuda_backends():
        def fn(x):
            q = x[:, :, :, :64]
            k = x[:, :, :, 64:]
            out = ops.attention(q, k, k, backend=backend, layout="bnhd").flatten(2)
            text = torch.ones(7, out.shape[-1], device=x.device, dtype=x.dtype)
            return ops.patch_text_logits(out, text, logit_scale=30.0, backend=backend).float()

        x = torch.randn(2, 8, 197, 128, device="cuda", dtype=dtype, generator=g)
        with torch.inference_mode():
            fn(x)  # warm-up: Triton compilation and autotuning
            graph = capture_cuda_graph(fn, x)
            y = torch.randn_like(x)
            # the same kernels on the same input; a capture that read stale memory is far off
            assert relative_difference(graph(y), fn(y)) < 1e-3, backend


@pytest.mark.gpu
def test_arm_forward_replayed_from_a_graph():
    torch.manual_seed(0)
    arm = randomize_residual_outputs(ARM(), torch.Generator().manual_seed(0)).cuda().eval()
    shallow = [torch.randn(6, 196, 768, device="cuda") for _ in range(3)]

    def fn(deep):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return arm.logits(arm(shallow, deep), torch.ones(21, 512, device="cuda"))
    g = GraphedCall(fn)
    with torch.inference_mode():
        for _ in range(3):
            deep = torch.randn(6, 196, 512, device="cuda")
            out = g(deep).clone()
            assert relative_difference(out, fn(deep)) < 1e-3
    assert g.captures == 1 and g.disabled is None


@pytest.mark.gpu
@pytest.mark.parametrize("baseline", ["sclip", "clearclip", "naclip", "maskclip"])
def test_segmentor_graphs_match_eager(baseline):
    from armfast.inference import Segmentor
    from helpers.clip_models import vit_b16

    model = copy.deepcopy(vit_b16()).cuda()
    text = F.normalize(torch.randn(5, 512), dim=-1)
    arm = randomize_residual_outputs(ARM(), torch.Generator().manual_seed(1))
    images = [(torch.rand(3, 300 + 17 * i, 400) * 255).to(torch.uint8) for i in range(4)]
    kw = dict(baseline=baseline, arm=arm, short_side=224, crop=224, stride=112, crop_batch_size=4)
    graphed = Segmentor(model, text, **kw)
    eager = Segmentor(model, text, cuda_graphs=False, **kw)
    assert graphed.autocast_dtype is torch.bfloat16  # the default on a GPU
    a = [r.clone() for _, r in graphed.stream(images, "logits")]
    b = [r for _, r in eager.stream(images, "logits")]
    assert graphed._graphed.captures >= 1 and graphed._graphed.disabled is None
    for x, y in zip(a, b):
        assert x.dtype == torch.float32  # logits in float32 under bf16 autocast
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-3)
