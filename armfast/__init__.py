"""armfast: a fast Attention Refinement Module (ARM) for CLIP open-vocabulary segmentation."""
from ._version import __version__
from . import ops
from .arm import ARM, ARMConfig
from .ops import available_backends, backend_status

__all__ = ["__version__", "ops", "ARM", "ARMConfig", "available_backends", "backend_status"]
