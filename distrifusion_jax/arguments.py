"""Checks of a pipeline call's arguments: cheap, one line each, all done before any text encoding or compiling."""

from __future__ import annotations

import math
from typing import Optional

import jax
import numpy as np
from PIL import Image

from .config import DistriConfig
from .errors import ConfigError, NonFiniteError
from .prompts import as_list, short_repr

SEED_LIMIT = 2**63  # seeds are the two 32-bit halves of a threefry key (as JAX builds it with 64-bit ints)


def check_output_type(output_type) -> None:
    """One of the three result kinds."""
    if output_type not in ("pil", "np", "latent"):
        raise ConfigError(f"unknown output_type {short_repr(output_type)}: use 'pil', 'np' or 'latent'")


def check_prompts(prompt, prompt_2, negative_prompt, negative_prompt_2, embeds_batch=None) -> int:
    """The batch size (number of prompts, or of prompt_embeds rows: `embeds_batch`); the other prompt arguments,
    when given, must fit it."""
    if prompt is None and embeds_batch is None:
        raise ConfigError(
            "prompt=None is not supported: pass a str or a non-empty list of str, or prompt_embeds "
            "(with pooled_prompt_embeds for SDXL)"
        )
    batch = len(as_list(prompt)) if embeds_batch is None else embeds_batch
    for name, value in (
        ("prompt_2", prompt_2),
        ("negative_prompt", negative_prompt),
        ("negative_prompt_2", negative_prompt_2),
    ):
        if value is not None:
            as_list(value, batch, name)
    return batch


