"""Flax models: composition of the leaf layers in `distrifusion_jax.nn`, no collectives."""

from .unet import UNet2DConditionModel

__all__ = ["UNet2DConditionModel"]
