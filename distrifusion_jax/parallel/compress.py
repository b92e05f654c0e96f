"""How the stale self-attention tokens are stored and exchanged (DistriConfig.stale_kv_dtype).

`encode` runs on this band's tokens before the all_gather (so the exchange shrinks too) and `decode`
where the stale tokens are read. Per element of a [B, T, ..., D] array:

| dtype           | stored                                                     | bytes per D elements |
|-----------------|------------------------------------------------------------|----------------------|
| None            | the tokens as they are (the compute dtype)                 | D * itemsize         |
| "bfloat16"      | a plain cast                                               | 2 D                  |
| "float8_e4m3fn" | x / s cast to float8 e4m3 (max 448), s = absmax / 448       | D + 4                |
| "int8"          | round(x / s) in [-127, 127], s = absmax / 127 (symmetric)   | D + 4                |

The scale s is float32, one per token and head (the absmax over the last axis: the head dimension
of K/V [B, T, N, Hd], the channels of hidden states [B, T, C]), shape [B, T, ..., 1]. Quantisation
and dequantisation compute in float32. A token of zeros gets s = 0 and decodes to zeros.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

_SCALED = {"float8_e4m3fn": 448.0, "int8": 127.0}  # largest magnitude of each scaled format


def encode(x, dtype: Optional[str]):
    """x [B, T, ..., D] -> (values [B, T, ..., D], scale [B, T, ..., 1] float32 or None)."""
    if dtype is None:
        return x, None
    if dtype not in _SCALED:
        return x.astype(dtype), None
    top = _SCALED[dtype]
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / top
    q = jnp.clip(x / jnp.where(scale > 0, scale, 1.0), -top, top)
    return (jnp.round(q) if dtype == "int8" else q).astype(dtype), scale


def decode(values, scale, dtype):
    """(values, scale) from `encode` -> the tokens in `dtype` (the compute dtype)."""
    if scale is None:
        return values.astype(dtype)
    return (values.astype(jnp.float32) * scale).astype(dtype)