def int_arg(name: str, value, low: int, high: Optional[int] = None, high_text: Optional[str] = None) -> int:
    """An integer argument (numpy's included; bool refused: True would pass for 1) in [low, high)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok and low <= value and (high is None or value < high):
        return int(value)
    bounds = f">= {low}" if high is None else f"in [{low}, {high_text or high})"
    raise ConfigError(f"{name}={short_repr(value)} is not supported: pass an int {bounds}")


def float_arg(name: str, value, low: Optional[float] = None, high: Optional[float] = None) -> float:
    """A finite real-number argument in [low, high], as a Python float.

    inf or NaN would not fail on its own: an infinite guidance_scale gives NaN latents (a black image)
    and a NaN one compares False with 1.0, silently turning guidance off.
    """
    arr = np.asarray(value) if not isinstance(value, (str, bytes)) else None
    if arr is None or arr.ndim != 0 or arr.dtype.kind not in "iuf":
        raise ConfigError(f"{name}={short_repr(value)} is not supported: pass a number")
    v = float(arr)
    in_range = math.isfinite(v) and (low is None or v >= low) and (high is None or v <= high)
    if not in_range:
        what = (
            f"a number in [{low:g}, {high:g}]" if low is not None and high is not None else "a finite number"
        )
        hint = {
            "guidance_scale": " (e.g. 5.0; 1.0 or less turns guidance off)",
            "guidance_rescale": " (0 turns rescaling off; diffusers suggests 0.7)",
        }.get(name, "")
        raise ConfigError(f"{name}={short_repr(value)} is not supported: pass {what}{hint}")
    return v


# the micro-conditioning arguments each model kind takes
MICRO_CONDITIONING = {
    "sdxl": ("original_size", "crops_coords_top_left", "target_size"),
    "refiner": ("original_size", "crops_coords_top_left", "aesthetic_score", "negative_aesthetic_score"),
    "sd": (),
}


def micro_conditioning(
    dc: DistriConfig,
    original_size,
    crops_coords_top_left,
    target_size,
    kind: str = "sdxl",
    score=None,
    negative_score=None,
):
    """(negative, positive) time ids of a model `kind`: "sdxl", SDXL's six (original size, crop's top-left corner,
    target size; sizes default to the image's); "refiner", the refiner's five (original size, crop corner, the
    aesthetic `score`, default 6, and `negative_score`, default 2.5, for the negative rows, as diffusers); "sd",
    None (SD 1.x / 2.x take none). An argument the model does not take is one ConfigError line."""
    takes = MICRO_CONDITIONING[kind]
    given = {
        "original_size": original_size is not None,
        "crops_coords_top_left": not _is_origin(crops_coords_top_left),
        "target_size": target_size is not None,
        "aesthetic_score": score is not None,
        "negative_aesthetic_score": negative_score is not None,
    }
    extra = [name for name, was in given.items() if was and name not in takes]
    if extra:
        what = {"sdxl": "SDXL's base", "refiner": "SDXL's refiner", "sd": "this SD 1.x / 2.x model"}[kind]
        raise ConfigError(
            f"{extra[0]}: {what} takes no such conditioning ({', '.join(takes) or 'no micro-conditioning'}); "
            "leave it out"
        )
    if kind == "sd":
        return None
    image = (dc.height, dc.width)
    ids = pair_arg("original_size", original_size, image, "(height, width)") + pair_arg(
        "crops_coords_top_left", crops_coords_top_left, None, "(top, left)"
    )
    if kind == "refiner":
        pos = float_arg("aesthetic_score", 6.0 if score is None else score)
        neg = float_arg("negative_aesthetic_score", 2.5 if negative_score is None else negative_score)
        return ids + [neg], ids + [pos]
    ids = ids + pair_arg("target_size", target_size, image, "(height, width)")
    return ids, ids


def _is_origin(value) -> bool:
    try:
        return [float(v) for v in value] == [0.0, 0.0]
    except (TypeError, ValueError):
        return False


def pair_arg(name: str, value, default, what: str) -> list:
    """A pair of finite numbers as a list of floats (`default` where value is None and one exists)."""
    if value is None and default is not None:
        return [float(v) for v in default]
    try:
        pair = [float_arg(name, v) for v in value] if not isinstance(value, (str, bytes, dict)) else []
    except (TypeError, ConfigError):
        pair = []
    if len(pair) != 2:
        raise ConfigError(
            f"{name}={short_repr(value)} is not supported: pass a pair of finite numbers {what}, e.g. "
            f"{tuple(default) if default else (0, 0)}"
        )
    return pair


def check_latents(latents, shape: tuple, dc: DistriConfig, name: str = "latents") -> Optional[np.ndarray]:
    """Given latents (or another noise argument, `name`) as float32 numpy in diffusers' layout `shape`
    (B, 4, h, w), finite; None stays None."""
    if latents is None:
        return None
    try:
        arr = np.asarray(latents, np.float32)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name} of type {type(latents).__name__} are not supported: pass a float array of shape {shape}"
        ) from None
    if arr.shape != shape:
        nhwc = (shape[0], shape[2], shape[3], shape[1])
        hint = (
            f" (these look NHWC: pass diffusers' layout (B, 4, H/8, W/8), e.g. {name}.transpose(0, 3, 1, 2))"
            if arr.shape == nhwc
            else ""
        )
        raise ConfigError(
            f"{name} have shape {arr.shape}; expected {shape} for {shape[0]} image(s) of "
            f"{dc.height}x{dc.width}{hint}"
        )
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise NonFiniteError(
            f"{name} hold {bad} NaN/inf value(s) of {arr.size}: pass finite noise (unit "
            f"Gaussian, as diffusers' latents) or {name}=None to draw it from seed"
        )
    return arr


def prng_key(seed: int):
    """jax.random.key(seed) for any seed in [0, 2**63): the same key below 2**32, distinct keys above.

    Without jax_enable_x64, JAX maps every seed past 32 bits onto a 32-bit one (2**32 gives seed 0's
    image); threefry's key is the seed's two 32-bit halves, which is what JAX builds with x64 on.
    """
    if seed < 2**32:
        return jax.random.key(seed)
    halves = np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
    return jax.random.wrap_key_data(halves, impl="threefry2x32")


def check_strength(strength, num_inference_steps: int) -> int:
    """img2img: the first step to run of `num_inference_steps` (diffusers' `get_timesteps`: the last
    min(int(steps * strength), steps) steps run), for a strength in (0, 1] that runs at least one step."""
    value = float_arg("strength", strength)
    if not 0.0 < value <= 1.0:
        raise ConfigError(
            f"strength={short_repr(strength)} is not supported: pass a number in (0, 1] (the fraction of the "
            "steps run on the noised image; 1 ignores the image's content)"
        )
    run = min(int(num_inference_steps * value), num_inference_steps)
    if run == 0:
        raise ConfigError(
            f"strength={value:g} with num_inference_steps={num_inference_steps} runs no step "
            f"(int({num_inference_steps} * {value:g}) = 0): raise strength or num_inference_steps"
        )
    return num_inference_steps - run


def check_image(image, n_images: int, dc: DistriConfig) -> np.ndarray:
    """img2img's input as float32 [b, H, W, 3] in [-1, 1] (diffusers' preprocessing), from a PIL image, a list
    of them, or an array [H, W, 3] / [b, H, W, 3] of uint8 or floats in [0, 1]; b divides the number of
    images (each repeated n_images / b times, as diffusers does). Never resized: H x W must be the
    DistriConfig's size."""
    want = f"{dc.width}x{dc.height} (width x height) RGB"
    items = image if isinstance(image, (list, tuple)) and image else [image]
    if all(isinstance(im, Image.Image) for im in items):
        arr = np.stack([np.asarray(im.convert("RGB")) for im in items])
    else:
        try:
            arr = np.asarray(image)
        except (TypeError, ValueError):
            arr = np.asarray(None)
        if arr.dtype.kind not in "uif" or arr.ndim not in (3, 4) or arr.shape[-1] != 3:
            raise ConfigError(
                f"image={short_repr(image)} is not supported: pass a PIL image (or a list of them) or an "
                f"array [H, W, 3] / [B, H, W, 3] of uint8 or floats in [0, 1], {want}"
            )
        arr = arr if arr.ndim == 4 else arr[None]
    b, h, w = arr.shape[:3]
    if (h, w) != (dc.height, dc.width):
        raise ConfigError(
            f"image is {w}x{h} (width x height) but the DistriConfig is for {dc.width}x{dc.height}: resize "
            "the image, or make a DistriConfig of its size"
        )
    if n_images % b:
        raise ConfigError(
            f"{b} images for {n_images} generated image(s): pass one image, or one per generated image "
            "(or a number of images that divides it)"
        )
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / np.float32(255)
    elif arr.dtype.kind in "ui":
        raise ConfigError(f"image of dtype {arr.dtype} is not supported: pass uint8, or floats in [0, 1]")
    else:
        arr = arr.astype(np.float32)
        if not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise ConfigError(
                f"image values span [{np.nanmin(arr):g}, {np.nanmax(arr):g}]: float images must be finite "
                "and in [0, 1] (or pass uint8)"
            )
    return 2.0 * arr - 1.0


