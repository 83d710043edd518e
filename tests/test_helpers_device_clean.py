"""The float64 oracles and input builders that the GPU tests share, run on a fake CUDA device.

These helpers were written on machines without a GPU, where every tensor is a CPU tensor, so a
`torch.zeros(...)` without `device=` inside an oracle passed here and failed on the first GPU
(46 failures, once). Under `FakeTensorMode` a tensor can claim `device="cuda"` without a GPU:
ops compute only shapes, and mixing it with a CPU tensor raises as on a real GPU. Each helper
runs so here; a new public helper in tests/helpers/baseline_math.py, sc_clip_math.py or
affinity_cases.py must be added to `CALLS` (or `DATA_BUILDERS`).
Builders that compute on their data (a fake tensor has none) are called with device="meta"
instead and must return tensors there.
"""
from __future__ import annotations

import functools
import inspect

import pytest
import torch

from helpers import affinity_cases, baseline_math, sc_clip_math
from helpers import tensors

fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor")

CUDA = torch.device("cuda", 0)


def _qkv(B=1, H=2, N=10, d=8):
    return [torch.randn(B, H, N, d, dtype=torch.float32, device=CUDA) for _ in range(3)]


def _affinity():
    return torch.randn(1, 12, 16, device=CUDA), torch.randn(1, 2, 12, 8, device=CUDA)


# helper name -> a call of it on fake CUDA inputs, returning its tensors
CALLS = {
    "self_correlation_f64": lambda: baseline_math.self_correlation_f64(*_qkv()[:2]),
    "self_correlation_sum_f64": lambda: baseline_math.self_correlation_sum_f64(*_qkv()),
    "grid_gaussian_f64": lambda: baseline_math.grid_gaussian_f64(3, 4, 5.0, True, device=CUDA),
    "gaussian_self_correlation_f64": lambda: baseline_math.gaussian_self_correlation_f64(
        *_qkv(N=13)[:2], (3, 4)),
    "masked_affinity_f64": lambda: baseline_math.masked_affinity_f64(*_affinity()),
    "heads": lambda: baseline_math.heads(1, 2, 5, 8, device=CUDA, strided=True),
    "two_cluster_features": lambda: [baseline_math.two_cluster_features(3, 4).to(CUDA)],
    "cosines_f64": lambda: sc_clip_math.cosines_f64(_affinity()[0]),
    "similarity_f64": lambda: sc_clip_math.similarity_f64(_affinity()[0], torch.randn(1, 12, 5, device=CUDA)),
    "dual_softmax_f64": lambda: sc_clip_math.dual_softmax_f64(_affinity()[0], *_qkv(N=12)[:2]),
    "alternating_values": lambda: sc_clip_math.alternating_values(
        (1, 2, 16, 8), torch.float32, torch.Generator().manual_seed(0), device=CUDA),
    "make_qkv": lambda: tensors.make_qkv(1, 2, 5, 7, 8, device=CUDA, strided=True),
    "attention_f64": lambda: tensors.attention_f64(*_qkv()),
    "max_relative_error": lambda: [affinity_cases.max_relative_error(*_affinity()[:1] * 2)],
    "patch_text_logits_f64": lambda: tensors.patch_text_logits_f64(
        torch.randn(1, 5, 8, device=CUDA), torch.randn(3, 8, device=CUDA),
        torch.tensor(2.0, device=CUDA)),
}


# builders that look at their random data (thresholds from sorted affinities), by device
DATA_BUILDERS = {
    "affinity_inputs": lambda device: baseline_math.affinity_inputs(1, 12, 16, 2, 8, device=device,
                                                                    strided=True)[:2],
    "similarity_inputs": lambda device: sc_clip_math.similarity_inputs(2, 9, device=device,
                                                                       strided=True)[:2],
    "near_threshold_features": lambda device: [
        sc_clip_math.near_threshold_features(torch.bfloat16, device=device)],
    "dual_inputs": lambda device: sc_clip_math.dual_inputs(2, 9, device=device, strided=True)[:3],
    "in_widest_gap": lambda device: [torch.tensor(sc_clip_math.in_widest_gap(
        torch.tensor([0.1, 0.45, 0.9], dtype=torch.float64), 0.3, 0.5), device=device)],
    **{f"affinity_case[{case}]": functools.partial(
        lambda device, case: affinity_cases.affinity_case(case, 2, 12, 16, 2, 8, device=device,
                                                          dtype=torch.bfloat16)[:2], case=case)
       for case in affinity_cases.CASES},
}


def _public_functions(module) -> set[str]:
    return {name for name, obj in vars(module).items()
            if inspect.isfunction(obj) and obj.__module__ == module.__name__
            and not name.startswith("_")}


def test_every_shared_helper_is_checked():
    helpers = (_public_functions(baseline_math) | _public_functions(sc_clip_math)
               | _public_functions(affinity_cases) | {
        name for name in _public_functions(tensors) if name.endswith("_f64") or name == "make_qkv"})
    checked = set(CALLS) | {name.split("[")[0] for name in DATA_BUILDERS}
    assert helpers - checked == set(), "add these helpers to CALLS or DATA_BUILDERS"


@pytest.mark.parametrize("name", sorted(CALLS))
def test_helper_keeps_to_the_inputs_device(name):
    with fake_tensor.FakeTensorMode():
        result = CALLS[name]()
        tensors = [result] if isinstance(result, torch.Tensor) else list(result)
        assert tensors and all(t.device == CUDA for t in tensors), name


@pytest.mark.parametrize("name", sorted(DATA_BUILDERS))
def test_builder_returns_tensors_on_the_device_asked(name):
    tensors = DATA_BUILDERS[name](torch.device("meta"))
    assert tensors and all(t.device.type == "meta" for t in tensors), name


def test_fake_cuda_catches_a_cpu_tensor():
    """The check itself: the mistake it exists for raises."""
    with fake_tensor.FakeTensorMode():
        x = torch.randn(4, 4, device=CUDA)
        with pytest.raises(Exception, match="device"):
            x + torch.zeros(4, 4)
