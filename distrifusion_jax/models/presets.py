"""Named model configurations bundled as data: `configs/<name>/<component>/config.json`."""

from __future__ import annotations

import json
from importlib import resources

from ..errors import ConfigError
from .clip import CLIPTextConfig
from .unet import UNetConfig
from .vae import VAEConfig

# name -> what it is. The published configs are diffusers' / transformers' files as released; the
# tiny ones are ours, in the same format (diffusers and transformers build the same models from them).
PRESETS = {
    "sdxl-base-1.0": "stabilityai/stable-diffusion-xl-base-1.0 (UNet, VAE, both text encoders, scheduler)",
    "sd-1.5": "Stable Diffusion 1.5 (UNet, VAE, CLIP ViT-L/14 text encoder, PNDM scheduler)",
    "sd-2.1": "Stable Diffusion 2.1 768, v-prediction (UNet, VAE, OpenCLIP ViT-H/14 text encoder less its last "
    "layer, DDIM scheduler)",
    "sd-2.1-base": "Stable Diffusion 2.1 base: 2.1's models at 512, epsilon prediction (PNDM scheduler)",
    "tiny-sdxl": "SDXL's structure at a size that runs 20 steps at 256x256 on a CPU in seconds: three "
    "levels, text_time micro-conditioning, a four-level VAE, two small CLIP text encoders "
    "with the real vocabulary (the random test and demo pipeline)",
    "micro-sdxl": "the smallest SDXL-shaped UNet (DownBlock2D + one cross-attention level, text_time): "
    "for the many compilations of patch-parallel tests and reports",
    "small-sdxl": "two-level SDXL-shaped UNet (32/64 channels, six SDXL time ids): benchmark runs on a CPU",
    "parity-sdxl": "SDXL-like UNet for parity tests: three levels, per-level transformer depth and heads, "
    "linear projections, text_time with 16-wide text embeddings and 3 time ids",
    "parity-sd1": "SD 1.x-like UNet for parity tests: four levels, conv projections, an int head count",
    "parity-sd2": "SD 2.x-like UNet for parity tests: linear projections, upcast attention, per-level heads "
    "and layers, centred input, shifted frequencies",
    "parity-refiner": "SDXL-refiner-like UNet for parity tests: four levels (plain, two cross-attention, plain), "
    "text_time with 5 time ids (the aesthetic score), cross-attention on text_encoder_2 alone",
}


def preset_dict(name: str, component: str = "unet", filename: str = "config.json") -> dict:
    """A bundled config file as a dict; ConfigError naming the presets that exist."""
    path = resources.files(__package__.rpartition(".")[0]).joinpath("configs", name, component, filename)
    if name not in PRESETS or not path.is_file():
        known = ", ".join(n for n in PRESETS)
        raise ConfigError(f"no bundled {component} config named {name!r}: presets are {known}")
    return json.loads(path.read_text())


def scheduler_preset(name: str = "sdxl-base-1.0") -> dict:
    """A bundled scheduler_config.json (a scheduler of another class reads the fields it knows)."""
    return preset_dict(name, "scheduler", "scheduler_config.json")


def unet_preset(name: str) -> UNetConfig:
    return UNetConfig.from_dict(preset_dict(name, "unet"))


def vae_preset(name: str) -> VAEConfig:
    return VAEConfig.from_dict(preset_dict(name, "vae"))


def text_encoder_preset(name: str, component: str = "text_encoder") -> CLIPTextConfig:
    return CLIPTextConfig.from_dict(preset_dict(name, component))


def sdxl_base() -> UNetConfig:
    """stabilityai/stable-diffusion-xl-base-1.0 UNet (2,567,463,684 parameters)."""
    return unet_preset("sdxl-base-1.0")


def sd15() -> UNetConfig:
    """Stable Diffusion 1.5 UNet (859,520,964 parameters)."""
    return unet_preset("sd-1.5")


def sd21() -> UNetConfig:
    """Stable Diffusion 2.1 (768-v) UNet (865,910,724 parameters)."""
    return unet_preset("sd-2.1")


def sdxl_vae_config() -> VAEConfig:
    """stabilityai/stable-diffusion-xl-base-1.0 VAE (83,653,863 parameters, scaling_factor 0.13025)."""
    return vae_preset("sdxl-base-1.0")


__all__ = [
    "PRESETS",
    "preset_dict",
    "unet_preset",
    "vae_preset",
    "text_encoder_preset",
    "scheduler_preset",
    "sdxl_base",
    "sd15",
    "sd21",
    "sdxl_vae_config",
]
