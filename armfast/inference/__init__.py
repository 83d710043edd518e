"""Inference: a CLIP baseline (+ ARM) over whole images by sliding windows.

`Segmentor` wires the steps, each in its own module: `preprocess` (images to model pixels),
`queries` (class names to text queries), `crop_model` (the crop forward training shares),
`windows` and `crop_budget` (batched sliding windows under a memory budget), `graphs` (CUDA
graph replay), `postprocess` (logits to probabilities and labels), `result` and `visualize`
(what one image's result holds and how it is drawn). `config` holds `SegmentorConfig`.
"""
from .config import SegmentorConfig
from .crop_model import CropModel, LogitHead
from .preprocess import Prepared, Preparer, to_image_tensor
from .queries import TextQueries
from .result import SegmentationResult
from .segmentor import Segmentor

__all__ = ["Segmentor", "SegmentorConfig", "CropModel", "LogitHead", "TextQueries", "Prepared",
           "Preparer", "to_image_tensor", "SegmentationResult"]
