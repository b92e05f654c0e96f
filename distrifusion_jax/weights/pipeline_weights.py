"""A pipeline folder's components (the text encoders its model_index.json lists) and its weights, read straight
onto the devices that use them."""

from __future__ import annotations

import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..distributed import spans_processes
from ..parallel import make_mesh
from .clip import load_text_encoder
from .unet import load_unet
from .vae import load_vae

# a text encoder folder -> its tokenizer's
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def listed(entry) -> bool:
    """A model_index.json entry naming a component: [library, class], neither null (null: not part of it)."""
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and None not in entry


def listed_encoders(index: dict, sdxl: bool = True) -> tuple:
    """The text encoders a pipeline folder uses, from its model_index.json: SDXL's base both, its refiner
    text_encoder_2 only, SD 1.x / 2.x one; an index listing none: SDXL's two (`sdxl`), else text_encoder."""
    names = tuple(n for n in TOKENIZER_OF if listed(index.get(n)))
    return names or (tuple(TOKENIZER_OF) if sdxl else ("text_encoder",))


def pipeline_components(index: dict, sdxl: bool = True) -> tuple:
    """unet, vae, scheduler and the listed text encoders with their tokenizers (`listed_encoders`)."""
    encoders = listed_encoders(index, sdxl)
    return ("unet", "vae", "scheduler", *encoders, *(TOKENIZER_OF[e] for e in encoders))


def load_pipeline_weights(
    files, distri_config, dtype, variant, vae_dtype, attention_impl, vae_attention_impl, parallel_decode: bool
) -> tuple:
    """(unet, its params, vae, its params, [text encoders], [their params]) of the checked pipeline folder
    `files` (`preflight.ModelFiles`: the text encoders it lists). In one process the UNet's and the banded
    VAE's weights go replicated onto every device of the DistriConfig (the UNet's stay unplaced for tensor
    parallelism, which splits them); several processes place theirs in the pipeline's __init__."""
    root = files.root
    devices = distri_config.resolve_devices()
    replicated = None
    if len(devices) > 1 and not spans_processes(devices):
        replicated = NamedSharding(make_mesh(devices, 1), P())
    unet_sharding = None if distri_config.parallelism == "tensor" else replicated
    unet, unet_params = load_unet(
        root / "unet", dtype=dtype, variant=variant, attention_impl=attention_impl, sharding=unet_sharding
    )
    vae_dtype = vae_dtype or (jnp.float32 if files.vae.get("force_upcast", True) else dtype)
    vae, vae_params = load_vae(
        root / "vae",
        dtype=vae_dtype,
        variant=variant,
        attention_impl=vae_attention_impl,
        sharding=replicated if parallel_decode else None,
    )
    encoders, text_params = [], []
    for name in files.encoders:
        model, params = load_text_encoder(root / name, dtype=dtype, variant=variant)
        encoders.append(model)
        text_params.append(params)
    return unet, unet_params, vae, vae_params, encoders, text_params
