"""Flax `UNet2DConditionModel` (SDXL base/refiner, SD 1.x/2.x), NHWC, equal to diffusers' PyTorch model."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import UNetConfig
from ..errors import DistriFusionError
from ..nn import Conv2d, GroupNorm
from .blocks import ACT, DownBlock, MidBlock, TimestepEmbedding, UpBlock, timestep_embedding


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
    parallel: Any = None  # patch-parallel plan for the leaf layers (distrifusion_jax.parallel); None: one device

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        cfg = self.config
        self.check_inputs(sample, timesteps, encoder_hidden_states, added_cond_kwargs)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, parallel=self.parallel)
        batch = sample.shape[0]

        # 1. time embedding (+ SDXL micro-conditioning)
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        embed = dict(dtype=self.dtype, param_dtype=self.param_dtype, features=cfg.time_embed_dim, act_fn=cfg.act_fn)
        emb = TimestepEmbedding(**embed, name="time_embedding")(t_emb)
        if cfg.addition_embed_type == "text_time":
            time_ids = added_cond_kwargs["time_ids"]
            time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                             cfg.flip_sin_to_cos, cfg.freq_shift).reshape(batch, -1)
            add = jnp.concatenate([added_cond_kwargs["text_embeds"].astype(jnp.float32), time_embeds], axis=-1)
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
            x, states = DownBlock(**common, **self.block_fields(i), num_layers=cfg.layers_per_block[i],
                                  has_attention=kind == "CrossAttnDownBlock2D",
                                  add_downsample=i < cfg.num_levels - 1, name=f"down_blocks_{i}")(x, emb, context)
            skips += states

        # 4. mid
        x = MidBlock(**common, **self.block_fields(cfg.num_levels - 1), num_layers=1, has_attention=True,
                     output_scale_factor=cfg.mid_block_scale_factor, name="mid_block")(x, emb, context)

        # 5. up
        for j, kind in enumerate(cfg.up_block_types):
            level = cfg.num_levels - 1 - j
            n = cfg.layers_per_block[level] + 1
            x = UpBlock(**common, **self.block_fields(level), num_layers=n,
                        has_attention=kind == "CrossAttnUpBlock2D", add_upsample=j < cfg.num_levels - 1,
                        name=f"up_blocks_{j}")(x, skips[-n:], emb, context)
            skips = skips[:-n]

        # 6. output
        x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, **common, name="conv_norm_out")(x)
        return Conv2d(cfg.out_channels, **common, name="conv_out")(ACT[cfg.act_fn](x))

    def block_fields(self, level: int) -> dict:
        cfg = self.config
        return dict(out_channels=cfg.block_out_channels[level], heads=cfg.heads[level],
                    depth=cfg.transformer_layers_per_block[level], groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                    act_fn=cfg.act_fn, use_linear_projection=cfg.use_linear_projection,
                    attention_impl=self.attention_impl)

    def check_inputs(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs):
        """Shape checks at trace time, each a one-line error naming the fix."""
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise DistriFusionError(f"sample has shape {tuple(sample.shape)}; expected NHWC [B, H, W, "
                                    f"{cfg.in_channels}] (transpose NCHW latents with x.transpose(0, 2, 3, 1))")
        b, h, w, _ = sample.shape
        f = 2 ** cfg.num_downsamplers
        if h % f or w % f:
            raise DistriFusionError(f"latent size {h}x{w} is not divisible by {f} (2^{cfg.num_downsamplers} "
                                    f"downsamplers): use latent sizes that are multiples of {f} "
                                    f"(image sizes multiples of {8 * f})")
        t = jnp.shape(timesteps)
        if t not in ((), (1,), (b,)):
            raise DistriFusionError(f"timesteps has shape {t}; expected a scalar or ({b},) for batch {b}")
        cross = cfg.cross_attention_dim[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b or \
                encoder_hidden_states.shape[-1] != cross:
            raise DistriFusionError(f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}; "
                                    f"expected [{b}, S, {cross}]")
        if cfg.addition_embed_type == "text_time":
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
                raise DistriFusionError("this UNet uses SDXL micro-conditioning: pass added_cond_kwargs="
                                        "{'text_embeds': [B, D], 'time_ids': [B, n]}")
            te, ti = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            if te.ndim != 2 or ti.ndim != 2 or te.shape[0] != b or ti.shape[0] != b or \
                    te.shape[1] + ti.shape[1] * cfg.addition_time_embed_dim != cfg.projection_class_embeddings_input_dim:
                raise DistriFusionError(
                    f"added_cond_kwargs text_embeds {tuple(te.shape)} and time_ids {tuple(ti.shape)} do not fit: "
                    f"need [{b}, D] and [{b}, n] with D + n * {cfg.addition_time_embed_dim} = "
                    f"{cfg.projection_class_embeddings_input_dim}")

    # ---- abstract inputs, for shapes without data ----
    def dummy_inputs(self, batch: int = 1, height: Optional[int] = None, width: Optional[int] = None):
        """Smallest valid inputs (as ShapeDtypeStructs) for `init` / `eval_shape`."""
        cfg = self.config
        f = 2 ** cfg.num_downsamplers
        h, w = height or f, width or f
        s = jax.ShapeDtypeStruct
        args = [s((batch, h, w, cfg.in_channels), jnp.float32), s((batch,), jnp.float32),
                s((batch, 1, cfg.cross_attention_dim[0]), jnp.float32)]
        if cfg.addition_embed_type == "text_time":
            d = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim
            args.append({"text_embeds": s((batch, d), jnp.float32), "time_ids": s((batch, 1), jnp.float32)})
        else:
            args.append(None)
        return args

    def abstract_params(self):
        """The parameter tree as ShapeDtypeStructs, by abstract evaluation (no memory, about a second)."""
        return jax.eval_shape(lambda: self.init(jax.random.key(0), *self._zeros(self.dummy_inputs())))["params"]

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
