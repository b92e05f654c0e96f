"""Flax `AutoencoderKL` (the SD / SDXL VAE), NHWC, built from the leaf layers and equal to diffusers' model."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..config import read_json
from ..errors import ConfigError, DistriFusionError
from ..nn import Attention, Conv2d, GroupNorm
from ..nn.plan import LayerPlan
from .blocks import ACT, Common, Upsample2D

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
EPS = 1e-6  # diffusers' Encoder and Decoder use this epsilon for every GroupNorm
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to this


# ---- configuration ----
@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Configuration of an `AutoencoderKL`, field names, meanings and defaults as in diffusers.

    `scaling_factor` (and `shift_factor`, `latents_mean` / `latents_std` where a checkpoint has them)
    describe the latent space; the model does not apply them: the UNet's latents are divided by
    `scaling_factor` before `decode`, and `encode`'s mean is multiplied by it, as diffusers' pipelines do.
    `force_upcast=True` (SDXL) means the checkpoint overflows in float16: decode in float32 (the
    default of `load_vae`); bfloat16 has float32's range and is a faster option.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple] = None
    latents_std: Optional[tuple] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for SD / SDXL)."""
        return 2 ** (self.num_levels - 1)

    @classmethod
    def from_dict(cls, raw: dict) -> "VAEConfig":
        """Validate a diffusers AutoencoderKL `config.json` dict; reject unknown fields and unsupported values."""
        cls_name = raw.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise ConfigError(
                f"unsupported VAE class _class_name={cls_name!r}: only AutoencoderKL is supported"
            )
        d = {k: v for k, v in raw.items() if not k.startswith("_")}
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(
                f"unknown VAE config field(s) {', '.join(unknown)}: not part of the supported "
                "AutoencoderKL configuration; remove them or check the file"
            )
        for key in (
            "down_block_types",
            "up_block_types",
            "block_out_channels",
            "latents_mean",
            "latents_std",
            "sample_size",
        ):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        config = cls(**d)
        config.validate()
        return config

    @classmethod
    def from_json(cls, path) -> "VAEConfig":
        return cls.from_dict(read_json(path))

    def to_dict(self) -> dict:
        """The config as a diffusers `config.json` dict (diffusers builds the same model from it)."""
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        return {"_class_name": "AutoencoderKL", **d}

    def validate(self) -> None:
        """One-line ConfigError naming the field and value for anything we do not compute like diffusers."""

        def bad(key, value, supported):
            raise ConfigError(f"unsupported VAE config value {key}={value!r}: supported {supported}")

        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
        is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        for key in ("in_channels", "out_channels", "latent_channels", "norm_num_groups", "layers_per_block"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 1:
                bad(key, getattr(self, key), "a positive int")
        boc = self.block_out_channels
        if not isinstance(boc, tuple) or not boc or not all(is_int(c) and c > 0 for c in boc):
            bad("block_out_channels", boc, "a non-empty list of positive ints")
        for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            values = getattr(self, key)
            if not isinstance(values, tuple) or len(values) != len(boc):
                raise ConfigError(
                    f"VAE config {key}={values!r} must be a list with one entry per level "
                    f"(len(block_out_channels)={len(boc)})"
                )
            for v in values:
                if v not in allowed:
                    raise ConfigError(
                        f"unsupported VAE config value {key} entry {v!r}: supported {allowed[0]!r}"
                    )
        if self.act_fn not in ACT:
            bad("act_fn", self.act_fn, ", ".join(map(repr, ACT)))
        for i, c in enumerate(boc):
            if c % self.norm_num_groups:
                raise ConfigError(
                    f"VAE config: block_out_channels[{i}]={c} is not divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )
        for key in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, key), bool):
                bad(key, getattr(self, key), "true or false")
        if not is_num(self.scaling_factor) or self.scaling_factor <= 0:
            bad("scaling_factor", self.scaling_factor, "a positive number")
        if self.shift_factor is not None and not is_num(self.shift_factor):
            bad("shift_factor", self.shift_factor, "null or a number")
        for key in ("latents_mean", "latents_std"):
            v = getattr(self, key)
            if v is not None and not (
                isinstance(v, tuple) and len(v) == self.latent_channels and all(map(is_num, v))
            ):
                bad(key, v, f"null or a list of latent_channels={self.latent_channels} numbers")


