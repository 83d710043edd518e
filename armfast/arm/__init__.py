"""The Attention Refinement Module: its config, its blocks, the module, and its folder on disk
(`folder`, which reads and writes configs and weights without the module class)."""
from .config import ARMConfig
from .layers import CrossAttention, Mlp, SelfAttention, merge_heads, split_heads
from .load import load_arm
from .module import ARM

__all__ = ["ARM", "ARMConfig", "CrossAttention", "SelfAttention", "Mlp", "split_heads",
           "merge_heads", "load_arm"]
