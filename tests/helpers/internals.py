"""The one door from the tests to armfast's private op modules: what a test needs and no public
name gives (a backend's implementation objects and custom ops, the auto table's file and size
buckets, the allocation poisoning switch, the op specs' key functions, a backend's launchers).
Tests take these names from here, so a move inside `armfast.ops` changes this file only."""
from __future__ import annotations

from armfast.ops import _affinity as affinity
from armfast.ops import _auto as auto
from armfast.ops import _library as library
from armfast.ops import _registry as registry
from armfast.ops import _specs as specs
from armfast.ops._backends import _extension as extension
from armfast.ops._backends import cpu as cpu_backend
from armfast.ops._backends import cuda as cuda_backend
from armfast.ops._backends import reference as reference_backend
from armfast.ops._backends import sdpa as sdpa_backend

try:  # the triton backend's package: launchers by op family (`attention`, `patch_text_logits`,
    # `baselines`, `_launch`); None without Triton (the kernels load only at the first launch)
    from armfast.ops._backends import triton as triton_backend
except ImportError:
    triton_backend = None

__all__ = ["affinity", "auto", "library", "registry", "specs", "extension", "cpu_backend", "cuda_backend",
           "reference_backend", "sdpa_backend", "triton_backend", "backend"]


def backend(name: str):
    """The loaded `Backend` called `name` (or the string saying why it could not be loaded)."""
    return registry.load(name)
