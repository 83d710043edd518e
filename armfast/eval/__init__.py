"""Evaluation: mean IoU, the baselines' inference protocols, and the benchmark loop."""
from .metric import MeanIoU
from .protocols import DATASET_NAMES, PROTOCOLS, Protocol, get_protocol
from .runner import evaluate

__all__ = ["MeanIoU", "Protocol", "PROTOCOLS", "DATASET_NAMES", "get_protocol", "evaluate"]
