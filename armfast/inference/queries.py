"""Text queries: one embedding per class name, synonym or background word, and the class each
one votes for. A class scores as its best query (`TextQueries.per_class_max`), in inference
(probabilities) and in training (logits) alike."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from ..background import Background
from ..clip.model import output_dim
from ..clip.text import TextEmbeddings, encode_classes, encode_names, normalize_classes
from ..data.classnames import describe_duplicates, duplicate_names


@dataclass(eq=False)
class TextQueries:
    text: Tensor  # [S, E] float32 text embeddings, one per query
    class_index: Tensor  # [S] int64: the class of each query
    num_classes: int
    class_names: list[str]
    background_words: tuple[str, ...] = ()  # words scored with the classes for the background
    one_per_class: bool = field(init=False)  # query i is class i: nothing to reduce

    def __post_init__(self):
        index, C = self.class_index, self.num_classes
        # checked once here: the same test per image would wait for the GPU
        self.one_per_class = len(index) == C and bool(
            (index == torch.arange(C, device=index.device)).all())

    def __len__(self) -> int:
        return len(self.text)

    def per_class_max(self, x: Tensor, dim: int) -> Tensor:
        """Per-query values along `dim` -> per-class values: each class takes its best query."""
        if self.one_per_class:
            return x
        dim = dim % x.dim()
        shape = list(x.shape)
        shape[dim] = self.num_classes
        view = [1] * x.dim()
        view[dim] = -1
        index = self.class_index.to(x.device).view(view).expand_as(x)
        return x.new_zeros(shape).scatter_reduce_(dim, index, x, reduce="amax", include_self=False)


def build_queries(clip: nn.Module, classes, *, class_index: Optional[Tensor], background: Background,
                  templates, device: torch.device) -> TextQueries:
    """The queries of `classes` (names, a `TextEmbeddings`, or an ``[S, E]`` tensor with
    `class_index`) under the `background` rule, embedded by `clip`'s text tower in `templates`."""
    if isinstance(classes, TextEmbeddings):
        text, index, names = classes.embeddings, classes.class_index, list(classes.names)
    elif isinstance(classes, Tensor):
        if classes.dim() != 2 or not classes.is_floating_point():
            raise ValueError(f"classes as text embeddings must be a float [S, E] tensor, got "
                             f"{tuple(classes.shape)} {classes.dtype}")
        text = classes
        index = torch.arange(len(text)) if class_index is None else torch.as_tensor(class_index)
        if index.shape != (len(text),) or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"class_index must be an int tensor of shape ({len(text)},), "
                             f"got {tuple(index.shape)} {index.dtype}")
        names = None
    else:
        found = duplicate_names(normalize_classes(classes))
        if found:  # the later class would lose every pixel to the first
            warnings.warn(f"classes: {describe_duplicates(normalize_classes(classes), found)}",
                          stacklevel=3)
        emb = encode_classes(clip, classes, templates)
        text, index, names = emb.embeddings, emb.class_index, list(emb.names)
    index = index.to(device=device, dtype=torch.int64)
    C = int(index.max()) + 1
    if int(index.min()) < 0 or set(index.tolist()) != set(range(C)):
        raise ValueError(f"class_index must cover every class 0..{C - 1}, got {index.tolist()}")
    embed_dim = output_dim(clip)
    if text.shape[-1] != embed_dim:
        raise ValueError(f"text embeddings must have CLIP's embed dim {embed_dim}, got "
                         f"{text.shape[-1]}")
    if names is None:
        class_names = [f"class_{i}" for i in range(C)]
    else:  # the first synonym names the class
        first = {}
        for n, i in zip(names, index.tolist()):
            first.setdefault(i, n)
        class_names = [first[i] for i in range(C)]
    text = text.detach().to(device=device, dtype=torch.float32)

    bg = background
    if bg.adds_class:
        if bg.index > C:
            raise ValueError(f"background index {bg.index} is past the end of the {C} classes "
                             f"(an added background class goes at 0..{C})")
        index = index + (index >= bg.index).long()
        class_names.insert(bg.index, bg.name)
        C += 1
    elif bg.index >= C:
        raise ValueError(f"background index must be a class index in [0, {C - 1}], got {bg.index}")
    # a background word that is also a class's name would take that class's pixels
    named = {n.strip().lower() for n in names or ()}
    words = tuple(w for w in bg.words if w.lower() not in named)
    if words:  # scored with the classes; a pixel they win is background
        emb = encode_names(clip, words, templates)
        text = torch.cat([text, emb.to(device, torch.float32)])
        index = torch.cat([index, index.new_full((len(words),), bg.index)])
    return TextQueries(text, index, C, class_names, words)
