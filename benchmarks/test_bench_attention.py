"""attention(q, k, v): forward, and forward+backward (gradients to q, k and v)."""
import pytest

pytestmark = pytest.mark.bench_op("attention")


def test_attention(bench, param):
    bench(param)
