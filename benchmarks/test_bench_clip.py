"""Inference per batch of crops: randomly initialised CLIP ViT-B/16 with the SCLIP last block,
then logits, without and with ARM. Skips, with the reason, while armfast.clip cannot run."""
import pytest

pytestmark = pytest.mark.bench_op("clip", modes=("forward",))


def test_clip(bench, param):
    bench(param)
