"""A small random SDXL-shaped pipeline written to disk, in our converted format or diffusers', without torch."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from . import keymap
from .convert import NOTE_KEY, FORMAT_VERSION, PIPELINE_MODELS, vae_dtype, write_converted
from .errors import ConfigError
from .models.unet import UNet2DConditionModel, UNetConfig
from .models.clip import CLIPTextConfig, text_encoder_class
from .models.vae import AutoencoderKL, VAEConfig
from .weights import DIFFUSERS_WEIGHTS, resolve_dtype
from .weights.clip import TRANSFORMERS_WEIGHTS

FORMATS = ("converted", "diffusers")
TEXT_HIDDEN = (32, 32)  # hidden sizes of text_encoder and text_encoder_2: the UNet's context is both, concatenated
PROJECTION_DIM = 32  # text_encoder_2's pooled projection: the UNet's text_embeds
TIME_EMBED_DIM = 8  # per micro-conditioning id; SDXL has 6 ids (original size, crop, target size)

# SDXL's UNet structure (DownBlock2D then two cross-attention levels, linear projections, a deeper
# transformer at the lowest level, text_time conditioning) at a size that runs 20 steps at 256x256
# (32x32 latents, the default sample_size) on a CPU in seconds.
UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED_DIM,
    "attention_head_dim": [2, 4, 4],  # head counts, in diffusers' naming
    "block_out_channels": [32, 64, 64],
    "center_input_sample": False,
    "cross_attention_dim": sum(TEXT_HIDDEN),
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 16,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": PROJECTION_DIM + 6 * TIME_EMBED_DIM,
    "sample_size": 32,
    "transformer_layers_per_block": [1, 1, 2],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

# Four levels, as the pipeline assumes a downsampling factor of 8; SDXL's latent scale and upcast flag.
VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [16, 16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "out_channels": 3,
    "sample_size": 256,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# The real vocabulary (the bundled tokenizer's ids must index the embedding) and 77 positions;
# eos_token_id 2 as in SDXL's configs (pooling at the largest id, i.e. <|endoftext|>).
_TEXT_COMMON = {"model_type": "clip_text_model", "vocab_size": 49408, "max_position_embeddings": 77,
                "num_hidden_layers": 2, "num_attention_heads": 2, "layer_norm_eps": 1e-05,
                "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
TEXT_ENCODER = dict(_TEXT_COMMON, architectures=["CLIPTextModel"], hidden_act="quick_gelu",
                    hidden_size=TEXT_HIDDEN[0], intermediate_size=4 * TEXT_HIDDEN[0], projection_dim=TEXT_HIDDEN[0])
TEXT_ENCODER_2 = dict(_TEXT_COMMON, architectures=["CLIPTextModelWithProjection"], hidden_act="gelu",
                      hidden_size=TEXT_HIDDEN[1], intermediate_size=4 * TEXT_HIDDEN[1], projection_dim=PROJECTION_DIM)

CONFIGS = {"unet": UNET, "vae": VAE, "text_encoder": TEXT_ENCODER, "text_encoder_2": TEXT_ENCODER_2}
WEIGHT_STEMS = {"unet": DIFFUSERS_WEIGHTS, "vae": DIFFUSERS_WEIGHTS, "text_encoder": TRANSFORMERS_WEIGHTS,
                "text_encoder_2": TRANSFORMERS_WEIGHTS}


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


def tiny_params(name: str, seed: int = 0) -> dict:
    """Flat float32 {Flax path: array} of the tiny pipeline's component `name` (unet, vae, text_encoder,
    text_encoder_2): what `write_tiny_pipeline(folder, seed)` stores for it before any cast."""
    seed = seed * len(PIPELINE_MODELS) + PIPELINE_MODELS.index(name)  # a different draw for each component
    if name == "unet":
        return _numpy(UNet2DConditionModel(UNetConfig.from_dict(UNET)).init_params(seed))
    if name == "vae":
        return _numpy(AutoencoderKL(VAEConfig.from_dict(VAE)).init_params(seed))
    raw = CONFIGS[name]
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


def _package_file(*parts: str):
    return resources.files(__package__).joinpath(*parts)


def write_tokenizers(folder: Path) -> None:
    """tokenizer/ and tokenizer_2/ from the bundled CLIP vocabulary; tokenizer_2 pads with "!" (id 0), as SDXL's."""
    assets = _package_file("assets", "clip-tokenizer")
    base = json.loads(assets.joinpath("tokenizer_config.json").read_text())
    for name, pad in (("tokenizer", base["pad_token"]), ("tokenizer_2", "!")):
        out = folder / name
        out.mkdir(parents=True, exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            (out / f).write_bytes(assets.joinpath(f).read_bytes())
        (out / "tokenizer_config.json").write_text(json.dumps(dict(base, pad_token=pad), indent=2))
        special = {k: base[k] for k in ("bos_token", "eos_token", "unk_token")}
        (out / "special_tokens_map.json").write_text(json.dumps(dict(special, pad_token=pad), indent=2))


def _write_model(folder: Path, name: str, flat: dict, dtype: str, fmt: str, seed: int) -> None:
    if fmt == "diffusers":
        save_torch_layout(folder / name, flat, CONFIGS[name], WEIGHT_STEMS[name])
    else:
        write_converted(folder / name, flat, CONFIGS[name], f"distrifusion_jax.tiny (seed={seed})", dtype,
                        progress=False)


def write_tiny_pipeline(folder, seed: int = 0, dtype="float32", fmt: str = "converted") -> Path:
    """Write a small random SDXL pipeline to `folder` (created if needed) and return its path.

    Layout as a diffusers SDXL pipeline: model_index.json (StableDiffusionXLPipeline,
    force_zeros_for_empty_prompt), unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/
    (the real CLIP vocabulary) and scheduler/ (SDXL's EulerDiscreteScheduler config). `fmt="converted"`
    stores each model as `convert_pipeline` would (config.json + flax_params.safetensors, the VAE in
    float32 as it has force_upcast); `fmt="diffusers"` in diffusers / transformers layout, which
    `StableDiffusionXLPipeline.from_pretrained(folder)` loads. Weights come from `tiny_params(name, seed)`,
    cast to `dtype`. No torch needed.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown fmt {fmt!r}: use one of {', '.join(repr(f) for f in FORMATS)}")
    folder = Path(os.fspath(folder)).expanduser()
    dt = resolve_dtype(dtype).name
    dtypes = {name: dt for name in PIPELINE_MODELS}
    if fmt == "converted":
        dtypes["vae"] = vae_dtype(VAE, dt)
    for name in PIPELINE_MODELS:
        flat = {k: v.astype(resolve_dtype(dtypes[name])) for k, v in tiny_params(name, seed).items()}
        _write_model(folder, name, flat, dtypes[name], fmt, seed)
    write_tokenizers(folder)
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = _package_file("configs", "sdxl-base-1.0", "scheduler", "scheduler_config.json").read_text()
    (folder / "scheduler" / "scheduler_config.json").write_text(scheduler)
    index = json.loads(_package_file("configs", "sdxl-base-1.0", "model_index.json").read_text())
    if fmt == "converted":
        index[NOTE_KEY] = {"format_version": FORMAT_VERSION, "dtype": dt, "vae_dtype": dtypes["vae"],
                           "source": f"distrifusion_jax.tiny (seed={seed})"}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
