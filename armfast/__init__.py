"""armfast: a fast Attention Refinement Module (ARM) for CLIP open-vocabulary segmentation."""
from ._version import __version__
from . import ops
from .arm import ARM, ARMConfig
from .ops import available_backends, backend_status

__all__ = ["__version__", "ops", "ARM", "ARMConfig", "available_backends", "backend_status",
           "Segmentor", "SegmentorConfig", "segment", "SegmentationResult", "Background"]

# name -> module that defines it; these pull in the CLIP hooks, so they load on first use and
# `import armfast` stays light
_LAZY = {"Segmentor": "inference.segmentor", "SegmentorConfig": "inference.config",
         "segment": "api", "SegmentationResult": "inference.result", "Background": "background"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'armfast' has no attribute {name!r}")
