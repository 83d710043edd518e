"""Class-name text embeddings, as the OVSS baselines build them.

Each class is a list of synonyms (class-name files: one class per line, comma-separated
synonyms, see `armfast.data.classnames`). Every synonym gets one embedding: each of the
templates (the 80 OpenAI ImageNet templates by default) filled with the name, encoded by
CLIP's text tower and L2-normalised; their mean, normalised again. ``class_index`` maps each
synonym row to its class; segmentation takes the max over a class's synonyms.

Embeddings are cached in memory per model object (weakly, so the cache dies with the model),
template set, device and name: a class list is encoded once per process. With a cache directory
(``cache_dir=``, or the ``ARMFAST_TEXT_CACHE`` environment variable) they are also kept on
disk, one safetensors file per (text tower, templates, device type), named by a SHA-256 of the
tower's weights and the templates, so another run with the same CLIP and names skips the text
tower (80 templates x 171 COCO-Stuff names is ~14k text forwards).
"""
from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from functools import lru_cache
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._files import atomic_write_bytes

SIMPLE_TEMPLATES = ("a photo of a {}.",)
ClassSpec = Sequence[Union[str, Sequence[str]]]


def openai_templates() -> tuple[str, ...]:
    """open_clip's 80 OpenAI ImageNet templates as ``"... {} ..."`` strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def resolve_templates(templates: Union[str, Sequence[Union[str, Callable]], None] = "openai"
                      ) -> tuple[str, ...]:
    """``"openai"`` (or None): the 80 templates; ``"simple"``: ``"a photo of a {}."``; or a
    sequence of strings with one ``{}`` each, or of callables ``name -> prompt``."""
    if templates is None or templates == "openai":
        return openai_templates()
    if templates == "simple":
        return SIMPLE_TEMPLATES
    if isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
        raise ValueError(f"templates must be 'openai', 'simple' or a non-empty sequence of "
                         f"'{{}}' strings, got {templates!r}")
    out = []
    for t in templates:
        t = t("{}") if callable(t) else t
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"every template must contain '{{}}' exactly once, got {t!r}")
        out.append(t)
    return tuple(out)


def normalize_classes(classes: ClassSpec) -> list[list[str]]:
    """Classes as lists of synonyms: ``["cat", ["person", "people"]]`` -> ``[["cat"],
    ["person", "people"]]``; names are stripped and must be non-empty."""
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise TypeError(f"classes must be a sequence of names or of synonym lists, got "
                        f"{type(classes).__name__}")
    out = []
    for i, c in enumerate(classes):
        synonyms = [c] if isinstance(c, str) else list(c) if isinstance(c, Sequence) else None
        if synonyms is None or not all(isinstance(s, str) for s in synonyms):
            raise TypeError(f"classes[{i}] must be a name or a list of names, got {c!r}")
        synonyms = [s.strip() for s in synonyms]
        if not synonyms or not all(synonyms):
            raise ValueError(f"classes[{i}] has an empty name: {c!r}")
        out.append(synonyms)
    if not out:
        raise ValueError("classes is empty: give at least one class name")
    return out


def parse_class_list(spec: str, what: str = "class list") -> list[list[str]]:
    """A command-line class list: classes separated by ``,``, synonyms of one class by ``|``
    (``"cat,person|people,sky"``); a name may appear once."""
    from ..data.classnames import check_unique

    if not isinstance(spec, str):
        raise TypeError(f"{what} must be a string, got {type(spec).__name__}")
    names = [c for c in (part.strip() for part in spec.split(",")) if c]
    if not names:
        raise ValueError(f"{what}: class list is empty: {spec!r}")
    classes = normalize_classes([[s for s in c.split("|")] for c in names])
    check_unique(classes, what)
    return classes


def read_class_file(path, what: str = "class-name file") -> list[list[str]]:
    """Synonym lists from a class-name file (or a dataset name such as ``voc21``)."""
    from ..data.classnames import load_class_names

    return load_class_names(path, what)


def flatten_classes(classes: ClassSpec) -> tuple[list[str], Tensor]:
    """(every synonym, ``class_index`` LongTensor mapping each synonym to its class)."""
    classes = normalize_classes(classes)
    names = [s for synonyms in classes for s in synonyms]
    index = torch.tensor([i for i, synonyms in enumerate(classes) for _ in synonyms])
    return names, index


@dataclass(frozen=True)
class TextEmbeddings:
    embeddings: Tensor  # [S, E] float32, unit rows, one per synonym
    class_index: Tensor  # [S] int64: class of each row
    names: tuple[str, ...]  # the synonym of each row

    @property
    def num_classes(self) -> int:
        return int(self.class_index.max()) + 1


@lru_cache(maxsize=8)
def _tokenizer(model_name: str):
    import open_clip

    return open_clip.get_tokenizer(model_name)


# model -> {((templates, device), name): [E] embedding}; weak keys so that a dropped model frees its cache
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_TOWER_HASHES: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
TEXT_CACHE_ENV = "ARMFAST_TEXT_CACHE"


def text_tower_hash(model: nn.Module) -> str:
    """SHA-256 of every tensor `encode_text` can read (the state dict outside ``visual.``:
    names, dtypes, shapes and bytes) and of the tokenizer's name; once per model object."""
    digest = _TOWER_HASHES.get(model)
    if digest is None:
        h = hashlib.sha256(str(getattr(model, "armfast_name", "")).encode())
        for name, t in sorted(model.state_dict().items()):
            if name.startswith("visual."):
                continue
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        digest = _TOWER_HASHES[model] = h.hexdigest()
    return digest