def check_image_or_latents(image, n_images: int, dc: DistriConfig) -> tuple:
    """(pixels [b, H, W, 3] in [-1, 1], None) for an image (`check_image`), or (None, latents (b, 4, H/8, W/8)
    float32) for an array shaped like latents at the DistriConfig's size (another pipeline's output_type="latent",
    e.g. SDXL's base before its refiner); b divides the number of images."""
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) == 4 and shape[1] == 4 and shape[-1] != 3:
        latents = check_latents(
            image, (shape[0], 4, dc.latent_height, dc.latent_width), dc, "image (latents)"
        )
        if n_images % len(latents):
            raise ConfigError(
                f"{len(latents)} latents for {n_images} generated image(s): pass one per generated image "
                "(or a number that divides it)"
            )
        return None, latents
    return check_image(image, n_images, dc), None


def _cutoff(sched, fraction, name: str) -> int:
    """diffusers' discrete cutoff round(T - fraction * T) for a fraction in (0, 1) of the denoising."""
    value = float_arg(name, fraction)
    if not 0.0 < value < 1.0:
        raise ConfigError(
            f"{name}={short_repr(fraction)} is not supported: pass a fraction in (0, 1) of the denoising (e.g. "
            "0.8: the base runs the first 80%, the refiner the rest)"
        )
    return int(round(sched.num_train_timesteps - value * sched.num_train_timesteps))


def denoising_stop(sched, steps: int, end, name: str = "denoising_end") -> int:
    """The step the base stops before for diffusers' `denoising_end` (the schedule's timesteps at or above the
    cutoff run); `steps` for None."""
    if end is None:
        return steps
    stop = int((np.asarray(sched.timesteps(steps)) >= _cutoff(sched, end, name)).sum())
    if stop == 0:
        raise ConfigError(f"{name}={end:g} with {steps} steps runs no step: raise it or the steps")
    return stop


def denoising_first(sched, steps: int, start, name: str = "denoising_start") -> int:
    """The first step the refiner runs for diffusers' `denoising_start` (the timesteps below the cutoff)."""
    run = int((np.asarray(sched.timesteps(steps)) < _cutoff(sched, start, name)).sum())
    if run == 0:
        raise ConfigError(
            f"{name}={start:g} with {steps} steps leaves no step to run: lower it or raise the steps"
        )
    return steps - run
