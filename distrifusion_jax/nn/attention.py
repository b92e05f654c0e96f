"""Multi-head attention named like diffusers' `Attention` (to_q, to_k, to_v, to_out_0)."""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ..errors import ConfigError
from .plan import LayerPlan

IMPLEMENTATIONS = (None, "xla", "cudnn", "chunked", "auto")
# "auto": "chunked" where the float32 scores [B, N, Tq, Tk] that "xla" materialises would exceed this
AUTO_CHUNKED_BYTES = 1 << 30
# cuDNN's fused (flash) attention: half-precision inputs, head dims a multiple of 8 up to this
# (jax's check_is_flash_attention), compute capability 8.0 (Ampere) and up
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = {(8, 0): 128, (9, 0): 256}
CUDNN_MIN_CAPABILITY = (8, 0)


def cuda_capability() -> Optional[tuple]:
    """(major, minor) compute capability of the default backend's first device on an NVIDIA GPU
    (cuDNN's attention exists only there), None on any other backend."""
    device = jax.devices()[0]
    if device.platform != "gpu" or "cuda" not in str(getattr(device.client, "platform_version", "")).lower():
        return None
    try:
        return tuple(int(x) for x in str(device.compute_capability).split(".")[:2])
    except (AttributeError, ValueError):
        return None


def choose_implementation(batch, heads, q_len, kv_len, head_dim, dtype, capability) -> str:
    """What implementation="auto" runs for q [batch, q_len, heads, head_dim] against kv_len keys:
    "cudnn" on an NVIDIA GPU (`capability` = its (major, minor), None elsewhere) where the fused
    kernel takes the dtype and head dim (its memory is linear in the tokens); otherwise "chunked"
    where XLA's float32 scores [batch, heads, q_len, kv_len] would exceed AUTO_CHUNKED_BYTES, else
    "xla"."""
    if capability is not None and tuple(capability) >= CUDNN_MIN_CAPABILITY:
        limit = max(v for k, v in CUDNN_MAX_HEAD_DIM.items() if tuple(capability) >= k)
        if jnp.dtype(dtype).name in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= limit:
            return "cudnn"
    return "chunked" if batch * heads * q_len * kv_len * 4 > AUTO_CHUNKED_BYTES else "xla"


