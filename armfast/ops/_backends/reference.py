"""`reference` backend: the ops' math itself (`armfast.ops._specs`), plain PyTorch with the
softmax written out; the ground truth the fused backends are checked against."""
from __future__ import annotations

from typing import Callable

from .._library import ForwardOnlyOp, define_attention, define_patch_text_logits, plain
from .._limits import ANY_DTYPE, Limits
from .._registry import Backend
from .._specs import (BASELINE_OPS, attention_backward, attention_forward,
                      patch_text_logits_backward, patch_text_logits_forward)

LIMITS = Limits({device: ANY_DTYPE for device in ("cpu", "cuda", "mps", "xpu")})


def _reference_op(op: ForwardOnlyOp) -> Callable:
    """The reference backend's op: the math itself (torch autograd), in the requested layout."""
    def run(*args):
        out = op.math(*args[:-1])
        return out.transpose(1, 2) if args[-1] else out
    return plain(run)


BACKEND = Backend(
    name="reference",
    ops={"attention": define_attention("reference", attention_forward, attention_backward, LIMITS),
         "patch_text_logits": define_patch_text_logits(
             "reference", patch_text_logits_forward, patch_text_logits_backward, LIMITS),
         **{op.name: _reference_op(op) for op in BASELINE_OPS}},
    limits=LIMITS,
)