class ResnetBlock(Common):
    """diffusers ResnetBlock2D without a time embedding: GroupNorm -> act -> conv3x3, twice, plus shortcut."""

    out_channels: int = 128
    groups: int = 32
    act_fn: str = "silu"

    @nn.compact
    def __call__(self, x):  # x: [B, H, W, Cin]
        act = ACT[self.act_fn]
        h = self.conv(self.out_channels, "conv1")(act(self.group_norm(self.groups, EPS, "norm1")(x)))
        h = self.conv(self.out_channels, "conv2")(act(self.group_norm(self.groups, EPS, "norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = self.conv(self.out_channels, "conv_shortcut", kernel_size=1)(x)
        return x.astype(self.dtype) + h


class DownsampleConv(Conv2d):
    """3x3 stride-2 conv over the input padded with one zero row and column at the bottom and right only.

    This is diffusers' Downsample2D with padding=0 (the VAE encoder's). The rows come through the
    leaf's `pad_rows`, so a row band gets its lower neighbour's first row; the row it also gets
    from above is dropped, as the padding is asymmetric.
    """

    @nn.compact
    def __call__(self, x):  # x: [B, H, W, Cin] -> [B, H // 2, W // 2, features]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        x = self.pad_rows(x, 1)[:, 1:]
        y = lax.conv_general_dilated(
            x, kernel, (2, 2), ((0, 0), (0, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + bias


class Downsample(Common):
    """downsamplers_0: the asymmetric-padding stride-2 conv, as `conv`."""

    out_channels: int = 128

    @nn.compact
    def __call__(self, x):
        return DownsampleConv(self.out_channels, **self.common(), name="conv")(x)


class SpatialSelfAttention(Common):
    """diffusers' VAE attention: GroupNorm, one-head self-attention over the H*W tokens (biases on q, k, v),
    residual, divided by `rescale_output_factor`.

    The GroupNorm is `group_norm` and the attention's projections (to_q, ..., to_out_0) sit directly
    beside it, as in the checkpoint: the `Attention` leaf shares this module's scope.
    """

    channels: int = 512
    groups: int = 32
    rescale_output_factor: float = 1.0
    attention_impl: Optional[str] = None

    def setup(self):
        self.group_norm = GroupNorm(self.groups, EPS, **self.common())
        self.attention = Attention(
            1, self.channels, **self.common(), implementation=self.attention_impl, qkv_bias=True
        )
        nn.share_scope(self, self.attention)

    def __call__(self, x):  # x: [B, H, W, C]
        b, h, w, c = x.shape
        hs = self.group_norm(x).reshape(b, h * w, c)
        hs = self.attention(hs).reshape(b, h, w, c)
        out = hs + x.astype(self.dtype)
        return out if self.rescale_output_factor == 1 else out / self.rescale_output_factor


class VAEBlock(Common):
    """Fields shared by the encoder's and decoder's blocks."""

    out_channels: int = 128
    num_layers: int = 1
    groups: int = 32
    act_fn: str = "silu"

    def resnet(self, i):
        return ResnetBlock(
            **self.common(),
            out_channels=self.out_channels,
            groups=self.groups,
            act_fn=self.act_fn,
            name=f"resnets_{i}",
        )


class DownEncoderBlock(VAEBlock):
    """DownEncoderBlock2D: resnets, then (except at the last level) the stride-2 downsampler."""

    add_downsample: bool = True

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = self.resnet(i)(x)
        if self.add_downsample:
            x = Downsample(**self.common(), out_channels=self.out_channels, name="downsamplers_0")(x)
        return x


class UpDecoderBlock(VAEBlock):
    """UpDecoderBlock2D: resnets, then (except at the last level) nearest 2x upsampling and a conv."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = self.resnet(i)(x)
        if self.add_upsample:
            x = Upsample2D(**self.common(), out_channels=self.out_channels, name="upsamplers_0")(x)
        return x


class VAEMidBlock(VAEBlock):
    """UNetMidBlock2D without a time embedding: resnet, (attention,) resnet."""

    add_attention: bool = True
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x):
        x = self.resnet(0)(x)
        if self.add_attention:
            x = SpatialSelfAttention(
                **self.common(),
                channels=self.out_channels,
                groups=self.groups,
                attention_impl=self.attention_impl,
                name="attentions_0",
            )(x)
        return self.resnet(1)(x)


class Coder(nn.Module):
    """Fields of the encoder and decoder: the config, dtypes, patch-parallel plan, attention kernel."""

    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    parallel: Optional[LayerPlan] = None
    attention_impl: Optional[str] = None

    def common(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, parallel=self.parallel)

    def block(self, channels) -> dict:
        cfg = self.config
        return dict(**self.common(), out_channels=channels, groups=cfg.norm_num_groups, act_fn=cfg.act_fn)

    def mid_block(self, x):
        cfg = self.config
        return VAEMidBlock(
            **self.block(cfg.block_out_channels[-1]),
            add_attention=cfg.mid_block_add_attention,
            attention_impl=self.attention_impl,
            name="mid_block",
        )(x)

    def output(self, x, features):
        # diffusers' conv_act is always SiLU, whatever act_fn (which only the resnets use)
        x = GroupNorm(self.config.norm_num_groups, EPS, **self.common(), name="conv_norm_out")(x)
        return Conv2d(features, **self.common(), name="conv_out")(nn.silu(x))


class Encoder(Coder):
    """Image [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 latent_channels] (before quant_conv)."""

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = Conv2d(cfg.block_out_channels[0], **self.common(), name="conv_in")(x.astype(self.dtype))
        for i, c in enumerate(cfg.block_out_channels):
            x = DownEncoderBlock(
                **self.block(c),
                num_layers=cfg.layers_per_block,
                add_downsample=i < cfg.num_levels - 1,
                name=f"down_blocks_{i}",
            )(x)
        return self.output(self.mid_block(x), 2 * cfg.latent_channels)


class Decoder(Coder):
    """Latent [B, h, w, latent_channels] (after post_quant_conv) -> image [B, h*f, w*f, out_channels]."""

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        x = Conv2d(cfg.block_out_channels[-1], **self.common(), name="conv_in")(z.astype(self.dtype))
        x = self.mid_block(x)
        for j, c in enumerate(reversed(cfg.block_out_channels)):
            x = UpDecoderBlock(
                **self.block(c),
                num_layers=cfg.layers_per_block + 1,
                add_upsample=j < cfg.num_levels - 1,
                name=f"up_blocks_{j}",
            )(x)
        return self.output(x, cfg.out_channels)


class AutoencoderKL(nn.Module):
    """The KL autoencoder of Stable Diffusion, NHWC.

    `vae.apply({"params": p}, image, method=vae.encode)` -> (mean, logvar), each [B, H/f, W/f, latent_channels]:
      the diagonal Gaussian after quant_conv (logvar clamped to [-30, 20] as in diffusers);
      SD latents are `mean * config.scaling_factor` (or a sample of the Gaussian, likewise scaled).
    `vae.apply({"params": p}, z, method=vae.decode)` -> image [B, h*f, w*f, out_channels], about [-1, 1]:
      z is the latent already divided by `scaling_factor`, as given to diffusers' `vae.decode`.
    f = 2^(levels - 1) (8 for SD / SDXL). `dtype` is the compute dtype, `param_dtype` that of the
    parameters; GroupNorm statistics and the softmax are float32 whatever they are.
    """

    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    parallel: Optional[LayerPlan] = None  # the leaf layers' patch-parallel plan; None: one device
    attention_impl: Optional[str] = None

    def setup(self):
        cfg = self.config
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, parallel=self.parallel)
        self.encoder = Encoder(cfg, **common, attention_impl=self.attention_impl)
        self.decoder = Decoder(cfg, **common, attention_impl=self.attention_impl)
        self.quant_conv = Conv2d(2 * cfg.latent_channels, 1, **common) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv2d(cfg.latent_channels, 1, **common) if cfg.use_post_quant_conv else None

    @property
    def scaling_factor(self) -> float:
        """Latent scale of the diffusion model: SD latents are `scaling_factor` times the VAE's."""
        return self.config.scaling_factor

    def encode(self, x):
        """Image [B, H, W, in_channels] (NHWC, values in [-1, 1]) -> (mean, logvar) of the posterior."""
        self._check(x, self.config.in_channels, "image", "encode")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        """Latent z [B, h, w, latent_channels] (divided by scaling_factor) -> image [B, h*f, w*f, out_channels]."""
        self._check(z, self.config.latent_channels, "latent", "decode")
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x):
        """Reconstruction through the posterior mean (touches every parameter: what `init` runs)."""
        return self.decode(self.encode(x)[0])

    @staticmethod
    def _check(x, channels, what, method):
        if x.ndim != 4 or x.shape[-1] != channels:
            raise DistriFusionError(
                f"{method}: {what} has shape {tuple(x.shape)}; expected NHWC [B, H, W, {channels}] "
                "(transpose NCHW arrays with x.transpose(0, 2, 3, 1))"
            )

    # ---- parameters without a checkpoint ----
    def abstract_params(self):
        """The parameter tree as ShapeDtypeStructs, by abstract evaluation (no memory)."""
        f = self.config.downsample_factor
        x = jax.ShapeDtypeStruct((1, f, f, self.config.in_channels), jnp.float32)
        return jax.eval_shape(lambda a: self.init(jax.random.key(0), a), x)["params"]

    def init_params(self, seed: int = 0):
        """Random parameters drawn on the host (kernels ~ N(0, 1/fan_in), scales 1 + N(0, 0.02), biases
        N(0, 0.02)), for tests and demos; real weights come through `load_vae`."""
        rng = np.random.default_rng(seed)

        def draw(path, a):
            leaf = path[-1].key
            if leaf == "kernel":
                x = rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))
            else:
                x = (leaf == "scale") + 0.02 * rng.standard_normal(a.shape)
            return jnp.asarray(x, self.param_dtype)

        return jax.tree_util.tree_map_with_path(draw, self.abstract_params())
