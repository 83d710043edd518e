"""patch_text_logits(x, text, logit_scale): forward, and forward+backward (to x, text, scale)."""
import pytest

pytestmark = pytest.mark.bench_op("patch_text_logits")


def test_patch_text_logits(bench, param):
    bench(param)
