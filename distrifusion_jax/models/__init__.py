"""Flax models: composition of the leaf layers in `distrifusion_jax.nn`, no collectives."""

from .presets import sd15, sd21, sdxl_base
from .unet import UNet2DConditionModel, UNetConfig

__all__ = ["UNet2DConditionModel", "UNetConfig", "sdxl_base", "sd15", "sd21"]
