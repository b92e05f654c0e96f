"""Leaf layers whose behaviour changes under patch parallelism: 3x3 conv, GroupNorm, self-attention."""

from .attention import Attention
from .conv import Conv2d
from .norm import GroupNorm

__all__ = ["Attention", "Conv2d", "GroupNorm"]
