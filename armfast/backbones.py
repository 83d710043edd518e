"""Registry of CLIP backbones with the per-backbone defaults armfast needs.

The shallow layers for ARM sit at 1/3, 1/2 and 2/3 of the depth, as (4, 6, 8) does for the
12-block ViT-B/16 of the design contract. OpenAI weights were trained with QuickGELU, so they
are built from open_clip's ``-quickgelu`` config; LAION weights use plain GELU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ALL_BASELINES = ("vanilla", "maskclip", "sclip", "clearclip", "naclip", "proxyclip", "scclip",
                 "sfp", "resclip")


@dataclass(frozen=True)
class BackboneSpec:
    name: str  # open_clip model name
    patch_size: int
    image_size: int  # native resolution of the positional embedding
    width: int  # ViT width W (shallow tokens)
    embed_dim: int  # output dim E (deep features, text embeddings)
    layers: int
    shallow_layers: tuple[int, ...]
    # pretrained tag -> open_clip model name to build it with (QuickGELU for OpenAI weights)
    pretrained: dict[str, str] = field(default_factory=dict)
    baselines: tuple[str, ...] = ALL_BASELINES

    @property
    def native_grid(self) -> int:
        return self.image_size // self.patch_size

    def model_name_for(self, pretrained: str | None) -> str:
        """The open_clip config that matches `pretrained` (a tag, a path, or None)."""
        if pretrained is None or pretrained not in self.pretrained:
            return self.name
        return self.pretrained[pretrained]


def _spec(name, patch, size, width, embed, layers, laion_tags):
    shallow = (layers // 3, layers // 2, 2 * layers // 3)
    tags = {"openai": f"{name}-quickgelu"}
    tags.update({tag: name for tag in laion_tags})
    return BackboneSpec(name, patch, size, width, embed, layers, shallow, tags)


BACKBONES: dict[str, BackboneSpec] = {
    s.name: s for s in (
        _spec("ViT-B-16", 16, 224, 768, 512, 12, ("laion400m_e32", "laion2b_s34b_b88k", "datacomp_xl_s13b_b90k")),
        _spec("ViT-B-32", 32, 224, 768, 512, 12, ("laion400m_e32", "laion2b_s34b_b79k", "datacomp_xl_s13b_b90k")),
        _spec("ViT-L-14", 14, 224, 1024, 768, 24, ("laion400m_e32", "laion2b_s32b_b82k", "datacomp_xl_s13b_b90k")),
        _spec("ViT-L-14-336", 14, 336, 1024, 768, 24, ()),
    )
}


# OpenAI's names for the same models (clip.available_models())
ALIASES = {"ViT-B/16": "ViT-B-16", "ViT-B/32": "ViT-B-32", "ViT-L/14": "ViT-L-14",
           "ViT-L/14@336px": "ViT-L-14-336", "ViT-L/14@336": "ViT-L-14-336"}


def canonical_name(name: str) -> str | None:
    """The registered name of `name` (an alias or a ``-quickgelu`` config), None if unregistered."""
    if not isinstance(name, str):
        return None
    name = ALIASES.get(name, name)
    base = name[: -len("-quickgelu")] if name.endswith("-quickgelu") else name
    return base if base in BACKBONES else None


def get_backbone(name: str) -> BackboneSpec:
    """The spec of a registered backbone; `-quickgelu` suffixes resolve to their base model,
    OpenAI's names (``ViT-B/16``, ``ViT-L/14@336px``) to open_clip's."""
    if not isinstance(name, str):
        raise TypeError(f"backbone name must be a string, got {type(name).__name__}")
    base = canonical_name(name)
    if base is None:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(BACKBONES)}")
    return BACKBONES[base]


def find_backbone(*, patch_size: int, image_size: int, width: int, layers: int,
                  embed_dim: int) -> BackboneSpec | None:
    """The registered backbone with this architecture (None if none has it): how a CLIP built
    outside `armfast.clip.load_clip` is recognised."""
    for spec in BACKBONES.values():
        if (spec.patch_size, spec.image_size, spec.width, spec.layers, spec.embed_dim) == (
                patch_size, image_size, width, layers, embed_dim):
            return spec
    return None
