"""Evaluation: mean IoU and the benchmark loop (the protocols live in `armfast.protocols` and
`armfast.presets`, below the inference path that uses them)."""
from ..protocols import DATASET_NAMES, PROTOCOLS, Protocol, get_protocol
from .metric import MeanIoU
from .runner import evaluate

__all__ = ["MeanIoU", "Protocol", "PROTOCOLS", "DATASET_NAMES", "get_protocol", "evaluate"]
