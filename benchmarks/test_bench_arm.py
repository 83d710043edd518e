"""The whole ARM module: inference forward, and a training step (forward, logits, cross-entropy,
backward, AdamW step); `backend` picks the attention and logits backend inside it."""
import pytest

pytestmark = pytest.mark.bench_op("arm")


def test_arm(bench, param):
    bench(param)
