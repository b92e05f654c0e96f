"""CLIP text encoders' weights: transformers or converted folders -> (model, params), and conversion."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from .. import keymap
from ..config import read_json
from ..models.clip import CLIPTextConfig, text_encoder_class
from .files import check_folder, param_shapes, read_params, resolve_dtype, to_devices

TRANSFORMERS_WEIGHTS = "model"  # model.safetensors, model.fp16.safetensors, model.safetensors.index.json


def text_encoder_key_map(key: str, shape: tuple):
    """(transformers key, shape) -> (Flax path, Flax shape, permutation), or None for buffers, for `read_params`.

    transformers >= 5 saves `CLIPTextModel` without the `text_model.` prefix that older checkpoints
    (the SDXL repository's among them) and `CLIPTextModelWithProjection` carry: both load the same.
    """
    if keymap.is_ignored(key):
        return None
    if not key.startswith(("text_model.", "text_projection.")):
        key = "text_model." + key
    return keymap.torch_to_flax(key, shape)


def read_text_encoder_params(path, dtype=jnp.float32, variant: Optional[str] = None, progress=None):
    """(Flax model class, CLIPTextConfig, flat {Flax path: numpy array in `dtype`}) from a text encoder folder."""
    folder = check_folder(path, "text_encoder")
    raw = read_json(folder / "config.json")
    cls, config = text_encoder_class(raw), CLIPTextConfig.from_dict(raw)
    expected = param_shapes(cls(config))
    flat = read_params(
        folder,
        expected,
        TRANSFORMERS_WEIGHTS,
        dtype,
        variant,
        key_map=text_encoder_key_map,
        progress=progress,
        what="transformers text encoder (e.g. <pipeline>/text_encoder_2)",
    )
    return cls, config, flat


def load_text_encoder(
    path, dtype=jnp.float32, variant: Optional[str] = None, param_dtype=None, sharding=None
):
    """Load a CLIP text encoder from a transformers folder (`config.json` + `model[.fp16].safetensors` or
    shards with an index) or from a folder written by `convert_text_encoder`.

    The class follows `architectures` in config.json: `CLIPTextModel` (SDXL's text_encoder) or
    `CLIPTextModelWithProjection` (text_encoder_2). Returns `(model, params)`: the Flax model computing
    in `dtype` and its parameters, cast to `param_dtype` (default: `dtype`), as a nested dict of jax arrays
    placed with `sharding` (default: the default device).
    """
    param_dtype = dtype if param_dtype is None else param_dtype
    cls, config, flat = read_text_encoder_params(path, param_dtype, variant)
    model = cls(config, dtype=resolve_dtype(dtype), param_dtype=resolve_dtype(param_dtype))
    return model, keymap.unflatten(to_devices(flat, sharding))
