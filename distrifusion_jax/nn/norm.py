"""GroupNorm with float32 statistics, named like diffusers' `nn.GroupNorm` (scale, bias)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from .plan import LayerPlan


def group_stats(x, num_groups: int):
    """Per (sample, group) mean and biased variance of x: [B, H, W, C] -> ([B, G], [B, G]), float32.

    The variance is computed around the mean (two passes), not as E[x^2] - E[x]^2, so it does not
    cancel catastrophically and is never negative.
    """
    b, h, w, c = x.shape
    xg = x.reshape(b, h * w, num_groups, c // num_groups).astype(jnp.float32)
    mean = xg.mean(axis=(1, 3))
    var = jnp.square(xg - mean[:, None, :, None]).mean(axis=(1, 3))
    return mean, var


class GroupNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias, statistics per (sample, group) in float32."""

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    parallel: Optional[LayerPlan] = None  # the patch-parallel plan; None: a single device

    @nn.compact
    def __call__(self, x):  # x: [B, H, W, C]
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        mean, var = self.statistics(x)
        return normalize(x, mean, var, self.num_groups, self.epsilon, scale, bias, self.dtype)

    def statistics(self, x):
        """Statistics of the whole image: on one device those of x, in a band combined across bands."""
        mean, var = group_stats(x, self.num_groups)
        if self.parallel is not None:
            return self.parallel.group_norm_stats(self, mean, var)
        return mean, var


def normalize(x, mean, var, num_groups, eps, scale, bias, dtype):
    """Apply per-group (mean, var) [B, G] to x [B, H, W, C] in float32, then the affine, cast to dtype."""
    b, h, w, c = x.shape
    inv = lax.rsqrt(var.astype(jnp.float32) + eps)
    xg = x.reshape(b, h, w, num_groups, c // num_groups).astype(jnp.float32)
    y = (xg - mean[:, None, None, :, None]) * inv[:, None, None, :, None]
    y = y.reshape(b, h, w, c) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(dtype)
