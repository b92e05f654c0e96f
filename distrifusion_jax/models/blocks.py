"""UNet building blocks, composed from the leaf layers; submodule names follow diffusers' checkpoint paths."""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from ..nn import Attention, Conv2d, GroupNorm
from ..nn.plan import LayerPlan

ACT = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
}


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
    """Sinusoidal embedding of t [N] -> [N, dim] in float32 (diffusers `get_timestep_embedding`)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Common(nn.Module):
    """Fields every block passes down: dtypes and the (opaque) patch-parallel plan of the leaf layers."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    parallel: Optional[LayerPlan] = None

    def common(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, parallel=self.parallel)

    def dense(self, features, name, use_bias=True):
        return nn.Dense(
            features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )

    def conv(self, features, name, kernel_size=3, stride=1):
        return Conv2d(features, kernel_size, stride, **self.common(), name=name)

    def group_norm(self, groups, eps, name):
        return GroupNorm(groups, eps, **self.common(), name=name)


class TimestepEmbedding(Common):
    """linear_1 -> act -> linear_2."""

    features: int = 1280
    act_fn: str = "silu"

    @nn.compact
    def __call__(self, x):
        x = self.dense(self.features, "linear_1")(x.astype(self.dtype))
        return self.dense(self.features, "linear_2")(ACT[self.act_fn](x))


class ResnetBlock2D(Common):
    """GroupNorm -> act -> conv3x3 (+ time embedding) -> GroupNorm -> act -> conv3x3, plus shortcut."""

    out_channels: int = 320
    groups: int = 32
    eps: float = 1e-5
    act_fn: str = "silu"
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x, temb):  # x: [B, H, W, Cin], temb: [B, Temb]
        act = ACT[self.act_fn]
        h = act(self.group_norm(self.groups, self.eps, "norm1")(x))
        h = self.conv(self.out_channels, "conv1")(h)
        h = h + self.dense(self.out_channels, "time_emb_proj")(act(temb))[:, None, None, :]
        h = act(self.group_norm(self.groups, self.eps, "norm2")(h))
        h = self.conv(self.out_channels, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = self.conv(self.out_channels, "conv_shortcut", kernel_size=1)(x)
        out = x.astype(self.dtype) + h
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class GEGLU(Common):
    """proj (dim -> 2 * inner), then hidden * gelu(gate) with the exact gelu."""

    inner: int = 1280

    @nn.compact
    def __call__(self, x):
        hidden, gate = jnp.split(self.dense(2 * self.inner, "proj")(x), 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(Common):
    """net_0 (GEGLU, dim -> 4 dim) -> net_2 (4 dim -> dim)."""

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        x = GEGLU(**self.common(), inner=4 * dim, name="net_0")(x)
        return self.dense(dim, "net_2")(x)


class BasicTransformerBlock(Common):
    """Pre-LayerNorm self-attention, cross-attention, GEGLU feed-forward, each with a residual."""

    heads: int = 8
    head_dim: int = 40
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, context):  # x: [B, T, D], context: [B, S, Dc]
        ln = lambda name: nn.LayerNorm(
            epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype, use_fast_variance=False, name=name
        )
        attn = lambda name: Attention(
            self.heads, self.head_dim, **self.common(), implementation=self.attention_impl, name=name
        )
        x = x + attn("attn1")(ln("norm1")(x))
        x = x + attn("attn2")(ln("norm2")(x), context)
        x = x + FeedForward(**self.common(), name="ff")(ln("norm3")(x))
        return x


class Transformer2DModel(Common):
    """GroupNorm -> proj_in -> `depth` transformer blocks over H*W tokens -> proj_out, plus residual."""

    heads: int = 8
    head_dim: int = 40
    depth: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, context):  # x: [B, H, W, C]
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim
        hs = self.group_norm(self.groups, 1e-6, "norm")(x)
        if self.use_linear_projection:
            hs = self.dense(inner, "proj_in")(hs.reshape(b, h * w, c))
        else:
            hs = self.conv(inner, "proj_in", kernel_size=1)(hs).reshape(b, h * w, inner)
        for i in range(self.depth):
            hs = BasicTransformerBlock(
                **self.common(),
                heads=self.heads,
                head_dim=self.head_dim,
                attention_impl=self.attention_impl,
                name=f"transformer_blocks_{i}",
            )(hs, context)
        if self.use_linear_projection:
            hs = self.dense(c, "proj_out")(hs).reshape(b, h, w, c)
        else:
            hs = self.conv(c, "proj_out", kernel_size=1)(hs.reshape(b, h, w, inner))
        return hs + x.astype(self.dtype)


class Downsample2D(Common):
    """3x3 conv, stride 2, padding 1."""

    out_channels: int = 320

    @nn.compact
    def __call__(self, x):
        return self.conv(self.out_channels, "conv", stride=2)(x)


class Upsample2D(Common):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    out_channels: int = 320

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(self.out_channels, "conv")(x)


class BlockSpec(Common):
    """Fields shared by down, mid and up blocks."""

    out_channels: int = 320
    num_layers: int = 2
    has_attention: bool = False
    heads: int = 8
    depth: int = 1
    groups: int = 32
    eps: float = 1e-5
    act_fn: str = "silu"
    use_linear_projection: bool = False
    attention_impl: Optional[str] = None

    def resnet(self, i, scale=1.0):
        return ResnetBlock2D(
            **self.common(),
            out_channels=self.out_channels,
            groups=self.groups,
            eps=self.eps,
            act_fn=self.act_fn,
            output_scale_factor=scale,
            name=f"resnets_{i}",
        )

    def transformer(self, i):
        return Transformer2DModel(
            **self.common(),
            heads=self.heads,
            head_dim=self.out_channels // self.heads,
            depth=self.depth,
            groups=self.groups,
            use_linear_projection=self.use_linear_projection,
            attention_impl=self.attention_impl,
            name=f"attentions_{i}",
        )


class DownBlock(BlockSpec):
    """DownBlock2D / CrossAttnDownBlock2D: returns the output and every intermediate state for the skips."""

    add_downsample: bool = True

    @nn.compact
    def __call__(self, x, temb, context):
        states = []
        for i in range(self.num_layers):
            x = self.resnet(i)(x, temb)
            if self.has_attention:
                x = self.transformer(i)(x, context)
            states.append(x)
        if self.add_downsample:
            x = Downsample2D(**self.common(), out_channels=self.out_channels, name="downsamplers_0")(x)
            states.append(x)
        return x, states


class UpBlock(BlockSpec):
    """UpBlock2D / CrossAttnUpBlock2D: consumes skip states (last first), concatenated on channels."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context):
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = self.resnet(i)(x, temb)
            if self.has_attention:
                x = self.transformer(i)(x, context)
        if self.add_upsample:
            x = Upsample2D(**self.common(), out_channels=self.out_channels, name="upsamplers_0")(x)
        return x


class MidBlock(BlockSpec):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) once."""

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet(0, self.output_scale_factor)(x, temb)
        x = self.transformer(0)(x, context)
        return self.resnet(1, self.output_scale_factor)(x, temb)
