"""The benchmark's configurations, models, weights and inputs: everything before a loop is timed."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..config import DistriConfig, read_json
from ..denoise import Denoiser
from ..distributed import devices as jax_devices
from ..errors import CheckpointError, DistriFusionError
from ..models.presets import scheduler_preset, sdxl_base, sdxl_vae_config, unet_preset, vae_preset
from ..models.unet import UNet2DConditionModel, UNetConfig
from ..models.vae import AutoencoderKL
from ..parallel import PATCH
from ..preflight import resolve_model_path
from ..schedulers import make_scheduler
from ..weights import load_unet, load_vae
from .abstract import Case, abstract_inputs
from .bench_options import BenchmarkOptions
from .timing import random_params

# --random tiny: a small UNet that compiles in seconds on a CPU (tiny-sdxl's takes twice as long), with the
# tiny pipeline's VAE
TINY_UNET, TINY_VAE = "small-sdxl", "tiny-sdxl"


@dataclasses.dataclass
class Setup:
    """What every configuration shares: models, weights (replicated on the devices), inputs, scheduler."""

    devices: tuple
    unet: Any
    params: Any
    vae: Any
    vae_params: Any
    scheduler: Any
    inputs: (
        tuple  # (latents [B, h, w, C] f32 scaled by the initial sigma, ehs [2B, 77, D], added_cond_kwargs)
    )


# ---- the configurations ----
def devices_of(o: BenchmarkOptions) -> list:
    """The devices of the parallel configurations: the first --devices of what JAX sees (default all)."""
    if isinstance(o.distri.devices, tuple):  # devices given in Python
        return list(o.distri.devices)
    available = jax_devices()
    n = o.distri.devices or len(available)
    if n > len(available):
        raise DistriFusionError(f"--devices {n} but JAX sees {len(available)} ({available[0].platform})")
    return available[:n]


def distri_configs(o: BenchmarkOptions, devices: list) -> dict:
    """name -> DistriConfig, or a string saying why the configuration is skipped."""
    patch = dataclasses.replace(o.distri, parallelism="patch")
    out = {"single": dataclasses.replace(patch, devices=tuple(devices[:1]))}
    multi = {
        # every step synchronous: warmup covering the run compiles one phase (the same computation)
        "full_sync": dict(mode="full_sync", warmup_steps=o.steps),
        "displaced": {},
        "naive_patch": dict(parallelism="naive_patch"),
        "tensor": dict(parallelism="tensor"),
    }
    for name, fields in multi.items():
        out[name] = (
            dataclasses.replace(patch, devices=tuple(devices), **fields)
            if len(devices) > 1
            else "needs at least 2 devices"
        )
    return {k: v for k, v in out.items() if k in o.configs}


def overhead_config(o: BenchmarkOptions, devices: list) -> Optional[DistriConfig]:
    """The displaced configuration whose step `overhead` times (None: not asked for, or one device)."""
    if not o.overhead or len(devices) < 2:
        return None
    return dataclasses.replace(o.distri, devices=tuple(devices), parallelism="patch")


def check_configs(configs: dict, unet_config: UNetConfig) -> None:
    """User errors (a size that does not split, an odd device count) before any weight is made."""
    for name, dc in configs.items():
        if isinstance(dc, DistriConfig) and name != "tensor":
            dc.check_model(unet_config, len(dc.resolve_devices()))


# ---- models ----
def unet_config_of(o: BenchmarkOptions) -> UNetConfig:
    """The UNet's configuration (read before any weight, so bad sizes fail fast)."""
    if o.random == "sdxl":
        return sdxl_base()
    if o.random == "tiny":
        return unet_preset(TINY_UNET)
    return UNetConfig.from_json(model_root(o.model) / "unet" / "config.json")


@functools.lru_cache(maxsize=None)
def model_root(model) -> Path:
    """The pipeline folder of --model (a hub id resolves through the local cache), with unet/ and vae/."""
    root = resolve_model_path(model)
    missing = [c for c in ("unet", "vae") if not (root / c / "config.json").is_file()]
    if missing:
        raise CheckpointError(
            f"{root}: no {' or '.join(c + '/config.json' for c in missing)}; the benchmark needs "
            "a pipeline folder with unet/ and vae/ (text encoders are not used)"
        )
    return root


