"""The Attention Refinement Module (ARM): refines a baseline's deep patch features with
CLIP's shallow tokens.

    S = sum_l softmax(alpha)_l * LN_l(H_l)                 adaptive fusion of shallow layers
    X = D + Wo  MHA(Q = S Wq, K = LN(D) Wk, V = LN(D) Wv)   semantically-guided cross-attention
    X = X + Wo2 MHA(LN(X))                                   self-attention
    X = X + MLP(LN(X))
    logits = tau * cos(X, T)

Wo, Wo2 and the MLP's last layer start at zero, so an untrained ARM returns D exactly.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from . import ops


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


def split_heads(t: Tensor, num_heads: int) -> Tensor:
    """[B, N, h*d] -> [B, h, N, d] as a strided view (the kernels take strides, no copy)."""
    return t.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """[B, h, N, d] -> [B, N, h*d] (a copy; attention with ``layout="bnhd"`` avoids it)."""
    return t.transpose(1, 2).flatten(2)


class CrossAttention(nn.Module):
    """Queries from one sequence, keys and values from another: ``Wo MHA(x Wq, c Wk, c Wv)``."""

    def __init__(self, query_dim: int, context_dim: int, num_heads: int, head_dim: int,
                 out_dim: int):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.q = nn.Linear(query_dim, inner)
        self.k = nn.Linear(context_dim, inner)
        self.v = nn.Linear(context_dim, inner)
        self.out = nn.Linear(inner, out_dim)

    def forward(self, x: Tensor, context: Tensor, backend: str = "auto") -> Tensor:
        h = self.num_heads
        q, k, v = split_heads(self.q(x), h), split_heads(self.k(context), h), split_heads(self.v(context), h)
        return self.out(ops.attention(q, k, v, backend=backend, layout="bnhd").flatten(2))


class SelfAttention(nn.Module):
    """``Wo MHA(x Wq, x Wk, x Wv)`` with one fused input projection."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.out = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: Tensor, backend: str = "auto") -> Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, h, N, d], strided
        return self.out(ops.attention(q, k, v, backend=backend, layout="bnhd").flatten(2))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ARM(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="armfast",
    tags=["open-vocabulary-segmentation", "clip", "arm"],
):
    """Attention Refinement Module. ``forward(shallow, deep)`` -> refined deep features."""

    def __init__(self, config: ARMConfig | dict | None = None):
        super().__init__()
        if config is None:
            config = ARMConfig()
        elif isinstance(config, dict):
            config = ARMConfig.from_dict(config)
        elif not isinstance(config, ARMConfig):
            raise TypeError(f"config must be an ARMConfig, a dict or None, got {type(config).__name__}")
        self.config = config
        self._hub_mixin_config = config  # what save_pretrained writes to config.json
        c = config
        E, W, n_layers = c.embed_dim, c.width, len(c.shallow_layers)

        self.fusion_logits = nn.Parameter(torch.zeros(n_layers))  # alpha
        self.shallow_norms = nn.ModuleList(nn.LayerNorm(W, eps=c.ln_eps) for _ in range(n_layers))
        self.deep_norm = nn.LayerNorm(E, eps=c.ln_eps)
        self.cross_attn = CrossAttention(W, E, c.num_heads, c.head_dim, E)
        self.norm1 = nn.LayerNorm(E, eps=c.ln_eps)
        self.self_attn = SelfAttention(E, c.num_heads, c.head_dim)
        self.norm2 = nn.LayerNorm(E, eps=c.ln_eps)
        self.mlp = Mlp(E, int(E * c.mlp_ratio))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(c.logit_scale_init)))
        for residual_out in (self.cross_attn.out, self.self_attn.out, self.mlp.fc2):
            nn.init.zeros_(residual_out.weight)
            nn.init.zeros_(residual_out.bias)

    # ---- files (armfast.arm_folder): a local folder is read and checked by armfast, without
    # Hugging Face's loader (which prints, and fills missing tensors at random); Hub ids go
    # through the mixin, strictly, and are checked the same way
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "ARM":
        from .arm_folder import check_state, load_arm_folder

        if os.path.isdir(pretrained_model_name_or_path):
            return load_arm_folder(pretrained_model_name_or_path, kwargs.get("map_location", "cpu"))
        kwargs.setdefault("strict", True)
        arm = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        state = arm.state_dict()
        check_state(state, state, f"ARM {pretrained_model_name_or_path}")
        return arm

    def _save_pretrained(self, save_directory) -> None:
        from .arm_folder import save_arm_folder

        save_arm_folder(self, save_directory)

    def generate_model_card(self, *args, **kwargs):
        from huggingface_hub import ModelCard

        from .arm_folder import model_card

        return ModelCard(model_card(self))

    def fuse(self, shallow: Sequence[Tensor]) -> Tensor:
        """S = sum_l softmax(alpha)_l * LN_l(H_l)."""
        weights = self.fusion_logits.softmax(0)
        return sum(w * norm(h) for w, norm, h in zip(weights, self.shallow_norms, shallow))

    def forward(self, shallow: Sequence[Tensor], deep: Tensor, *, backend: str = "auto") -> Tensor:
        self._check_inputs(shallow, deep)
        s = self.fuse(shallow)
        x = deep + self.cross_attn(s, self.deep_norm(deep), backend)
        x = x + self.self_attn(self.norm1(x), backend)
        x = x + self.mlp(self.norm2(x))
        return x

    def logits(self, x: Tensor, text: Tensor, *, backend: str = "auto") -> Tensor:
        """``tau * cos(x, text)``: [B, N, E] x [C, E] -> [B, N, C] with the learnt tau."""
        return ops.patch_text_logits(x, text.to(x.dtype), logit_scale=self.logit_scale.exp(),
                                     backend=backend)

    def _check_inputs(self, shallow, deep) -> None:
        c = self.config
        if not isinstance(deep, Tensor) or deep.dim() != 3 or deep.shape[-1] != c.embed_dim:
            got = tuple(deep.shape) if isinstance(deep, Tensor) else type(deep).__name__
            raise ValueError(f"deep must be [B, N, {c.embed_dim}], got {got}")
        param = self.deep_norm.weight
        if deep.device != param.device:
            raise ValueError(f"deep must be on the module's device ({param.device}), got {deep.device}")
        if deep.dtype != param.dtype and not torch.is_autocast_enabled(deep.device.type):
            raise TypeError(f"deep must have the module's dtype ({param.dtype}) outside autocast, "
                            f"got {deep.dtype}")
        if not isinstance(shallow, (list, tuple)):
            raise TypeError(f"shallow must be a list of {len(c.shallow_layers)} tensors (layers "
                            f"{c.shallow_layers}), got {type(shallow).__name__}")
        if len(shallow) != len(c.shallow_layers):
            raise ValueError(f"shallow must be a list of {len(c.shallow_layers)} tensors (layers "
                             f"{c.shallow_layers}), got {len(shallow)}")
        expected = (deep.shape[0], deep.shape[1], c.width)
        for i, h in enumerate(shallow):
            if not isinstance(h, Tensor) or tuple(h.shape) != expected:
                got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
                raise ValueError(f"shallow[{i}] must be [B, N, W] = {list(expected)} to match deep, "
                                 f"got {got}")
