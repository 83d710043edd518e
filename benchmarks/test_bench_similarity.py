"""SC-CLIP's ops, forward only: the thresholded similarity aggregation and the last block's
averaged dual softmax, every fused backend against the eager composition (reference) and the best
composition of torch ops and SDPA calls (sdpa), on CLIP's tokens at crops 224/336/448, B = 1 and 16."""
import pytest


@pytest.mark.bench_op("similarity_aggregation", modes=("forward",))
def test_sc_clip_aggregation(bench, param):
    bench(param)


@pytest.mark.bench_op("averaged_dual_softmax", modes=("forward",))
def test_sc_clip_last_block(bench, param):
    bench(param)
