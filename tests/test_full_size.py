"""Full-size SDXL / SD 1.5 / SD 2.1: every diffusers key and shape maps onto our abstract parameters."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

import distrifusion_jax as dj
from distrifusion_jax import keymap
from distrifusion_jax.config import to_diffusers_dict

PRESETS = {"sdxl_base": (dj.sdxl_base, 2_567_463_684), "sd15": (dj.sd15, 859_520_964),
           "sd21": (dj.sd21, 865_910_724)}


@pytest.mark.parametrize("name", list(PRESETS))
def test_full_size_keys_and_shapes(name):
    make, count = PRESETS[name]
    config = make()
    with torch.device("meta"):
        reference = TorchUNet.from_config(to_diffusers_dict(config))
    torch_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in keymap.flatten(dj.UNet2DConditionModel(config).abstract_params()).items()}
    mapped = {}
    for key, shape in torch_shapes.items():
        path, flax_shape, _ = keymap.torch_to_flax(key, shape)
        mapped[path] = flax_shape
    assert sorted(set(mapped) - set(ours)) == []  # nothing in the checkpoint we would drop
    assert sorted(set(ours) - set(mapped)) == []  # nothing we need that the checkpoint lacks
    assert {k: v for k, v in mapped.items() if ours[k] != v} == {}
    assert sum(int(np.prod(s)) for s in ours.values()) == count
    assert sum(int(np.prod(s)) for s in torch_shapes.values()) == count
    # and the inverse map gives back the diffusers key and shape of every parameter
    assert {keymap.flax_to_torch(p, s)[:2] for p, s in ours.items()} == set(torch_shapes.items())


def test_sdxl_full_size_forward_shape():
    """Abstract forward at 1024x1024 with CFG batch 2: output shape and dtype, no memory used."""
    import jax
    import jax.numpy as jnp

    unet = dj.UNet2DConditionModel(dj.sdxl_base(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), unet.abstract_params())
    s = jax.ShapeDtypeStruct
    out = jax.eval_shape(unet.apply, {"params": params}, s((2, 128, 128, 4), jnp.float32), s((2,), jnp.int32),
                         s((2, 77, 2048), jnp.bfloat16),
                         {"text_embeds": s((2, 1280), jnp.float32), "time_ids": s((2, 6), jnp.float32)})
    assert out.shape == (2, 128, 128, 4) and out.dtype == jnp.bfloat16
