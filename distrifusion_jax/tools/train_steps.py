"""The demo model's training steps: the VAE (reconstruction + KL) and the UNet (epsilon prediction), jitted.

Both are pure functions of (params, optimizer state, batch, key), so a training loop only feeds
batches and keeps the state; nothing here reads files or prints.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

# SDXL's micro-conditioning for a square image of `size` pixels, uncropped: (original, crop, target)
TIME_IDS = lambda size: (size, size, 0, 0, size, size)


def vae_loss(vae, params, images, key, kl_weight: float):
    """Mean squared reconstruction error of a posterior sample + kl_weight * KL(posterior || N(0, 1)).

    images: [B, H, W, 3] in [-1, 1]. Returns (loss, (mse, kl)).
    """
    mean, logvar = vae.apply({"params": params}, images, method=vae.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    recon = vae.apply({"params": params}, z, method=vae.decode)
    mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - images))
    kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
    return mse + kl_weight * kl, (mse, kl)


def sample_timesteps(key, n: int, n_t: int, power: float = 1.0):
    """n training timesteps in [0, n_t): uniform for power 1, else floor(n_t u^(1/power)) (density ~ t^(power-1))."""
    if power == 1.0:
        return jax.random.randint(key, (n,), 0, n_t)
    u = jax.random.uniform(key, (n,))
    return jnp.minimum((n_t * u ** (1.0 / power)).astype(jnp.int32), n_t - 1)


def unet_loss(
    unet,
    params,
    latents,
    embeds,
    pooled,
    time_ids,
    key,
    alphas_cumprod,
    snr_gamma=None,
    offset_noise=0.0,
    t_power: float = 1.0,
):
    """Epsilon-prediction loss at uniformly drawn training timesteps (DDPM's simple loss), each sample
    weighted by min(SNR, gamma) / SNR with `snr_gamma` (Min-SNR, Hang et al. 2023: the nearly clean
    timesteps, which only polish detail, stop dominating the gradient, so layout and colour, decided at
    high noise, are learnt sooner); None weighs every timestep alike. `t_power` p > 1 draws the timesteps
    with density proportional to t^(p - 1) (t = floor(T u^(1/p)), u uniform): more of the high-noise steps
    where a sample's layout and colours are decided (p = 2: density rising linearly to t = T).

    latents [B, h, w, 4] already scaled by the VAE's scaling_factor; embeds [B, 77, D]; pooled [B, P].
    Returns (loss, {}).
    """
    k_t, k_noise, k_offset = jax.random.split(key, 3)
    t = sample_timesteps(k_t, latents.shape[0], alphas_cumprod.shape[0], t_power)
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    if offset_noise:
        b, _, _, c = latents.shape
        noise = noise + offset_noise * jax.random.normal(k_offset, (b, 1, 1, c), jnp.float32)
    a = alphas_cumprod[t][:, None, None, None]
    noisy = jnp.sqrt(a) * latents + jnp.sqrt(1.0 - a) * noise
    added = {"text_embeds": pooled, "time_ids": time_ids}
    pred = unet.apply({"params": params}, noisy, t, embeds, added)
    per_sample = jnp.mean(jnp.square(pred.astype(jnp.float32) - noise), axis=(1, 2, 3))
    if snr_gamma is not None:
        snr = alphas_cumprod[t] / (1.0 - alphas_cumprod[t])
        per_sample = per_sample * jnp.minimum(snr, snr_gamma) / snr
    return jnp.mean(per_sample), {}


def ema_update(ema, params, decay: float, step):
    """EMA with the usual warm-up, decay min(decay, (1 + step) / (10 + step)): early averages do not
    keep the random initialisation (0.999 ** 600 would still weigh it 55% after a 600-step stage)."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation, ema_decay: float):
    """A jitted step(params, opt_state, ema, i, *batch) -> (params, opt_state, ema, loss, aux) for
    loss_fn(params, *batch) returning (loss, aux); `i` is the step's index (for the EMA's warm-up)."""

    @jax.jit
    def step(params, opt_state, ema, i, *batch):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, ema_update(ema, params, ema_decay, jnp.float32(i)), loss, aux

    return step


def drop_captions(embeds, pooled, key, rate: float):
    """Replace a `rate` share of the conditions by zeros: the unconditional branch the pipeline uses
    (`force_zeros_for_empty_prompt`), so classifier-free guidance works."""
    keep = jax.random.uniform(key, (embeds.shape[0],)) >= rate
    return embeds * keep[:, None, None], pooled * keep[:, None]


def images_to_unit(images: np.ndarray) -> jnp.ndarray:
    """uint8 [B, H, W, 3] -> float32 in [-1, 1] (the VAE's input range)."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0