class Attention(nn.Module):
    """Scaled dot-product attention with the softmax in float32.

    Self-attention when `context` is None (its K/V are the ones patch parallelism exchanges),
    cross-attention to `context` (text tokens, always local) otherwise.
    `implementation`: None lets `jax.nn.dot_product_attention` choose (today XLA's, which
    materialises the [B, N, Tq, Tk] scores), "xla" / "cudnn" are passed to it ("cudnn": the fused
    GPU kernel); "chunked" is `chunked_dot_product_attention` (blockwise, online softmax, any
    backend: extra memory O(B N q_chunk kv_chunk) instead of O(B N Tq Tk)); "auto" is
    `choose_implementation`: cuDNN's on NVIDIA GPUs where it applies, "chunked" where the float32
    scores would exceed AUTO_CHUNKED_BYTES, XLA's elsewhere.
    """

    heads: int
    head_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: Optional[str] = None
    parallel: Optional[LayerPlan] = None  # the patch-parallel plan; None: a single device
    qkv_bias: bool = False  # biases on to_q/to_k/to_v: the VAE's attention has them, the UNet's does not
    q_chunk: int = 1024  # "chunked": queries per block
    kv_chunk: int = 4096  # "chunked": keys and values per block

    @nn.compact
    def __call__(self, x, context=None):  # x: [B, T, D], context: [B, S, Dc] or None
        if self.implementation not in IMPLEMENTATIONS:
            raise ConfigError(
                f"unknown attention implementation {self.implementation!r}: use one of "
                + ", ".join(map(repr, IMPLEMENTATIONS))
            )
        inner = self.heads * self.head_dim
        dense = lambda feats, name, bias: nn.Dense(
            feats, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        split = lambda a: a.reshape(a.shape[:2] + (self.heads, self.head_dim))  # [B, T, N, Hd]
        to_k, to_v = dense(inner, "to_k", self.qkv_bias), dense(inner, "to_v", self.qkv_bias)
        project = lambda tokens: (split(to_k(tokens)), split(to_v(tokens)))
        q = split(dense(inner, "to_q", self.qkv_bias)(x))
        k, v = self.self_attention_kv(x, project) if context is None else project(context)
        dtype = q.dtype
        if dtype == jnp.float16 and jax.default_backend() == "cpu":
            # XLA:CPU has no float16 dot with float32 accumulation (which JAX asks for): use float32.
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        impl = self.implementation
        if impl == "auto":
            b, t, n, hd = q.shape
            impl = choose_implementation(b, n, t, k.shape[1], hd, q.dtype, cuda_capability())
        if impl == "chunked":
            out = chunked_dot_product_attention(q, k, v, self.q_chunk, self.kv_chunk)
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        out = out.astype(dtype).reshape(out.shape[:2] + (inner,))
        return dense(x.shape[-1], "to_out_0", True)(out)

    def self_attention_kv(self, x, project):
        """Keys and values of the whole image for self-attention from this layer's input tokens x
        [B, T, D] and its projection `project(tokens) -> (k, v)`: on one device, project(x)."""
        if self.parallel is not None:
            return self.parallel.self_attention_kv(self, x, project)
        return project(x)


def _block(t: int, size: int) -> int:
    """Block length for t tokens in blocks of at most `size`: t itself, else the largest divisor of t in
    [size / 2, size] (no padding), else ceil(t / n) for n = ceil(t / size) blocks (under n padded)."""
    if t <= size:
        return t
    for c in range(size, (size + 1) // 2 - 1, -1):
        if t % c == 0:
            return c
    return -(-t // -(-t // size))


def _pad_tokens(a, length: int):
    """a [B, T, ...] zero-padded at the end to `length` tokens (a itself when it has them)."""
    pad = length - a.shape[1]
    return a if pad == 0 else jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))


def _varying_like(tree, *refs):
    """Type the leaves of `tree` as varying over every manual mesh axis any of `refs` varies over.

    Under shard_map a scan carry must keep its type: the running softmax state starts from constants
    (invariant) but is updated from q, k, v, which vary over the mesh axes of their band. No data moves.
    """
    axes = frozenset().union(*(jax.typeof(r).manual_axis_type.varying for r in refs))

    def cast(x):
        missing = tuple(sorted(axes - frozenset(jax.typeof(x).manual_axis_type.varying)))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def chunked_dot_product_attention(q, k, v, q_chunk: int = 1024, kv_chunk: int = 4096):
    """softmax(q k^T / sqrt(Hd)) v blockwise: q [B, Tq, N, Hd], k, v [B, Tk, N, Hd] -> [B, Tq, N, Hd].

    Query blocks one after another (`lax.map`); for each, a `lax.scan` over key/value blocks keeps
    a running float32 maximum m, sum l and output accumulator (the online softmax): with a block's
    logits s, m' = max(m, max s), l' = l e^(m - m') + sum e^(s - m'), acc' = acc e^(m - m') +
    e^(s - m') v. Logits are float32 (dots accumulate in float32 for half inputs); the probabilities
    meet V in V's dtype, as in `jax.nn.dot_product_attention`. Token counts need not divide the
    blocks (`_block` prefers a divisor): queries are zero-padded and cut off, padded keys masked out.
    Key/value blocks are sliced in place (no copy of K and V unless padded). Extra memory: the
    float32 logits and probabilities of one block pair, 2 B N q_chunk kv_chunk 4 bytes, plus the
    accumulator B q_chunk N Hd 4 bytes. Returns q's dtype.
    """
    b, tq, n, hd = q.shape
    tk = k.shape[1]
    cq, ck = _block(tq, q_chunk), _block(tk, kv_chunk)
    nq, nk = -(-tq // cq), -(-tk // ck)
    qs = _pad_tokens(q, nq * cq).reshape(b, nq, cq, n, hd).swapaxes(0, 1)  # [nq, B, cq, N, Hd]
    k, v = _pad_tokens(k, nk * ck), _pad_tokens(v, nk * ck)
    scale = jnp.float32(1.0 / math.sqrt(hd))

    def query_block(qb):  # [B, cq, N, Hd]
        def step(carry, j):
            m, total, acc = carry  # running max, softmax denominator, output: [B, N, cq] x2, [B, cq, N, Hd]
            kb, vb = (lax.dynamic_slice_in_dim(a, j * ck, ck, axis=1) for a in (k, v))
            s = jnp.einsum("bqnh,bknh->bnqk", qb, kb, preferred_element_type=jnp.float32) * scale
            if nk * ck != tk:
                s = jnp.where(j * ck + jnp.arange(ck) < tk, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            fade = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            total = total * fade + p.sum(axis=-1)
            pv = jnp.einsum("bnqk,bknh->bqnh", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
            return (m_new, total, acc * fade.transpose(0, 2, 1)[..., None] + pv), None

        init = _varying_like(
            (
                jnp.full((b, n, cq), -jnp.inf, jnp.float32),
                jnp.zeros((b, n, cq), jnp.float32),
                jnp.zeros((b, cq, n, hd), jnp.float32),
            ),
            qb,
            k,
            v,
        )
        (_, total, acc), _ = lax.scan(step, init, jnp.arange(nk))
        return acc / total.transpose(0, 2, 1)[..., None]

    out = lax.map(query_block, qs)  # [nq, B, cq, N, Hd]
    return out.swapaxes(0, 1).reshape(b, nq * cq, n, hd)[:, :tq].astype(q.dtype)