def _cache_file(cache_dir, model: nn.Module, templates: tuple[str, ...], device) -> Path:
    key = hashlib.sha256(json.dumps([text_tower_hash(model), list(templates),
                                     torch.device(device).type]).encode()).hexdigest()
    return Path(cache_dir) / f"text-{key[:32]}.safetensors"


def _read_cache(path: Path) -> dict[str, Tensor]:
    """name -> embedding from a cache file; an unreadable file is treated as empty (it is only
    a cache: the names are encoded again and the file rewritten)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = json.loads(f.metadata()["names"])
            emb = f.get_tensor("embeddings")
    except Exception:  # absent, partial or foreign file: a miss, not an error
        return {}
    if emb.dim() != 2 or emb.shape[0] != len(names):
        return {}
    return dict(zip(names, emb))


def _write_cache(path: Path, entries: dict[str, Tensor]) -> None:
    """Writes (atomically, `armfast._files.atomic_write_bytes`) the merged name -> embedding map."""
    from safetensors.torch import save

    merged = _read_cache(path)  # another process may have added names meanwhile
    merged.update(entries)
    names = list(merged)
    data = save({"embeddings": torch.stack([merged[n].float().cpu() for n in names]).contiguous()},
                metadata={"names": json.dumps(names)})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def encode_names(model: nn.Module, names: Sequence[str], templates="openai", *, tokenizer=None,
                 batch_size: int = 256, progress: bool = False, cache_dir=None) -> Tensor:
    """``[len(names), E]`` float32 unit embeddings, template-averaged (see module docstring).
    ``progress``: a bar on stderr (80 templates x 171 names take minutes on a CPU).
    ``cache_dir``: a directory for the on-disk cache (default ``$ARMFAST_TEXT_CACHE``; None and
    no variable: memory only). Not used with a custom ``tokenizer``, which the key cannot name."""
    templates = resolve_templates(templates)
    if not hasattr(model, "encode_text"):
        raise TypeError(f"model must be an open_clip CLIP with encode_text, got {type(model).__name__}")
    if cache_dir is None:
        cache_dir = os.environ.get(TEXT_CACHE_ENV) or None
    if tokenizer is None:
        tokenizer = _tokenizer(getattr(model, "armfast_name", "ViT-B-16"))
    elif cache_dir is not None:
        cache_dir = None
    device = next(model.parameters()).device
    cache = _CACHE.setdefault(model, {})
    key = (templates, str(device))  # a model moved to another device re-encodes
    todo = list(dict.fromkeys(n for n in names if (key, n) not in cache))
    disk = None
    per_batch = max(1, batch_size // len(templates))
    # Plain no_grad tensors, even when called under inference_mode: the cached embeddings may
    # later meet autograd (ARM training), which refuses inference tensors.
    with torch.inference_mode(False), torch.no_grad():
        if todo and cache_dir is not None:
            disk = _cache_file(cache_dir, model, templates, device)
            stored = _read_cache(disk)
            for n in [n for n in todo if n in stored]:
                cache[(key, n)] = stored[n].to(device=device, dtype=torch.float32)
            todo = [n for n in todo if n not in stored]
        bar = None
        if progress and todo:
            import sys

            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="encode class names", unit="name",
                       dynamic_ncols=True, file=sys.stderr, leave=False)
        for start in range(0, len(todo), per_batch):
            chunk = todo[start:start + per_batch]
            tokens = tokenizer([t.replace("{}", n) for n in chunk for t in templates]).to(device)
            emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
            emb = F.normalize(emb.unflatten(0, (len(chunk), len(templates))).mean(1), dim=-1)
            for n, e in zip(chunk, emb):
                cache[(key, n)] = e
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if disk is not None and todo:
            _write_cache(disk, {n: cache[(key, n)] for n in todo})
        return torch.stack([cache[(key, n)] for n in names])


def encode_classes(model: nn.Module, classes: ClassSpec, templates="openai", *, tokenizer=None,
                   batch_size: int = 256, progress: bool = False,
                   cache_dir=None) -> TextEmbeddings:
    """Text embeddings of every synonym of ``classes`` and the synonym -> class index
    (``progress``, ``cache_dir``: see `encode_names`)."""
    names, index = flatten_classes(classes)
    emb = encode_names(model, names, templates, tokenizer=tokenizer, batch_size=batch_size,
                       progress=progress, cache_dir=cache_dir)
    return TextEmbeddings(emb, index.to(emb.device), tuple(names))
