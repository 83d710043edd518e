"""`ARMConfig`: the hyper-parameters of an ARM, what its folder's ``config.json`` holds."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields


@dataclass
class ARMConfig:
    """ARM hyper-parameters; defaults are for CLIP ViT-B/16."""

    shallow_layers: tuple[int, ...] = (4, 6, 8)  # 0-based vision blocks whose tokens are fused
    width: int = 768  # W, the ViT width of the shallow tokens
    embed_dim: int = 512  # E, CLIP's output dim of the deep features
    num_heads: int = 8
    head_dim: int = 64
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-5
    logit_scale_init: float = 40.0  # tau at initialisation (stored as its log)
    backbone: str = "ViT-B-16"  # the CLIP model the module was built for

    def __post_init__(self):
        self.shallow_layers = tuple(int(i) for i in self.shallow_layers)  # JSON gives lists
        for name in ("width", "embed_dim", "num_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ARMConfig.{name} must be a positive integer, got {value!r}")
        if not self.shallow_layers:
            raise ValueError("ARMConfig.shallow_layers must name at least one layer")
        for name in ("mlp_ratio", "ln_eps", "logit_scale_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"ARMConfig.{name} must be a real number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"ARMConfig.{name} must be finite and > 0, got {value}")

    @classmethod
    def from_dict(cls, d: dict) -> "ARMConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)
