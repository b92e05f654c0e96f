"""Tiny model configurations and reference-model helpers shared by the tests."""

from __future__ import annotations

import numpy as np

# XLA:CPU flags for the tests: cheaper LLVM optimisation compiles the many small programs about a fifth
# sooner (the tests check results to tolerances, not the speed of XLA's code). conftest.py sets them.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# SDXL-like: text_time micro-conditioning, three levels, a different transformer depth per level,
# linear projections, per-level head counts.
SDXL_TINY = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "attention_head_dim": [2, 2, 4],
    "block_out_channels": [16, 32, 32],
    "center_input_sample": False,
    "cross_attention_dim": 24,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 40,  # text_embeds 16 + 3 time ids x 8
    "sample_size": 16,
    "transformer_layers_per_block": [1, 1, 2],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_TINY_TEXT_EMBED_DIM = 16
SDXL_TINY_TIME_IDS = 3

# SD 1.x-like: conv proj_in/proj_out, four levels, an int head count, no micro-conditioning.
SD1_TINY = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 2,
    "block_out_channels": [16, 16, 32, 32],
    "center_input_sample": False,
    "cross_attention_dim": 12,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "out_channels": 4,
    "sample_size": 16,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# SD 2.x-like: linear projections, upcast attention, per-level heads, centred input, shifted frequencies.
SD2_TINY = dict(SD1_TINY, attention_head_dim=[2, 2, 4, 4], use_linear_projection=True, upcast_attention=True,
                center_input_sample=True, freq_shift=1, flip_sin_to_cos=False, layers_per_block=[1, 2, 1, 1])


def perturbed(build, seed: int = 0):
    """The torch model `build()` makes (seeded), in eval mode, with every parameter moved away from its
    initial value, so that a wrong key mapping or a dropped bias shows in the outputs (float32)."""
    import torch

    torch.manual_seed(seed)
    model = build().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05 + 0.02)
    return model


def torch_unet(config: dict, seed: int = 0):
    """A diffusers UNet with every parameter perturbed away from its initial value (float32, eval mode)."""
    from diffusers import UNet2DConditionModel

    return perturbed(lambda: UNet2DConditionModel.from_config(config), seed)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

# The smallest SDXL-shaped UNet (DownBlock2D + cross-attention level, text_time): for the many
# compilations of the patch-parallel tests, where per-level breadth matters less than compile time.
SDXL_MICRO = {
    "_class_name": "UNet2DConditionModel",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "attention_head_dim": [1, 2],
    "block_out_channels": [8, 16],
    "cross_attention_dim": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "projection_class_embeddings_input_dim": 8 + 3 * 4,
    "transformer_layers_per_block": [1, 1],
    "use_linear_projection": True,
}


def sdxl_scheduler_config() -> dict:
    """The bundled SDXL scheduler_config.json (EulerDiscreteScheduler fields)."""
    import json
    from importlib import resources

    path = resources.files("distrifusion_jax").joinpath("configs/sdxl-base-1.0/scheduler/scheduler_config.json")
    return json.loads(path.read_text())


def micro_setup(height: int, width: int):
    """(unet, params, (latents, ehs, added), ddim scheduler) for SDXL_MICRO at an image size, CFG batched."""
    import jax.numpy as jnp

    import distrifusion_jax as dj

    unet = dj.UNet2DConditionModel(dj.UNetConfig.from_dict(SDXL_MICRO))
    params = unet.init_params(seed=0)
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((1, height // 8, width // 8, 4)), jnp.float32)
    ehs = jnp.asarray(rng.standard_normal((2, 7, 8)), jnp.float32)
    added = {"text_embeds": jnp.asarray(rng.standard_normal((2, 8)), jnp.float32),
             "time_ids": jnp.asarray([[float(height), float(width), 0.0]] * 2, jnp.float32)}
    return unet, params, (latents, ehs, added), dj.make_scheduler("ddim", sdxl_scheduler_config())


def assert_full_size_mapping(torch_model, abstract_params, count: int) -> dict:
    """Every key and shape of a (meta-device) torch model maps onto our abstract parameters and back.

    Returns our {Flax path: shape}. `count` is the published parameter count both must have.
    """
    from distrifusion_jax import keymap

    torch_shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in keymap.flatten(abstract_params).items()}
    mapped = {}
    for key, shape in torch_shapes.items():
        path, flax_shape, _ = keymap.torch_to_flax(key, shape)
        mapped[path] = flax_shape
    assert sorted(set(mapped) - set(ours)) == []  # nothing in the checkpoint we would drop
    assert sorted(set(ours) - set(mapped)) == []  # nothing we need that the checkpoint lacks
    assert {k: v for k, v in mapped.items() if ours[k] != v} == {}
    assert sum(int(np.prod(s)) for s in ours.values()) == count
    assert sum(int(np.prod(s)) for s in torch_shapes.values()) == count
    # and the inverse map gives back the checkpoint's key and shape of every parameter
    assert {keymap.flax_to_torch(p, s)[:2] for p, s in ours.items()} == set(torch_shapes.items())
    return ours


def loop_runner(height: int, width: int):
    """`run(setup, steps=4, **distri_config_fields)` -> the final latents of a denoising loop on a
    `micro_setup` model at this size, cached per configuration (tests compare many runs pairwise)."""
    import distrifusion_jax as dj

    cache = {}

    def run(setup, steps=4, **config):
        key = (steps, tuple(sorted(config.items())))
        if key not in cache:
            unet, params, inputs, sched = setup
            denoise = dj.make_denoise_fn(unet, dj.DistriConfig(height, width, **config), sched,
                                         num_inference_steps=steps, guidance_scale=5.0)
            cache[key] = np.asarray(denoise(params, *inputs))
        return cache[key]

    return run
