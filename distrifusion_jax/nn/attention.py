"""Multi-head attention named like diffusers' `Attention` (to_q, to_k, to_v, to_out_0)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


class Attention(nn.Module):
    """Scaled dot-product attention through `jax.nn.dot_product_attention` (softmax in float32).

    Self-attention when `context` is None (its K/V are the ones patch parallelism exchanges),
    cross-attention to `context` (text tokens, always local) otherwise.
    `implementation` is passed through: None lets JAX choose, "cudnn" asks for the fused GPU kernel.
    """

    heads: int
    head_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: Optional[str] = None
    parallel: Any = None  # distrifusion_jax.parallel plan; None: a single device
    qkv_bias: bool = False  # biases on to_q/to_k/to_v: the VAE's attention has them, the UNet's does not

    @nn.compact
    def __call__(self, x, context=None):  # x: [B, T, D], context: [B, S, Dc] or None
        inner = self.heads * self.head_dim
        dense = lambda feats, name, bias: nn.Dense(feats, use_bias=bias, dtype=self.dtype,
                                                   param_dtype=self.param_dtype, name=name)
        src = x if context is None else context
        q = dense(inner, "to_q", self.qkv_bias)(x)
        k = dense(inner, "to_k", self.qkv_bias)(src)
        v = dense(inner, "to_v", self.qkv_bias)(src)
        split = lambda a: a.reshape(a.shape[:2] + (self.heads, self.head_dim))  # [B, T, N, Hd]
        q, k, v = split(q), split(k), split(v)
        if context is None:
            k, v = self.self_attention_kv(k, v)
        dtype = q.dtype
        if dtype == jnp.float16 and jax.default_backend() == "cpu":
            # XLA:CPU has no float16 dot with float32 accumulation (which JAX asks for): use float32.
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation).astype(dtype)
        out = out.reshape(out.shape[:2] + (inner,))
        return dense(x.shape[-1], "to_out_0", True)(out)

    def self_attention_kv(self, k, v):
        """Keys and values of the whole image for self-attention: on one device, the local ones."""
        if self.parallel is not None:
            return self.parallel.self_attention_kv(self, k, v)
        return k, v
