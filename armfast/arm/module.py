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
import os
from typing import Sequence

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from .. import ops
from . import folder
from .config import ARMConfig
from .layers import CrossAttention, Mlp, SelfAttention


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

    # ---- files (`armfast.arm.folder`): a local folder is read and checked by armfast, without
    # Hugging Face's loader (which prints, and fills missing tensors at random); Hub ids go
    # through the mixin, strictly, and are checked the same way
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "ARM":
        if os.path.isdir(pretrained_model_name_or_path):
            config, state, source = folder.read_folder(pretrained_model_name_or_path)
            arm = cls(config)
            folder.check_state(state, arm.state_dict(), source)
            arm.load_state_dict(state, strict=True)
            return arm.to(kwargs.get("map_location", "cpu")).eval()
        kwargs.setdefault("strict", True)
        arm = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        state = arm.state_dict()
        folder.check_state(state, state, f"ARM {pretrained_model_name_or_path}")
        return arm

    def _save_pretrained(self, save_directory) -> None:
        folder.save_folder(self, save_directory)

    def generate_model_card(self, *args, **kwargs):
        from huggingface_hub import ModelCard

        return ModelCard(folder.model_card(self))

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
