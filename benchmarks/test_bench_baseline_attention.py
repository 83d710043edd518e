"""The baseline attentions (SCLIP, ClearCLIP, NACLIP, ProxyCLIP) in CLIP's last block, forward
only: every fused backend against the eager composition (reference) and the best SDPA-based one
(sdpa), at crops 224/336/448 (ProxyCLIP on its VFM's grid), B = 1 and 16."""
import pytest


@pytest.mark.bench_op("self_correlation_sum", modes=("forward",))
def test_sclip(bench, param):
    bench(param)


@pytest.mark.bench_op("self_correlation", modes=("forward",))
def test_clearclip(bench, param):
    bench(param)


@pytest.mark.bench_op("gaussian_self_correlation", modes=("forward",))
def test_naclip(bench, param):
    bench(param)


@pytest.mark.bench_op("masked_affinity_attention", modes=("forward",))
def test_proxyclip(bench, param):
    bench(param)
