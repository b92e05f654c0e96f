"""Flax `UNet2DConditionModel` (SDXL base/refiner, SD 1.x/2.x), NHWC, equal to diffusers' PyTorch model."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import fmt_allowed, read_json
from ..errors import ConfigError, DistriFusionError
from ..nn import Conv2d, GroupNorm
from ..nn.plan import LayerPlan
from .blocks import ACT, DownBlock, MidBlock, TimestepEmbedding, UpBlock, timestep_embedding

# ---- configuration ----
DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
ACTIVATIONS = ("silu", "swish", "gelu", "mish")

# diffusers fields we accept only at one value (the one SDXL and SD 1.x / 2.x use). Anything else
# would silently change the computation, so it is rejected with the field's name.
_FIXED_FIELDS: dict[str, tuple] = {
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "dual_cross_attention": (False,),
    "attention_type": ("default",),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "downsample_padding": (1,),
    "reverse_transformer_layers_per_block": (None,),
}
# Fields that do not affect inference (dropout) or only describe the checkpoint.
_IGNORED_FIELDS = ("dropout", "sample_size", "addition_embed_type_num_heads")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Configuration of a `UNet2DConditionModel`, per-level fields normalised to tuples.

    Field names and meanings are diffusers'. In particular the number of attention heads of a level
    is `num_attention_heads[i]` when given, else `attention_head_dim[i]` (diffusers' historical
    naming: in SD and SDXL configs `attention_head_dim` holds head counts).
    """

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: tuple = (2, 2, 2, 2)
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: tuple = (1280, 1280, 1280, 1280)
    transformer_layers_per_block: tuple = (1, 1, 1, 1)
    attention_head_dim: tuple = (8, 8, 8, 8)
    num_attention_heads: Optional[tuple] = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None

    # ---- derived ----
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def num_downsamplers(self) -> int:
        return self.num_levels - 1

    @property
    def heads(self) -> tuple:
        return self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    # ---- construction ----
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "UNetConfig":
        """Validate a diffusers UNet `config.json` dict; reject unknown fields and unsupported values."""
        d = {k: v for k, v in raw.items() if not k.startswith("_")}
        cls_name = raw.get("_class_name", "UNet2DConditionModel")
        if cls_name != "UNet2DConditionModel":
            raise ConfigError(
                f"unsupported UNet class _class_name={cls_name!r}: only UNet2DConditionModel is supported"
            )
        for key, allowed in _FIXED_FIELDS.items():
            if key in d:
                value = d.pop(key)
                if value not in allowed:
                    raise ConfigError(
                        f"unsupported UNet config value {key}={value!r}: supported {fmt_allowed(allowed)}"
                    )
        for key in _IGNORED_FIELDS:
            d.pop(key, None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown UNet config field(s) {', '.join(unknown)}: not part of the supported "
                "UNet2DConditionModel configuration; remove them or check the file"
            )
        levels = len(d.get("block_out_channels", cls.block_out_channels))

        def per_level(key, default):
            value = d.get(key, default)
            if isinstance(value, (list, tuple)):
                if len(value) != levels:
                    raise ConfigError(
                        f"UNet config {key}={list(value)!r} has {len(value)} entries but the model "
                        f"has {levels} levels (len(block_out_channels))"
                    )
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                    raise ConfigError(
                        f"unsupported UNet config value {key}={value!r}: expected an int or a list "
                        "of ints, one per level"
                    )
                return tuple(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(
                    f"unsupported UNet config value {key}={value!r}: expected an int or a list of ints"
                )
            return (value,) * levels

        out = dict(d)
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in out:
                out[key] = tuple(out[key])
        out["layers_per_block"] = per_level("layers_per_block", 2)
        out["cross_attention_dim"] = per_level("cross_attention_dim", 1280)
        out["transformer_layers_per_block"] = per_level("transformer_layers_per_block", 1)
        out["attention_head_dim"] = per_level("attention_head_dim", 8)
        if d.get("num_attention_heads") is not None:
            out["num_attention_heads"] = per_level("num_attention_heads", None)
        oca = d.get("only_cross_attention", False)
        if (isinstance(oca, (list, tuple)) and any(oca)) or (not isinstance(oca, (list, tuple)) and oca):
            raise ConfigError(f"unsupported UNet config value only_cross_attention={oca!r}: supported false")
        out["only_cross_attention"] = False
        config = cls(**out)
        config.validate()
        return config

    @classmethod
    def from_json(cls, path) -> "UNetConfig":
        return cls.from_dict(read_json(path))

    def validate(self) -> None:
        n = self.num_levels
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"UNet config: down_block_types ({len(self.down_block_types)}) and up_block_types "
                f"({len(self.up_block_types)}) must both have len(block_out_channels)={n} entries"
            )
        for key, allowed, values in (
            ("down_block_types", DOWN_BLOCK_TYPES, self.down_block_types),
            ("up_block_types", UP_BLOCK_TYPES, self.up_block_types),
        ):
            for v in values:
                if v not in allowed:
                    raise ConfigError(
                        f"unsupported UNet config value {key} entry {v!r}: supported {fmt_allowed(allowed)}"
                    )
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ConfigError(
                f"unsupported UNet config value mid_block_type={self.mid_block_type!r}: "
                f"supported {fmt_allowed(MID_BLOCK_TYPES)}"
            )
        if self.act_fn not in ACTIVATIONS:
            raise ConfigError(
                f"unsupported UNet config value act_fn={self.act_fn!r}: supported {fmt_allowed(ACTIVATIONS)}"
            )
        if self.addition_embed_type not in (None, "text_time"):
            raise ConfigError(
                f"unsupported UNet config value addition_embed_type={self.addition_embed_type!r}: "
                "supported None, 'text_time'"
            )
        if self.addition_embed_type == "text_time" and (
            self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None
        ):
            raise ConfigError(
                "UNet config: addition_embed_type='text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        for i, (c, h) in enumerate(zip(self.block_out_channels, self.heads)):
            if c % self.norm_num_groups:
                raise ConfigError(
                    f"UNet config: block_out_channels[{i}]={c} is not divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )
            has_attn = (
                self.down_block_types[i] == "CrossAttnDownBlock2D"
                or (self.up_block_types[n - 1 - i] == "CrossAttnUpBlock2D")
                or i == n - 1
            )
            if has_attn and c % h:
                raise ConfigError(
                    f"UNet config: block_out_channels[{i}]={c} is not divisible by its {h} attention heads"
                )


def to_diffusers_dict(config: UNetConfig) -> dict:
    """The config as a diffusers `config.json` dict (diffusers can build the same model from it)."""
    d = dataclasses.asdict(config)
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
    d["_class_name"] = "UNet2DConditionModel"
    if d["num_attention_heads"] is None:
        del d["num_attention_heads"]
    return d


# ---- model ----
class UNet2DConditionModel(nn.Module):
    """Noise-prediction UNet.

    `unet.apply({"params": params}, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None)`:
      sample                 [B, H, W, in_channels] (NHWC latents; H and W multiples of 2^(levels-1))
      timesteps              scalar or [B]
      encoder_hidden_states  [B, S, cross_attention_dim]
      added_cond_kwargs      for addition_embed_type="text_time" (SDXL): {"text_embeds": [B, Dt],
                             "time_ids": [B, n]} with Dt + n * addition_time_embed_dim equal to
                             projection_class_embeddings_input_dim
    returns the prediction [B, H, W, out_channels] in `dtype`.
    `dtype` is the compute dtype, `param_dtype` that of the parameters; GroupNorm statistics,
    softmax and the timestep embedding are float32 whatever they are.
    """

    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None
    parallel: Optional[LayerPlan] = None  # the leaf layers' patch-parallel plan; None: one device

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        cfg = self.config
        self.check_inputs(sample, timesteps, encoder_hidden_states, added_cond_kwargs)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, parallel=self.parallel)
        batch = sample.shape[0]

        # 1. time embedding (+ SDXL micro-conditioning)
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        embed = dict(
            dtype=self.dtype, param_dtype=self.param_dtype, features=cfg.time_embed_dim, act_fn=cfg.act_fn
        )
        emb = TimestepEmbedding(**embed, name="time_embedding")(t_emb)
        if cfg.addition_embed_type == "text_time":
            time_ids = added_cond_kwargs["time_ids"]
            time_embeds = timestep_embedding(
                time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
            ).reshape(batch, -1)
            add = jnp.concatenate(
                [added_cond_kwargs["text_embeds"].astype(jnp.float32), time_embeds], axis=-1
            )
            emb = emb + TimestepEmbedding(**embed, name="add_embedding")(add)
        context = encoder_hidden_states.astype(self.dtype)

        # 2. input conv
        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = Conv2d(cfg.block_out_channels[0], **common, exact_halo=True, name="conv_in")(x)
        skips = [x]

        # 3. down
        for i, kind in enumerate(cfg.down_block_types):
            x, states = DownBlock(
                **common,
                **self.block_fields(i),
                num_layers=cfg.layers_per_block[i],
                has_attention=kind == "CrossAttnDownBlock2D",
                add_downsample=i < cfg.num_levels - 1,
                name=f"down_blocks_{i}",
            )(x, emb, context)
            skips += states

        # 4. mid
        x = MidBlock(
            **common,
            **self.block_fields(cfg.num_levels - 1),
            num_layers=1,
            has_attention=True,
            output_scale_factor=cfg.mid_block_scale_factor,
            name="mid_block",
        )(x, emb, context)

        # 5. up
        for j, kind in enumerate(cfg.up_block_types):
            level = cfg.num_levels - 1 - j
            n = cfg.layers_per_block[level] + 1
            x = UpBlock(
                **common,
                **self.block_fields(level),
                num_layers=n,
                has_attention=kind == "CrossAttnUpBlock2D",
                add_upsample=j < cfg.num_levels - 1,
                name=f"up_blocks_{j}",
            )(x, skips[-n:], emb, context)
            skips = skips[:-n]

        # 6. output
        x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, **common, name="conv_norm_out")(x)
        return Conv2d(cfg.out_channels, **common, name="conv_out")(ACT[cfg.act_fn](x))

    def block_fields(self, level: int) -> dict:
        cfg = self.config
        return dict(
            out_channels=cfg.block_out_channels[level],
            heads=cfg.heads[level],
            depth=cfg.transformer_layers_per_block[level],
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            act_fn=cfg.act_fn,
            use_linear_projection=cfg.use_linear_projection,
            attention_impl=self.attention_impl,
        )

    def check_inputs(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs):
        """Shape checks at trace time, each a one-line error naming the fix."""
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise DistriFusionError(
                f"sample has shape {tuple(sample.shape)}; expected NHWC [B, H, W, "
                f"{cfg.in_channels}] (transpose NCHW latents with x.transpose(0, 2, 3, 1))"
            )
        b, h, w, _ = sample.shape
        f = 2**cfg.num_downsamplers
        if h % f or w % f:
            raise DistriFusionError(
                f"latent size {h}x{w} is not divisible by {f} (2^{cfg.num_downsamplers} "
                f"downsamplers): use latent sizes that are multiples of {f} "
                f"(image sizes multiples of {8 * f})"
            )
        t = jnp.shape(timesteps)
        if t not in ((), (1,), (b,)):
            raise DistriFusionError(f"timesteps has shape {t}; expected a scalar or ({b},) for batch {b}")
        cross = cfg.cross_attention_dim[0]
        if (
            encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[0] != b
            or encoder_hidden_states.shape[-1] != cross
        ):
            raise DistriFusionError(
                f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}; "
                f"expected [{b}, S, {cross}]"
            )
        if cfg.addition_embed_type == "text_time":
            if (
                not added_cond_kwargs
                or "text_embeds" not in added_cond_kwargs
                or "time_ids" not in added_cond_kwargs
            ):
                raise DistriFusionError(
                    "this UNet uses SDXL micro-conditioning: pass added_cond_kwargs="
                    "{'text_embeds': [B, D], 'time_ids': [B, n]}"
                )
            te, ti = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            if (
                te.ndim != 2
                or ti.ndim != 2
                or te.shape[0] != b
                or ti.shape[0] != b
                or te.shape[1] + ti.shape[1] * cfg.addition_time_embed_dim
                != cfg.projection_class_embeddings_input_dim
            ):
                raise DistriFusionError(
                    f"added_cond_kwargs text_embeds {tuple(te.shape)} and time_ids {tuple(ti.shape)} do not fit: "
                    f"need [{b}, D] and [{b}, n] with D + n * {cfg.addition_time_embed_dim} = "
                    f"{cfg.projection_class_embeddings_input_dim}"
                )

    # ---- abstract inputs, for shapes without data ----
    def dummy_inputs(self, batch: int = 1, height: Optional[int] = None, width: Optional[int] = None):
        """Smallest valid inputs (as ShapeDtypeStructs) for `init` / `eval_shape`."""
        cfg = self.config
        f = 2**cfg.num_downsamplers
        h, w = height or f, width or f
        s = jax.ShapeDtypeStruct
        args = [
            s((batch, h, w, cfg.in_channels), jnp.float32),
            s((batch,), jnp.float32),
            s((batch, 1, cfg.cross_attention_dim[0]), jnp.float32),
        ]
        if cfg.addition_embed_type == "text_time":
            d = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim
            args.append({"text_embeds": s((batch, d), jnp.float32), "time_ids": s((batch, 1), jnp.float32)})
        else:
            args.append(None)
        return args

    def abstract_params(self):
        """The parameter tree as ShapeDtypeStructs, by abstract evaluation (no memory, about a second)."""
        return jax.eval_shape(lambda: self.init(jax.random.key(0), *self._zeros(self.dummy_inputs())))[
            "params"
        ]

    def init_params(self, seed: int = 0):
        """Random parameters drawn on the host from the abstract shapes (fast: no init compile).

        Kernels ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.02), biases N(0, 0.02): a well-scaled network
        for tests and demos. Real weights come through `load_unet`.
        """
        rng = np.random.default_rng(seed)

        def draw(path, a):
            leaf = path[-1].key
            if leaf == "kernel":
                x = rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))
            elif leaf == "scale":
                x = 1.0 + 0.02 * rng.standard_normal(a.shape)
            else:
                x = 0.02 * rng.standard_normal(a.shape)
            return jnp.asarray(x, self.param_dtype)

        return jax.tree_util.tree_map_with_path(draw, self.abstract_params())

    @staticmethod
    def _zeros(args):
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), args)
