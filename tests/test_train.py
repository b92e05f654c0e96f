"""Training the demo model: a few steps lower the VAE's and the UNet's loss; interrupted runs resume exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distrifusion_jax import DistriConfig
from distrifusion_jax.errors import ConfigError
from distrifusion_jax.models.presets import scheduler_preset, unet_preset, vae_preset
from distrifusion_jax.models.unet import UNet2DConditionModel
from distrifusion_jax.models.vae import AutoencoderKL
from distrifusion_jax.pipeline import DistriSDXLPipeline
from distrifusion_jax.schedulers import scheduler_from_config
from distrifusion_jax.tools import train_demo
from distrifusion_jax.tools.train_demo import TrainOptions, load_tree, save_tree, train_stage
from distrifusion_jax.tools.train_steps import (
    TIME_IDS,
    drop_captions,
    make_step,
    sample_timesteps,
    unet_loss,
    vae_loss,
)

SIZE = 64  # pixels: 8x8 latents


def run_steps(step, optimizer, params, batch_fn, n):
    opt_state, ema, losses = optimizer.init(params), params, []
    for i in range(n):
        params, opt_state, ema, loss, _ = step(params, opt_state, ema, i, *batch_fn(i))
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


def toy_stage(tmp_path, steps, every=2):
    """train_stage on a quadratic with Adam: (EMA params, losses), checkpointing into tmp_path."""
    optimizer = optax.adam(0.1)
    target = jnp.arange(4.0)
    step = make_step(lambda p, x: (jnp.sum((p["w"] - target * x) ** 2), {}), optimizer, 0.9)
    batch = lambda i: (jnp.float32(1.0 + 0.1 * i),)
    params = {"w": jnp.zeros(4)}
    return train_stage("toy", step, optimizer, params, steps, batch, tmp_path / "toy.safetensors", every)


def test_an_interrupted_stage_resumes_where_it_stopped(tmp_path):
    """3 steps, then the same command asked for 7: equal, bit for bit, to 7 steps in one go."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    straight, straight_losses = toy_stage(tmp_path / "a", 7)
    toy_stage(tmp_path / "b", 3, every=1)
    resumed, resumed_losses = toy_stage(tmp_path / "b", 7)
    np.testing.assert_array_equal(resumed["w"], straight["w"])
    assert resumed_losses == straight_losses and len(resumed_losses) == 7


def test_checkpoint_of_another_model_is_refused(tmp_path):
    save_tree(tmp_path / "c.safetensors", {"a": jnp.zeros(2)}, {"step": 1})
    with pytest.raises(ConfigError, match="a checkpoint of another model"):
        load_tree(tmp_path / "c.safetensors", {"a": jnp.zeros(2), "b": jnp.zeros(3)})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(size=100), "multiples of 8"),
        (dict(vae_crop=512), "crop <= size"),
        (dict(caption_dropout=1.0), "caption_dropout"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainOptions(out="x", **kwargs)


@pytest.mark.slow
def test_the_command_trains_resumes_and_writes_a_pipeline(tmp_path):
    """A few steps at 64x64 end to end: a pipeline folder from_pretrained loads and runs, a loss curve, and
    a second run with more UNet steps continues from the checkpoint."""
    args = [
        "--out",
        tmp_path,
        "--vae-steps",
        2,
        "--batch",
        2,
        "--vae-batch",
        2,
        "--vae-crop",
        32,
        "--size",
        64,
        "--train-images",
        4,
        "--high-noise-steps",
        1,  # the last step of each run draws the high-noise timesteps: both step programs run
    ]
    assert train_demo.main([str(a) for a in args + ["--unet-steps", 2]]) == 0
    assert train_demo.main([str(a) for a in args + ["--unet-steps", 3]]) == 0
    _, meta = load_tree(tmp_path / "checkpoints" / "unet.safetensors", None, meta_only=True)
    assert meta["step"] == 3 and len(meta["losses"]) == 3
    assert (tmp_path / "loss.png").is_file() and not (tmp_path / ".pipeline.partial").exists()
    pipe = DistriSDXLPipeline.from_pretrained(
        str(tmp_path / "pipeline"), distri_config=DistriConfig(64, 64, devices=1)
    )
    image = pipe("a red circle on the left", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_high_noise_timesteps():
    """Power 1 is the uniform draw (randint, as the first steps of the shipped run); power 2 has density rising
    linearly with t: mean 2/3 of the range, a quarter of the draws below T/2 (uniform: a half)."""
    key = jax.random.key(0)
    np.testing.assert_array_equal(sample_timesteps(key, 8, 1000), jax.random.randint(key, (8,), 0, 1000))
    t = np.asarray(sample_timesteps(key, 200_000, 1000, 2.0))
    assert t.min() >= 0 and t.max() == 999
    assert abs(t.mean() - 666.2) < 3 and abs((t < 500).mean() - 0.25) < 0.005
