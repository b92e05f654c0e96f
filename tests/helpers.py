"""What the tests share: fast-compile flags, the tiny UNet configs (bundled presets), torch reference models,
set-ups for the patch-parallel runs, and a dataflow over jaxprs (which collectives feed each output)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

import distrifusion_jax as dj
from distrifusion_jax import keymap
from distrifusion_jax.models.presets import preset_dict, scheduler_preset

# XLA:CPU flags for the tests: cheaper LLVM optimisation compiles the many small programs about a fifth
# sooner (the tests check results to tolerances, not the speed of XLA's code). conftest.py sets them
# (importing this module starts no JAX backend, so they still apply).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# Tiny UNets (see distrifusion_jax/models/presets.py for what each covers), as diffusers config dicts.
SDXL_TINY = preset_dict("parity-sdxl")
SD1_TINY = preset_dict("parity-sd1")
SD2_TINY = preset_dict("parity-sd2")
REFINER_TINY = preset_dict("parity-refiner")  # 5 time ids: size, crop, aesthetic score
SDXL_MICRO = preset_dict("micro-sdxl")  # the smallest SDXL-shaped UNet: for the many patch-parallel compiles
# parity-sdxl's text_time conditioning: 3 time ids (SDXL has 6), each embedded addition_time_embed_dim wide,
# beside text_embeds of the rest of projection_class_embeddings_input_dim (40 - 3 x 8 = 16)
SDXL_TINY_TIME_IDS = 3
SDXL_TINY_TEXT_EMBED_DIM = (
    SDXL_TINY["projection_class_embeddings_input_dim"]
    - SDXL_TINY_TIME_IDS * SDXL_TINY["addition_time_embed_dim"]
)


# ---- torch references ----
# torch and diffusers are imported inside the functions that use them: heavy, test-only references that
# most tests never touch.
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


def assert_full_size_mapping(torch_model, abstract_params, count: int) -> dict:
    """Every key and shape of a (meta-device) torch model maps onto our abstract parameters and back.

    Returns our {Flax path: shape}. `count` is the published parameter count both must have.
    """
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


# ---- patch-parallel runs ----
def sdxl_scheduler_config() -> dict:
    """The bundled SDXL scheduler_config.json (EulerDiscreteScheduler fields)."""
    return scheduler_preset("sdxl-base-1.0")


def micro_setup(height: int, width: int):
    """(unet, params, (latents, ehs, added), ddim scheduler) for SDXL_MICRO at an image size, CFG batched."""
    unet = dj.UNet2DConditionModel(dj.UNetConfig.from_dict(SDXL_MICRO))
    params = unet.init_params(seed=0)
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((1, height // 8, width // 8, 4)), jnp.float32)
    ehs = jnp.asarray(rng.standard_normal((2, 7, 8)), jnp.float32)
    added = {
        "text_embeds": jnp.asarray(rng.standard_normal((2, 8)), jnp.float32),
        "time_ids": jnp.asarray([[float(height), float(width), 0.0]] * 2, jnp.float32),
    }
    return unet, params, (latents, ehs, added), dj.make_scheduler("ddim", sdxl_scheduler_config())


def loop_runner(height: int, width: int):
    """`run(setup, steps=4, **distri_config_fields)` -> the final latents of a denoising loop on a
    `micro_setup` model at this size, cached per configuration (tests compare many runs pairwise)."""
    cache = {}

    def run(setup, steps=4, **config):
        key = (steps, tuple(sorted(config.items())))
        if key not in cache:
            unet, params, inputs, sched = setup
            denoise = dj.make_denoise_fn(
                unet,
                dj.DistriConfig(height, width, **config),
                sched,
                num_inference_steps=steps,
                guidance_scale=5.0,
            )
            cache[key] = np.asarray(denoise(params, *inputs))
        return cache[key]

    return run


# ---- dataflow over a jaxpr: which collectives does each output depend on (through nested jaxprs)? ----
COLLECTIVES = {
    "ppermute",
    "all_gather",
    "all_gather_invariant",
    "psum",
    "psum_invariant",
    "all_to_all",
    "reduce_scatter",
    "pmax",
    "pmin",
}


def _sub_jaxprs(eqn):
    for key, value in eqn.params.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, jcore.ClosedJaxpr):
                yield key, v.jaxpr
            elif isinstance(v, jcore.Jaxpr):
                yield key, v


def output_taints(jaxpr, in_taints, found):
    """Taint sets of jaxpr's outputs, given those of its inputs; `found` collects collective eqns."""
    env = {}

    def read(v):
        return env.get(v, frozenset()) if isinstance(v, jcore.Var) else frozenset()

    for v, t in zip(jaxpr.invars, in_taints):
        env[v] = t
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        union = frozenset().union(*ins)
        subs = list(_sub_jaxprs(eqn))
        if eqn.primitive.name in COLLECTIVES:
            found.append(eqn)
            outs = [union | {id(eqn)}] * len(eqn.outvars)
        elif subs:
            outs = None
            for key, sub in subs:
                args = ins[1:] if key == "branches" else ins  # cond: the first operand is the index
                if len(args) == len(sub.invars) and len(sub.outvars) == len(eqn.outvars):
                    sub_out = output_taints(sub, args, found)
                    outs = sub_out if outs is None else [a | b for a, b in zip(outs, sub_out)]
                else:  # unknown calling convention: over-approximate
                    output_taints(sub, [union] * len(sub.invars), found)
                    outs = [union] * len(eqn.outvars)
            outs = [o | (union if key == "branches" else frozenset()) for o in outs]
        else:
            outs = [union] * len(eqn.outvars)
        for v, t in zip(eqn.outvars, outs):
            env[v] = t
    return [read(v) for v in jaxpr.outvars]


def shard_map_body(closed_jaxpr):
    """The jaxpr inside the (single) shard_map of a traced function."""
    for eqn in closed_jaxpr.jaxpr.eqns:
        for _, sub in _sub_jaxprs(eqn):
            if eqn.primitive.name == "shard_map":
                return sub
            inner = shard_map_body(jcore.ClosedJaxpr(sub, ())) if sub.eqns else None
            if inner is not None:
                return inner
    return None
