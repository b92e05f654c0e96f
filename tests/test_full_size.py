"""Full-size SDXL / SD 1.5 / SD 2.1: every diffusers key and shape maps onto our abstract parameters."""

import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

import distrifusion_jax as dj
from distrifusion_jax.models.unet import to_diffusers_dict
from helpers import assert_full_size_mapping

PRESETS = {
    "sdxl_base": (dj.sdxl_base, 2_567_463_684),
    "sd15": (dj.sd15, 859_520_964),
    "sd21": (dj.sd21, 865_910_724),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_full_size_keys_and_shapes(name):
    make, count = PRESETS[name]
    config = make()
    with torch.device("meta"):
        reference = TorchUNet.from_config(to_diffusers_dict(config))
    assert_full_size_mapping(reference, dj.UNet2DConditionModel(config).abstract_params(), count)


def test_sdxl_full_size_forward_shape():
    """Abstract forward at 1024x1024 with CFG batch 2: output shape and dtype, no memory used."""
    import jax
    import jax.numpy as jnp

    unet = dj.UNet2DConditionModel(dj.sdxl_base(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), unet.abstract_params())
    s = jax.ShapeDtypeStruct
    out = jax.eval_shape(
        unet.apply,
        {"params": params},
        s((2, 128, 128, 4), jnp.float32),
        s((2,), jnp.int32),
        s((2, 77, 2048), jnp.bfloat16),
        {"text_embeds": s((2, 1280), jnp.float32), "time_ids": s((2, 6), jnp.float32)},
    )
    assert out.shape == (2, 128, 128, 4) and out.dtype == jnp.bfloat16
