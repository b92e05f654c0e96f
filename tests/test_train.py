"""The demo model's training steps: a few steps on a fixed batch lower the VAE's and the UNet's loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distrifusion_jax.models.presets import scheduler_preset, unet_preset, vae_preset
from distrifusion_jax.models.unet import UNet2DConditionModel
from distrifusion_jax.models.vae import AutoencoderKL
from distrifusion_jax.schedulers import scheduler_from_config
from distrifusion_jax.tools.train_steps import TIME_IDS, drop_captions, make_step, unet_loss, vae_loss

SIZE = 64  # pixels: 8x8 latents


def run_steps(step, optimizer, params, batch_fn, n):
    opt_state, ema, losses = optimizer.init(params), params, []
    for i in range(n):
        params, opt_state, ema, loss, _ = step(params, opt_state, ema, *batch_fn(i))
        losses.append(float(loss))
    return losses


def test_vae_steps_lower_the_loss():
    vae = AutoencoderKL(vae_preset("tiny-sdxl"))
    params = vae.init_params(seed=0)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, SIZE, SIZE, 3)), jnp.float32)
    optimizer = optax.adam(1e-3)
    step = make_step(lambda p, x, k: vae_loss(vae, p, x, k, 1e-6), optimizer, 0.99)
    losses = run_steps(step, optimizer, params, lambda i: (images, jax.random.key(i)), 12)
    print(f"VAE loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.8 * losses[0]


def test_unet_steps_lower_the_loss():
    config = unet_preset("tiny-sdxl")
    unet = UNet2DConditionModel(config)
    params = unet.init_params(seed=0)
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((4, SIZE // 8, SIZE // 8, 4)), jnp.float32)
    embeds = jnp.asarray(rng.standard_normal((4, 77, config.cross_attention_dim[0])), jnp.float32)
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    pooled = jnp.asarray(rng.standard_normal((4, text_dim)), jnp.float32)
    time_ids = jnp.asarray([TIME_IDS(SIZE)] * 4, jnp.float32)
    alphas = jnp.asarray(scheduler_from_config(scheduler_preset()).alphas_cumprod(), jnp.float32)
    optimizer = optax.adam(1e-3)
    loss = lambda p, k: unet_loss(unet, p, latents, embeds, pooled, time_ids, k, alphas)
    step = make_step(loss, optimizer, 0.99)
    # the same timesteps and noise every step: the loss on this fixed batch must fall
    losses = run_steps(step, optimizer, params, lambda i: (jax.random.key(0),), 12)
    print(f"UNet loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("rate, kept", [(0.0, 8), (1.0, 0)])
def test_caption_dropout_zeroes_whole_conditions(rate, kept):
    embeds, pooled = jnp.ones((8, 77, 4)), jnp.ones((8, 3))
    e, p = drop_captions(embeds, pooled, jax.random.key(0), rate)
    assert int((e.sum(axis=(1, 2)) > 0).sum()) == kept == int((p.sum(axis=1) > 0).sum())
