"""The UNet's weights: diffusers or converted folders -> (UNet2DConditionModel, params), and back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from .. import keymap
from ..models import UNet2DConditionModel
from ..models.unet import UNetConfig, to_diffusers_dict
from .files import DIFFUSERS_WEIGHTS, check_folder, param_shapes, read_params, resolve_dtype, to_devices


def read_unet_params(path, dtype=np.float32, variant: Optional[str] = None, progress=None):
    """(UNetConfig, flat {Flax path: numpy array in `dtype`}) from a diffusers or converted UNet folder."""
    folder = check_folder(path, "UNet")
    config = UNetConfig.from_json(folder / "config.json")
    expected = param_shapes(UNet2DConditionModel(config))
    return config, read_params(folder, expected, DIFFUSERS_WEIGHTS, dtype, variant, progress=progress)


def load_unet(
    path,
    dtype=jnp.float32,
    variant: Optional[str] = None,
    param_dtype=None,
    attention_impl: Optional[str] = "auto",
    sharding=None,
):
    """Load a UNet from a diffusers folder (`config.json` + `diffusion_pytorch_model[.fp16|.bf16].safetensors`
    or shards with an index) or from a folder written by `distrifusion-jax convert`.

    Returns `(unet, params)`: a `UNet2DConditionModel` computing in `dtype` and its parameters, cast to
    `param_dtype` (default: `dtype`), as a nested dict of jax arrays placed with `sharding` (a jax Sharding,
    e.g. replicated over a mesh: the host arrays go straight there; default: the default device).
    """
    param_dtype = dtype if param_dtype is None else param_dtype
    config, flat = read_unet_params(path, param_dtype, variant)
    unet = UNet2DConditionModel(
        config,
        dtype=resolve_dtype(dtype),
        param_dtype=resolve_dtype(param_dtype),
        attention_impl=attention_impl,
    )
    return unet, keymap.unflatten(to_devices(flat, sharding))


def save_unet_diffusers(folder, config: UNetConfig, params, dtype=np.float32) -> Path:
    """Write params as a diffusers UNet folder (torch layout and key names) that diffusers can load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dt = resolve_dtype(dtype)
    tensors = {}
    for path, value in keymap.flatten(params).items():
        key, _, perm = keymap.flax_to_torch(path, tuple(value.shape))
        array = np.asarray(value).astype(dt)
        tensors[key] = np.ascontiguousarray(array.transpose(perm) if perm else array)
    save_file(tensors, str(folder / f"{DIFFUSERS_WEIGHTS}.safetensors"))
    (folder / "config.json").write_text(json.dumps(to_diffusers_dict(config), indent=2))
    return folder