def scheduler_config(o: BenchmarkOptions) -> dict:
    """The pipeline's scheduler config, or SDXL's for random weights (the chosen class replaces its own)."""
    if o.model and (model_root(o.model) / "scheduler" / "scheduler_config.json").is_file():
        return read_json(model_root(o.model) / "scheduler" / "scheduler_config.json")
    return scheduler_preset()


def load_models(o: BenchmarkOptions, config: UNetConfig, replicated, first):
    """(unet, params replicated over the devices, vae, vae params on the first device)."""
    dtype, vae_dtype = jnp.dtype(o.dtype), jnp.dtype(o.vae_dtype)
    if o.model:
        root = model_root(o.model)
        unet, params = load_unet(root / "unet", dtype=dtype)
        vae, vae_params = load_vae(root / "vae", dtype=vae_dtype)
        return unet, jax.device_put(params, replicated), vae, jax.device_put(vae_params, first)
    unet = UNet2DConditionModel(config, dtype=dtype, param_dtype=dtype)
    vae_config = sdxl_vae_config() if o.random == "sdxl" else vae_preset(TINY_VAE)
    vae = AutoencoderKL(vae_config, dtype=vae_dtype, param_dtype=vae_dtype)
    if o.random == "tiny":  # a few MB: drawn on the host faster than one small program per shape compiles
        return (
            unet,
            jax.device_put(unet.init_params(o.seed), replicated),
            vae,
            jax.device_put(vae.init_params(o.seed + 1), first),
        )
    return (
        unet,
        random_params(unet, dtype, o.seed, replicated),
        vae,
        random_params(vae, vae_dtype, o.seed + 1, first),
    )


# ---- inputs ----
def random_inputs(config: UNetConfig, o: BenchmarkOptions, sigma: float, sharding):
    """Noise latents and random prompt embeddings of the text encoders' shapes (no text encoders run)."""
    lat, ehs, added = abstract_inputs(Case(config, o.height, o.width, 1, dtype=o.dtype, batch=o.batch))
    rng = np.random.default_rng(o.seed)
    normal = lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype)
    latents, ehs = normal(lat) * sigma, normal(ehs)
    if added is not None:
        ids = added["time_ids"]
        # SDXL's six micro-conditioning ids: (original size, crop top-left, target size)
        sizes = [o.height, o.width, 0, 0, o.height, o.width]
        time_ids = jnp.asarray(
            np.tile(sizes, (ids.shape[0], 1)) if ids.shape[1] == 6 else rng.standard_normal(ids.shape),
            ids.dtype,
        )
        added = {"text_embeds": normal(added["text_embeds"]), "time_ids": time_ids}
    return jax.device_put((latents, ehs, added), sharding)


def build(o: BenchmarkOptions, config: UNetConfig, devices) -> Setup:
    """Weights and inputs on the devices, replicated once and shared by every configuration."""
    replicated = NamedSharding(Mesh(np.asarray(devices), ("devices",)), P())
    first = jax.sharding.SingleDeviceSharding(devices[0])
    unet, params, vae, vae_params = load_models(o, config, replicated, first)
    scheduler = make_scheduler(o.scheduler, scheduler_config(o))
    inputs = random_inputs(config, o, scheduler.init_noise_sigma(o.steps), replicated)
    return Setup(tuple(devices), unet, jax.block_until_ready(params), vae, vae_params, scheduler, inputs)


# ---- placement on a Denoiser's devices ----
def placed(d: Denoiser, setup: Setup):
    """(params, latents, ehs, added) placed as the Denoiser's program expects them, without copying
    the weights: they are already replicated on these devices."""
    arrays = (setup.params,) + tuple(setup.inputs)
    if len(d.devices) == 1:  # its shard of each replicated array
        return jax.tree.map(lambda a: _shard_on(a, d.devices[0]), arrays)
    if d.mesh is None:  # another layout (tensor parallelism) places them in the call, caching the weights
        return arrays
    params, lat, ehs, added = jax.device_put(arrays, NamedSharding(d.mesh, P()))
    return params, jax.device_put(lat, NamedSharding(d.mesh, P(None, PATCH))), ehs, added


def mesh_of(d: Denoiser) -> str:
    """The device layout "cfg x (patch or tensor)" of a Denoiser, "1" for one device."""
    n = len(d.devices)
    return f"{d.cfg_size}x{n // d.cfg_size}" if n > 1 else "1"


def _shard_on(a, device):
    return next(s.data for s in a.addressable_shards if s.device == device)
