"""Results that are not images: latents or pixels gone NaN/inf, and a device out of memory, as one-line errors."""

from __future__ import annotations

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from .config import DistriConfig
from .denoise import Denoiser
from .errors import NonFiniteError, OutOfMemoryError


def check_denoised(d: Denoiser, latents: np.ndarray, sched, unet_dtype, guidance_scale: float) -> None:
    """NonFiniteError naming the first step whose latents went NaN/inf (the Denoiser records it per step)."""
    step = d.nonfinite_step()
    if step is None and np.isfinite(latents).all():
        return
    dtype = jnp.dtype(unet_dtype).name
    setting = f"{sched.name} scheduler, UNet {dtype}, guidance_scale {guidance_scale:g}"
    if step is None:  # the Denoiser did not say which step: the final latents are what we know
        where = f"during denoising ({d.num_steps} steps, {setting})"
    else:
        t = float(np.asarray(d.timesteps)[step])
        where = f"at step {step + 1} of {d.num_steps} (timestep {t:g}, {setting})"
    if jnp.dtype(unet_dtype).itemsize < 4:  # half precision overflows past 65504 (float16) or loses range
        advice = (
            f"likely cause an overflow in {dtype}; try float32 (dtype=jnp.float32 / --dtype float32), "
            "a smaller guidance_scale, or another scheduler"
        )
    else:  # float32 does not overflow on sane weights and a moderate guidance_scale
        advice = (
            "likely cause too large a guidance_scale or broken UNet weights; try a smaller guidance_scale "
            "or another scheduler, and check the unet/ checkpoint"
        )
    raise NonFiniteError(f"latents became NaN/inf {where}: {advice}")


def check_decoded(image: np.ndarray, vae_dtype) -> None:
    """NonFiniteError where the VAE turned finite latents into NaN/inf pixels (before clipping hides it)."""
    if np.isfinite(image).all():
        return
    dtype = jnp.dtype(vae_dtype).name
    if jnp.dtype(vae_dtype).itemsize < 4:  # SDXL's VAE is known to overflow in float16 (its force_upcast)
        advice = (
            "likely cause an overflow in the VAE; load it in float32: "
            "from_pretrained(..., vae_dtype=jnp.float32)"
        )
    else:
        advice = "likely cause broken VAE weights (float32 does not overflow on sane ones); check the vae/ checkpoint"
    raise NonFiniteError(f"the VAE decode ({dtype}) turned finite latents into NaN/inf pixels: {advice}")


def is_out_of_memory(error: Exception) -> bool:
    """Whether a JAX runtime error is a device allocation failure (XLA's RESOURCE_EXHAUSTED status)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def tree_bytes(tree) -> int:
    """Bytes of a pytree's arrays (what each device holds of replicated weights)."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def out_of_memory_message(
    stage: str,
    dc: DistriConfig,
    n_images: int,
    do_cfg: bool,
    devices,
    error: str,
    weights: tuple,
    options: list,
) -> str:
    """One line: what ran out (size, batch, devices), the figures known cheaply, what uses less.

    `weights`: (name, params) of the model that was running; their size is exact, the rest of a
    device's memory (activations, stale state) is not known here, so the measured table in docs/benchmarks.md is named.
    """
    gb = lambda b: f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"
    batch = f"batch {n_images}" + (" x2 for guidance" if do_cfg else "")
    facts = [f"{weights[0]} weights {gb(tree_bytes(weights[1]))}"]
    asked = re.search(r"allocat\w* (\d+) bytes", error)
    if asked:
        facts.append(f"a {gb(int(asked.group(1)))} allocation failed")
    limit = (devices[0].memory_stats() or {}).get("bytes_limit") if devices else None
    if limit:
        facts.append(f"{gb(limit)} of memory per device")
    return (
        f"out of device memory in {stage} at {dc.height}x{dc.width}, {batch}, on {len(devices)} "
        f"{devices[0].platform} device(s) ({', '.join(facts)}; measured SDXL peaks: docs/benchmarks.md 'Memory at high "
        f"resolution'): use less with {', '.join(options)}"
    )


@contextlib.contextmanager
def out_of_memory_as_error(pipe, stage: str, dc: DistriConfig, n_images: int, do_cfg: bool, devices):
    """Turn a device's RESOURCE_EXHAUSTED inside the block into one OutOfMemoryError line (size, devices,
    options that use less); any other runtime error passes through unchanged."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
            raise
        weights = ("UNet", pipe.unet_params) if stage == "denoising" else ("VAE", pipe.vae_params)
        raise OutOfMemoryError(
            out_of_memory_message(
                stage, dc, n_images, do_cfg, devices, str(e), weights, memory_options(pipe, stage, dc)
            )
        ) from None


def memory_options(pipe, stage: str, dc: DistriConfig) -> list:
    """The options that lower `stage`'s per-device memory and are not in effect already."""
    if stage == "the VAE encode":
        return [
            "more devices (the encode is row-sharded over them)",
            "vae_attention_impl='chunked' (--vae-attention chunked)",
        ]
    if stage != "denoising":
        return [
            "more devices (the decode is row-sharded over them)",
            "decode_tile_rows=64 (--decode-tile-rows 64) where it runs on one device",
            "vae_attention_impl='chunked' (--vae-attention chunked)",
        ]
    opts = ["more devices", "attention_impl='chunked' (--attention chunked)"]
    if dc.stale_kv != "hidden":
        opts.append("DistriConfig(stale_kv='hidden') (--stale-kv hidden)")
    if dc.stale_kv_dtype != "int8":
        opts.append("stale_kv_dtype='int8' (--stale-kv-dtype int8)")
    if jnp.dtype(pipe.unet.dtype).itemsize > 2:
        opts.append("dtype=jnp.bfloat16 (--dtype bfloat16)")
    return opts
