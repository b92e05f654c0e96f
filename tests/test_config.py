"""Config validation and input-shape checks: each bad input is one clear error naming the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distrifusion_jax as dj
from helpers import SD1_TINY, SDXL_TINY


def test_presets_match_published_configs():
    c = dj.sdxl_base()
    assert c.heads == (5, 10, 20) and c.transformer_layers_per_block == (1, 2, 10)
    assert c.cross_attention_dim == (2048,) * 3 and c.addition_embed_type == "text_time"
    assert dj.sd15().heads == (8,) * 4 and not dj.sd15().use_linear_projection
    assert dj.sd21().upcast_attention and dj.sd21().use_linear_projection


@pytest.mark.parametrize(
    "field, value",
    [
        ("resnet_time_scale_shift", "scale_shift"),
        ("class_embed_type", "timestep"),
        ("conv_in_kernel", 5),
        ("time_embedding_type", "fourier"),
        ("only_cross_attention", True),
        ("act_fn", "relu"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("addition_embed_type", "text"),
        ("down_block_types", ["DownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]),
        ("downsample_padding", 0),
        ("attention_type", "gated"),
    ],
)
def test_unsupported_values_name_field_and_value(field, value):
    with pytest.raises(
        dj.ConfigError, match=f"{field}.*{value!r}" if not isinstance(value, list) else field
    ) as e:
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
    c = dj.UNetConfig.from_dict(
        dict(
            SD1_TINY,
            dropout=0.1,
            _diffusers_version="0.42.1",
            sample_size=64,
            num_class_embeds=None,
            resnet_out_scale_factor=1.0,
        )
    )
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
    return [
        s((b, h, w, c), jnp.float32),
        s((b,), jnp.float32),
        s((b, 7, cross), jnp.float32),
        {"text_embeds": s((b, text), jnp.float32), "time_ids": s((b, ids), jnp.float32)},
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(c=16, w=4), r"expected NHWC \[B, H, W, 4\] \(transpose NCHW"),
        (dict(h=18), "latent size 18x24 is not divisible by 4 .*image sizes multiples of 32"),
        (dict(cross=32), r"encoder_hidden_states has shape \(2, 7, 32\); expected \[2, S, 24\]"),
        (dict(ids=4), "text_embeds .* and time_ids .* do not fit"),
    ],
)
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


_DEVICE_FORMS = (
    "pass None (all of jax.devices()), a positive int (the first N of jax.devices()) or a non-empty list"
)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(devices="2"), f"devices='2' is not supported: {_DEVICE_FORMS}"),
        (dict(devices=[]), f"devices=[] is not supported: {_DEVICE_FORMS}"),
        (dict(devices=2.5), f"devices=2.5 is not supported: {_DEVICE_FORMS}"),
        (dict(devices=True), f"devices=True is not supported: {_DEVICE_FORMS}"),
        (dict(devices=0), f"devices=0 must be at least 1: {_DEVICE_FORMS}"),
        (dict(devices=[0, 1]), f"devices=[0, 1] is not supported: {_DEVICE_FORMS}"),
        (
            dict(height=64.0),
            "height=64.0 must be a positive multiple of 8 (the VAE's downsampling), given as an int",
        ),
        (dict(width=True), "width=True must be a positive multiple of 8"),
        (dict(warmup_steps=True), "warmup_steps=True must be an int >= 0"),
        (dict(warmup_steps=1.0), "warmup_steps=1.0 must be an int >= 0"),
    ],
)
def test_bad_distri_config_fields_are_one_line(kwargs, message):
    with pytest.raises(dj.ConfigError) as e:
        dj.DistriConfig(**kwargs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_distri_config_accepts_every_documented_form():
    d = jax.devices()
    assert dj.DistriConfig(devices=None).devices is None
    c = dj.DistriConfig(height=np.int64(64), width=64, devices=np.int32(2), warmup_steps=np.int64(1))
    assert (
        (c.height, c.devices, c.warmup_steps) == (64, 2, 1)
        and type(c.height) is int
        and type(c.devices) is int
    )
    assert dj.DistriConfig(devices=[d[1], d[0]]).resolve_devices() == (d[1], d[0])  # a list becomes a tuple
    hash(dj.DistriConfig(devices=list(d[:2])))  # hashable: it keys the compiled loops
    with pytest.raises(dj.ConfigError, match="devices lists a device more than once"):
        dj.DistriConfig(devices=[d[0], d[0]])
