"""Config validation and input-shape checks: each bad input is one clear error naming the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distrifusion_jax as dj
from tiny import SD1_TINY, SDXL_TINY


def test_presets_match_published_configs():
    c = dj.sdxl_base()
    assert c.heads == (5, 10, 20) and c.transformer_layers_per_block == (1, 2, 10)
    assert c.cross_attention_dim == (2048,) * 3 and c.addition_embed_type == "text_time"
    assert dj.sd15().heads == (8,) * 4 and not dj.sd15().use_linear_projection
    assert dj.sd21().upcast_attention and dj.sd21().use_linear_projection


@pytest.mark.parametrize("field, value", [
    ("resnet_time_scale_shift", "scale_shift"), ("class_embed_type", "timestep"), ("conv_in_kernel", 5),
    ("time_embedding_type", "fourier"), ("only_cross_attention", True), ("act_fn", "relu"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("addition_embed_type", "text"),
    ("down_block_types", ["DownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]),
    ("downsample_padding", 0), ("attention_type", "gated"),
])
def test_unsupported_values_name_field_and_value(field, value):
    with pytest.raises(dj.ConfigError, match=f"{field}.*{value!r}" if not isinstance(value, list) else field) as e:
        dj.UNetConfig.from_dict(dict(SD1_TINY, **{field: value}))
    assert "\n" not in str(e.value)


def test_unknown_field_and_wrong_level_count():
    with pytest.raises(dj.ConfigError, match="unknown UNet config field.*my_new_field"):
        dj.UNetConfig.from_dict(dict(SD1_TINY, my_new_field=3))
    with pytest.raises(dj.ConfigError, match="attention_head_dim=.*3 entries but the model has 4 levels"):
        dj.UNetConfig.from_dict(dict(SD1_TINY, attention_head_dim=[2, 2, 2]))
    with pytest.raises(dj.ConfigError, match="not divisible by norm_num_groups"):
        dj.UNetConfig.from_dict(dict(SD1_TINY, norm_num_groups=5))


def test_defaults_and_ignored_fields():
    c = dj.UNetConfig.from_dict(dict(SD1_TINY, dropout=0.1, _diffusers_version="0.42.1", sample_size=64,
                                     num_class_embeds=None, resnet_out_scale_factor=1.0))
    assert c.layers_per_block == (1, 1, 1, 1) and c.cross_attention_dim == (12,) * 4
    # num_attention_heads, when given, is the head count (attention_head_dim is then ignored)
    c = dj.UNetConfig.from_dict(dict(SD1_TINY, num_attention_heads=4))
    assert c.heads == (4, 4, 4, 4)


@pytest.fixture(scope="module")
def sdxl_unet():
    unet = dj.UNet2DConditionModel(dj.UNetConfig.from_dict(SDXL_TINY))
    return unet, unet.abstract_params()


def _inputs(b=2, h=16, w=24, c=4, text=16, ids=3, cross=24):
    s = jax.ShapeDtypeStruct
    return [s((b, h, w, c), jnp.float32), s((b,), jnp.float32), s((b, 7, cross), jnp.float32),
            {"text_embeds": s((b, text), jnp.float32), "time_ids": s((b, ids), jnp.float32)}]


@pytest.mark.parametrize("change, message", [
    (dict(c=16, w=4), r"expected NHWC \[B, H, W, 4\] \(transpose NCHW"),
    (dict(h=18), "latent size 18x24 is not divisible by 4 .*image sizes multiples of 32"),
    (dict(cross=32), r"encoder_hidden_states has shape \(2, 7, 32\); expected \[2, S, 24\]"),
    (dict(ids=4), "text_embeds .* and time_ids .* do not fit"),
])
def test_bad_input_shapes(sdxl_unet, change, message):
    unet, params = sdxl_unet
    with pytest.raises(dj.DistriFusionError, match=message):
        jax.eval_shape(unet.apply, {"params": params}, *_inputs(**change))


def test_missing_micro_conditioning_and_bad_timesteps(sdxl_unet):
    unet, params = sdxl_unet
    x, t, ehs, added = _inputs()
    with pytest.raises(dj.DistriFusionError, match="added_cond_kwargs"):
        jax.eval_shape(unet.apply, {"params": params}, x, t, ehs, None)
    with pytest.raises(dj.DistriFusionError, match=r"timesteps has shape \(3,\)"):
        jax.eval_shape(unet.apply, {"params": params}, x, jax.ShapeDtypeStruct((3,), jnp.float32), ehs, added)
    # the valid call works and keeps the input's spatial shape
    out = jax.eval_shape(unet.apply, {"params": params}, x, np.float32(5.0), ehs, added)
    assert out.shape == (2, 16, 24, 4)
