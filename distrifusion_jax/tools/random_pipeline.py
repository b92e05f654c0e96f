"""A random SDXL-structured pipeline written to disk for the tests and the demo: not a trained model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .. import keymap
from ..convert import FORMAT_VERSION, PIPELINE_MODELS, vae_dtype, write_converted
from ..errors import ConfigError
from ..models.clip import CLIPTextConfig, text_encoder_class
from ..models.presets import preset_dict, unet_preset, vae_preset
from ..models.unet import UNet2DConditionModel
from ..models.vae import AutoencoderKL
from ..weights import DIFFUSERS_WEIGHTS, resolve_dtype
from ..weights.clip import TRANSFORMERS_WEIGHTS
from ..weights.converted import SDXL_TOKENIZERS, write_pipeline_files

FORMATS = ("converted", "diffusers")
WEIGHT_STEMS = {
    "unet": DIFFUSERS_WEIGHTS,
    "vae": DIFFUSERS_WEIGHTS,
    "text_encoder": TRANSFORMERS_WEIGHTS,
    "text_encoder_2": TRANSFORMERS_WEIGHTS,
}
# The pipeline files around the models (tokenizers, model_index.json, scheduler/) are SDXL's own.
SDXL = "sdxl-base-1.0"


# ---- random parameters ----
def init_from_abstract(abstract: dict, seed: int) -> dict:
    """Flat float32 {Flax path: array} drawn on the host for an abstract parameter tree, scaled as the
    models' `init_params`: kernels ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.02), biases and embedding
    tables N(0, 0.02). For models without an `init_params` (the CLIP text encoders)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, a in sorted(keymap.flatten(abstract).items()):
        leaf = path.rpartition("/")[2]
        x = rng.standard_normal(a.shape)
        if leaf == "kernel":
            x = x / np.sqrt(np.prod(a.shape[:-1]))
        else:
            x = (leaf == "scale") + 0.02 * x
        out[path] = x.astype(np.float32)
    return out


def _numpy(params) -> dict:
    return {k: np.asarray(v, np.float32) for k, v in keymap.flatten(params).items()}


def random_params_of(preset: str, component: str, seed: int = 0) -> dict:
    """Flat float32 {Flax path: array} of a bundled preset's component (unet, vae, text_encoder,
    text_encoder_2): what `write_random_pipeline(folder, preset, seed)` stores for it before any cast."""
    # a different draw for each component
    seed = seed * len(PIPELINE_MODELS) + PIPELINE_MODELS.index(component)
    if component == "unet":
        return _numpy(UNet2DConditionModel(unet_preset(preset)).init_params(seed))
    if component == "vae":
        return _numpy(AutoencoderKL(vae_preset(preset)).init_params(seed))
    raw = preset_dict(preset, component)
    return init_from_abstract(text_encoder_class(raw)(CLIPTextConfig.from_dict(raw)).abstract_params(), seed)


# ---- writing ----
def save_torch_layout(folder: Path, flat: dict, config: dict, stem: str) -> Path:
    """Write flat Flax params as `folder/{stem}.safetensors` in PyTorch layout and key names (the inverse of
    the loaders' key map), with `config` as config.json: a folder diffusers / transformers load."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, value in flat.items():
        key, _, perm = keymap.flax_to_torch(path, tuple(value.shape))
        tensors[key] = np.ascontiguousarray(value.transpose(perm) if perm else value)
    # transformers refuses safetensors files without this metadata
    save_file(tensors, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _write_model(
    folder: Path, name: str, flat: dict, config: dict, dtype: str, fmt: str, source: str
) -> None:
    if fmt == "diffusers":
        save_torch_layout(folder / name, flat, config, WEIGHT_STEMS[name])
    else:
        write_converted(folder / name, flat, config, source, dtype, progress=False)


def write_random_pipeline(
    folder, preset: str = "tiny-sdxl", seed: int = 0, dtype="float32", fmt: str = "converted"
) -> Path:
    """Write a random SDXL pipeline with a bundled preset's models to `folder` (created if needed) and
    return its path.

    Layout as a diffusers SDXL pipeline: model_index.json (StableDiffusionXLPipeline,
    force_zeros_for_empty_prompt), unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/
    (the real CLIP vocabulary) and scheduler/ (SDXL's EulerDiscreteScheduler config). `fmt="converted"`
    stores each model as `convert_pipeline` would (config.json + flax_params.safetensors, the VAE in
    float32 as it has force_upcast); `fmt="diffusers"` in diffusers / transformers layout, which
    `StableDiffusionXLPipeline.from_pretrained(folder)` loads. Weights come from
    `random_params_of(preset, name, seed)`, cast to `dtype`. No torch needed.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown fmt {fmt!r}: use one of {', '.join(repr(f) for f in FORMATS)}")
    configs = {name: preset_dict(preset, name) for name in PIPELINE_MODELS}  # all there before writing
    folder = Path(os.fspath(folder)).expanduser()
    dt = resolve_dtype(dtype).name
    dtypes = dict.fromkeys(PIPELINE_MODELS, dt)
    if fmt == "converted":
        dtypes["vae"] = vae_dtype(configs["vae"], dt)
    source = f"distrifusion_jax.tools.random_pipeline ({preset}, seed={seed})"
    for name in PIPELINE_MODELS:
        flat = {
            k: v.astype(resolve_dtype(dtypes[name])) for k, v in random_params_of(preset, name, seed).items()
        }
        _write_model(folder, name, flat, configs[name], dtypes[name], fmt, source)
    note = {"format_version": FORMAT_VERSION, "dtype": dt, "vae_dtype": dtypes["vae"], "source": source}
    write_pipeline_files(folder, SDXL, SDXL_TOKENIZERS, note if fmt == "converted" else None)
    return folder
