"""The VAE's weights: diffusers or converted AutoencoderKL folders -> (AutoencoderKL, params), and conversion."""

from __future__ import annotations

import re
from typing import Optional

import jax.numpy as jnp

from .. import keymap
from ..models.vae import AutoencoderKL, VAEConfig
from .files import DIFFUSERS_WEIGHTS, check_folder, param_shapes, read_params, resolve_dtype, to_devices

# Checkpoints saved before diffusers renamed its VAE attention (and single-file conversions of the
# original LDM weights) name the projections differently, sometimes storing them as 1x1 convs.
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_KEY = re.compile(
    r"^(?P<block>(?:encoder|decoder)\.mid_block\.attentions\.\d+)\."
    r"(?P<name>query|key|value|proj_attn|to_q|to_k|to_v|to_out\.0)\.(?P<leaf>weight|bias)$"
)


def vae_key_map(key: str, shape: tuple):
    """`keymap.torch_to_flax`, after renaming old-format attention keys (query, key, value, proj_attn)
    and reading attention weights stored as 1x1 convs ([out, in, 1(, 1)]) as linear ones.

    For such a weight the permutation puts the unit axes first ([1(, 1), in, out]); the loader then
    reshapes it to the [in, out] the returned shape announces.
    """
    m = _ATTENTION_KEY.match(key)
    if not m:
        return keymap.torch_to_flax(key, shape)
    key = f"{m['block']}.{OLD_ATTENTION_NAMES.get(m['name'], m['name'])}.{m['leaf']}"
    if m["leaf"] == "weight" and len(shape) in (3, 4) and all(s == 1 for s in shape[2:]):
        path, flax_shape, _ = keymap.torch_to_flax(key, tuple(shape[:2]))
        return path, flax_shape, tuple(range(2, len(shape))) + (1, 0)
    return keymap.torch_to_flax(key, shape)


def read_vae_params(path, dtype=jnp.float32, variant: Optional[str] = None, progress=None):
    """(VAEConfig, flat {Flax path: numpy array in `dtype`}) from a diffusers or converted VAE folder."""
    folder = check_folder(path, "VAE")
    config = VAEConfig.from_json(folder / "config.json")
    expected = param_shapes(AutoencoderKL(config))
    flat = read_params(
        folder, expected, DIFFUSERS_WEIGHTS, dtype, variant, key_map=vae_key_map, progress=progress
    )
    # 1x1-conv attention weights arrive as [1(, 1), in, out]: drop the unit axes (see vae_key_map)
    return config, {k: (v.reshape(expected[k]) if v.shape != expected[k] else v) for k, v in flat.items()}


def load_vae(
    path,
    dtype=jnp.float32,
    variant: Optional[str] = None,
    param_dtype=None,
    attention_impl: Optional[str] = "auto",
    sharding=None,
):
    """Load an AutoencoderKL from a diffusers VAE folder (`config.json` +
    `diffusion_pytorch_model[.fp16|.bf16].safetensors` or shards with an index) or from a folder written
    by `convert_vae`.

    Returns `(vae, params)`: an `AutoencoderKL` computing in `dtype` and its parameters, cast to
    `param_dtype` (default: `dtype`), as a nested dict of jax arrays placed with `sharding` (default: the
    default device). The default is float32 because
    SDXL's VAE (`force_upcast: true`) overflows in float16 and diffusers decodes it in float32;
    bfloat16 (float32's range) is the faster option. `vae.scaling_factor` is the latent scale.
    """
    param_dtype = dtype if param_dtype is None else param_dtype
    config, flat = read_vae_params(path, param_dtype, variant)
    vae = AutoencoderKL(
        config,
        dtype=resolve_dtype(dtype),
        param_dtype=resolve_dtype(param_dtype),
        attention_impl=attention_impl,
    )
    return vae, keymap.unflatten(to_devices(flat, sharding))
