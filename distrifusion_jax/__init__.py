"""distrifusion-jax: DistriFusion (displaced patch parallelism) for Stable Diffusion XL in JAX/Flax."""

from .config import DistriConfig
from .convert import convert_pipeline, convert_text_encoder, convert_unet, convert_vae
from .denoise import Denoiser, make_denoise_fn
from .errors import CheckpointError, ConfigError, DistriFusionError, NonFiniteError, OutOfMemoryError
from .models import UNet2DConditionModel, UNetConfig, sd15, sd21, sdxl_base
from .pipeline import DistriPipeline, DistriSDPipeline, DistriSDXLPipeline
from .schedulers import make_scheduler, scheduler_from_config
from .weights import load_text_encoder, load_unet, load_vae, save_unet_diffusers

__all__ = [
    "DistriConfig",
    "UNetConfig",
    "sdxl_base",
    "sd15",
    "sd21",
    "DistriFusionError",
    "ConfigError",
    "CheckpointError",
    "NonFiniteError",
    "OutOfMemoryError",
    "UNet2DConditionModel",
    "load_unet",
    "save_unet_diffusers",
    "convert_unet",
    "convert_pipeline",
    "load_text_encoder",
    "convert_text_encoder",
    "load_vae",
    "convert_vae",
    "Denoiser",
    "make_denoise_fn",
    "DistriSDXLPipeline",
    "DistriSDPipeline",
    "DistriPipeline",
    "make_scheduler",
    "scheduler_from_config",
]
