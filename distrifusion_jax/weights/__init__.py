"""Checkpoint loading without torch: diffusers/transformers safetensors or our converted files -> Flax params."""

from .clip import load_text_encoder
from .files import (
    CONVERTED_WEIGHTS,
    DIFFUSERS_WEIGHTS,
    check_folder,
    check_keys,
    find_weight_files,
    read_params,
    read_safetensors,
    read_shapes,
    resolve_dtype,
)
from .lora import fuse_lora, read_lora, unfuse_lora
from .unet import load_unet, read_unet_params, save_unet_diffusers
from .vae import load_vae

__all__ = [
    "CONVERTED_WEIGHTS",
    "DIFFUSERS_WEIGHTS",
    "check_folder",
    "check_keys",
    "find_weight_files",
    "read_params",
    "read_safetensors",
    "read_shapes",
    "resolve_dtype",
    "load_unet",
    "read_unet_params",
    "save_unet_diffusers",
    "load_text_encoder",
    "load_vae",
    "read_lora",
    "fuse_lora",
    "unfuse_lora",
]
