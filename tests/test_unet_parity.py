"""Our Flax UNet equals diffusers' PyTorch UNet2DConditionModel given the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import distrifusion_jax as dj
from helpers import SDXL_TINY_TEXT_EMBED_DIM, SDXL_TINY_TIME_IDS, rel_l2

# name -> latent (H, W): non-square, divisible by 2^(levels - 1)
SHAPES = {"sdxl": (16, 24), "sd1": (16, 8), "sd2": (8, 24), "refiner": (16, 24)}
TOL = 1e-5  # float32 relative L2; reached: about 3e-7 to 5e-7 on these configs


def make_inputs(name, config, seed=0):
    rng = np.random.default_rng(seed)
    h, w = SHAPES[name]
    x = rng.standard_normal((2, h, w, 4)).astype(np.float32)
    t = np.array([3.0, 811.0], np.float32)  # two different timesteps in one batch
    ehs = rng.standard_normal((2, 7, config["cross_attention_dim"])).astype(np.float32)
    added = None
    if config.get("addition_embed_type") == "text_time":
        ids = 5 if name == "refiner" else SDXL_TINY_TIME_IDS  # the refiner's: size, crop, aesthetic score
        text = config["projection_class_embeddings_input_dim"] - ids * config["addition_time_embed_dim"]
        assert name == "refiner" or text == SDXL_TINY_TEXT_EMBED_DIM
        added = {
            "text_embeds": rng.standard_normal((2, text)).astype(np.float32),
            "time_ids": rng.uniform(0, 1024, (2, ids)).astype(np.float32),
        }
    return x, t, ehs, added


def torch_forward(model, x, t, ehs, added):
    with torch.no_grad():
        out = model(
            torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(t),
            torch.from_numpy(ehs),
            added_cond_kwargs=None if added is None else {k: torch.from_numpy(v) for k, v in added.items()},
        )
    return out.sample.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", ["sdxl", "sd1", "sd2", "refiner"])
def test_parity_float32(name, tiny_unet_dir):
    folder, model = tiny_unet_dir(name)
    x, t, ehs, added = make_inputs(name, model.config)
    ref = torch_forward(model, x, t, ehs, added)
    unet, params = dj.load_unet(folder)
    out = np.asarray(jax.jit(unet.apply)({"params": params}, x, t, ehs, added))
    err = rel_l2(out, ref)
    print(f"{name}: float32 relative L2 error {err:.2e}")
    assert out.shape == ref.shape
    assert err <= TOL
    # the two samples really differ (different timesteps and inputs), so a batch mix-up would show
    assert rel_l2(out[0], out[1]) > 0.1


def test_scalar_timestep_broadcasts(tiny_unet_dir):
    folder, model = tiny_unet_dir("sd1")
    x, _, ehs, _ = make_inputs("sd1", model.config)
    ref = torch_forward(model, x, np.array([421.0, 421.0], np.float32), ehs, None)
    unet, params = dj.load_unet(folder)
    out = jax.jit(unet.apply)({"params": params}, x, 421, ehs)
    assert rel_l2(out, ref) <= TOL


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_close_to_float32(dtype, tiny_unet_dir):
    """bf16 / fp16 parameters and compute stay close to the float32 reference (norms, softmax in f32)."""
    folder, model = tiny_unet_dir("sdxl")
    x, t, ehs, added = make_inputs("sdxl", model.config)
    ref = torch_forward(model, x, t, ehs, added)
    unet, params = dj.load_unet(folder, dtype=dtype)
    assert all(p.dtype == dtype for p in jax.tree.leaves(params))
    out = jax.jit(unet.apply)({"params": params}, x, t, ehs, added)
    assert out.dtype == dtype
    err = rel_l2(np.asarray(out.astype(jnp.float32)), ref)
    print(f"{jnp.dtype(dtype).name}: relative L2 error vs float32 reference {err:.2e}")
    assert err < 3e-2


def test_float32_params_bfloat16_compute(tiny_unet_dir):
    folder, model = tiny_unet_dir("sd1")
    x, t, ehs, added = make_inputs("sd1", model.config)
    unet, params = dj.load_unet(folder, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out = jax.jit(unet.apply)({"params": params}, x, t, ehs, added)
    assert out.dtype == jnp.bfloat16
    assert rel_l2(np.asarray(out.astype(jnp.float32)), torch_forward(model, x, t, ehs, added)) < 3e-2
