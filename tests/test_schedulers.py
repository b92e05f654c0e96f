"""Schedulers against diffusers' (torch, float32) step by step; elementwise property; config errors."""

import functools
import json
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as TorchDDIM
from diffusers import DPMSolverMultistepScheduler as TorchDPM
from diffusers import EulerDiscreteScheduler as TorchEuler

from distrifusion_jax.errors import ConfigError
from distrifusion_jax.schedulers import SCHEDULERS, make_scheduler, scheduler_from_config

# Relative error bound per step: max |ours - diffusers| / max |diffusers|. diffusers' own float32 tables
# (torch.linspace, float32 cumprod) are within ~1e-6 of the float64-accumulated ones we round to float32.
RTOL = 1e-5

SDXL = json.loads(resources.files("distrifusion_jax").joinpath(
    "configs", "sdxl-base-1.0", "scheduler", "scheduler_config.json").read_text())
SDXL_BRIEF = {**SDXL, "clip_sample": False, "trained_betas": None}  # the config as published on the Hub
TORCH = {"ddim": TorchDDIM, "euler": TorchEuler, "dpm-solver": TorchDPM}
SHAPE = (2, 8, 8, 4)  # (batch, rows, cols, channels); the fake model is elementwise so layout is immaterial


def _inputs(shape=SHAPE):
    rng = np.random.default_rng(0)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def _coefs(timesteps):
    # The fake model's time dependence, computed once on the host so both sides get identical scalars.
    return (0.1 * np.cos(np.asarray(timesteps, np.float64))).astype(np.float32)


def run_diffusers(name, config, n, latents, noise):
    """diffusers' denoising loop with model_output = 0.3 * scaled_input + 0.1 cos(t) * noise."""
    sched = TORCH[name].from_config(config)
    sched.set_timesteps(n)
    timesteps = sched.timesteps.numpy()
    noise_t = torch.from_numpy(noise)
    x = torch.from_numpy(latents) * sched.init_noise_sigma
    out = []
    for t, c in zip(sched.timesteps, _coefs(timesteps)):
        model_output = 0.3 * sched.scale_model_input(x, t) + float(c) * noise_t
        x = sched.step(model_output, t, x).prev_sample
        out.append(x.numpy())
    return timesteps, float(sched.init_noise_sigma), np.stack(out)


@functools.partial(jax.jit, static_argnums=0)
def run_ours(sched, state, latents, noise, coefs):
    """The same loop as a jitted `lax.scan` over (traced) step indices."""

    def body(carry, inputs):
        x, st = carry
        i, c = inputs
        model_output = 0.3 * sched.scale_model_input(st, x, i) + c * noise
        x, st = sched.step(st, model_output, i, x)
        return (x, st), x

    steps = jnp.arange(coefs.shape[0], dtype=jnp.int32)
    return jax.lax.scan(body, (latents, state), (steps, coefs))[1]


def check_against_diffusers(name, config, steps=(10, 50)):
    latents, noise = _inputs()
    worst = 0.0
    for n in steps:
        ts, sigma0, ref = run_diffusers(name, config, n, latents, noise)
        sched = make_scheduler(name, config)
        ours_ts = sched.timesteps(n)
        assert ours_ts.dtype == ts.dtype and ours_ts.shape == ts.shape
        if name == "euler" and config.get("use_karras_sigmas"):
            # Fractional timesteps from log-sigma interpolation: equal up to diffusers' float32 tables.
            np.testing.assert_allclose(ours_ts, ts, rtol=0, atol=1e-3)
        else:
            np.testing.assert_array_equal(ours_ts, ts)
        assert sched.init_noise_sigma(n) == pytest.approx(sigma0, rel=1e-6)
        state = sched.init(n, jnp.asarray(latents))
        x0 = jnp.asarray(latents) * np.float32(sched.init_noise_sigma(n))
        ours = np.asarray(run_ours(sched, state, x0, jnp.asarray(noise), jnp.asarray(_coefs(ts))))
        assert ours.shape == ref.shape
        scale = np.abs(ref).reshape(len(ref), -1).max(1)
        err = (np.abs(ours - ref).reshape(len(ref), -1).max(1) / scale).max()
        assert err <= RTOL, f"{name} n={n}: max relative error {err:.2e} > {RTOL:.0e}"
        worst = max(worst, err)
    return worst


SPACING_VARIANTS = [dict(timestep_spacing=s, steps_offset=o, prediction_type=p)
                    for s in ("leading", "trailing", "linspace") for o in (0, 1) for p in ("epsilon", "v_prediction")]
BASE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("variant", SPACING_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_ddim_matches_diffusers(variant, set_alpha_to_one):
    check_against_diffusers("ddim", {**BASE, **variant, "clip_sample": False, "set_alpha_to_one": set_alpha_to_one})


@pytest.mark.parametrize("extra", [
    {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"},
    {"clip_sample": True, "clip_sample_range": 1.5},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"trained_betas": list(np.linspace(1e-4, 2e-2, 1000))},
], ids=["linear", "cosine-sample", "clip", "zero-snr", "trained-betas"])
def test_ddim_options_match_diffusers(extra):
    check_against_diffusers("ddim", {**BASE, **extra})


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm-solver"])
@pytest.mark.parametrize("config", [SDXL, SDXL_BRIEF], ids=["sdxl-repo", "sdxl-hub"])
def test_sdxl_config_matches_diffusers(name, config):
    # The SDXL checkpoint's Euler config, read by each scheduler the way diffusers' from_config reads it.
    check_against_diffusers(name, config, steps=(10, 20, 50))


@pytest.mark.parametrize("variant", SPACING_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_euler_matches_diffusers(variant):
    check_against_diffusers("euler", {**BASE, **variant})


@pytest.mark.parametrize("extra", [
    {"use_karras_sigmas": True},
    {"use_karras_sigmas": True, "timestep_spacing": "leading", "sigma_min": 0.05, "sigma_max": 10.0},
    {"interpolation_type": "log_linear"},
    {"final_sigmas_type": "sigma_min", "prediction_type": "sample"},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"beta_schedule": "squaredcos_cap_v2", "timestep_type": "continuous"},
], ids=["karras", "karras-minmax", "log-linear", "sigma-min", "zero-snr", "cosine"])
def test_euler_options_match_diffusers(extra):
    check_against_diffusers("euler", {**BASE, **extra})


@pytest.mark.parametrize("variant", SPACING_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_dpm_solver_matches_diffusers(variant):
    check_against_diffusers("dpm-solver", {**BASE, **variant})


@pytest.mark.parametrize("extra", [
    {"use_karras_sigmas": True},
    {"final_sigmas_type": "sigma_min"},
    {"final_sigmas_type": "sigma_min", "lower_order_final": False},
    {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
    {"solver_type": "heun"},
    {"solver_order": 1},
    {"prediction_type": "sample", "algorithm_type": "deis"},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
], ids=["karras", "sigma-min", "no-lower-final", "euler-final", "heun", "order1", "deis-sample", "zero-snr",
        "cosine-clipped"])
def test_dpm_solver_options_match_diffusers(extra):
    check_against_diffusers("dpm-solver", {**BASE, **extra}, steps=(10, 20))


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm-solver"])
def test_step_is_elementwise_over_row_bands(name):
    # The denoising loop runs the scheduler on each device's row band; it must equal the whole-sample step.
    sched = make_scheduler(name, SDXL)
    n, bands = 6, 4
    latents, noise = _inputs((2, 16, 8, 4))
    coefs = jnp.asarray(_coefs(sched.timesteps(n)))
    x0 = jnp.asarray(latents) * np.float32(sched.init_noise_sigma(n))
    whole = run_ours(sched, sched.init(n, x0), x0, jnp.asarray(noise), coefs)
    parts = []
    for x_band, noise_band in zip(jnp.split(x0, bands, axis=1), np.split(noise, bands, axis=1)):
        parts.append(run_ours(sched, sched.init(n, x_band), x_band, jnp.asarray(noise_band), coefs))
    np.testing.assert_array_equal(np.concatenate(parts, axis=2), whole)  # (steps, batch, rows, ...)

    # And on an array whose rows are sharded over the 8 CPU devices: same values, sharding kept.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("rows",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "rows"))
    x_sharded = jax.device_put(x0, rows)
    state = jax.device_put(sched.init(n, x0), jax.tree.map(
        lambda a: rows if a.ndim == 4 else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
        sched.init(n, x0)))
    sharded = run_ours(sched, state, x_sharded, jax.device_put(jnp.asarray(noise), rows), coefs)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(whole), rtol=1e-6, atol=1e-6)


def test_make_scheduler_and_from_config():
    assert isinstance(scheduler_from_config(SDXL), SCHEDULERS["euler"])
    for cls_name, name in [("DDIMScheduler", "ddim"), ("DPMSolverMultistepScheduler", "dpm-solver")]:
        sched = scheduler_from_config({**SDXL, "_class_name": cls_name})
        assert sched.name == name and isinstance(sched, SCHEDULERS[name])
    # Hashable and comparable: a static argument of jit.
    assert hash(make_scheduler("ddim", SDXL)) == hash(make_scheduler("ddim", dict(SDXL)))
    # `_use_default_values` keys fall back to the scheduler's own defaults, as in diffusers.
    sched = make_scheduler("ddim", {**SDXL, "_use_default_values": ["timestep_spacing"], "timestep_spacing": "x"})
    assert sched.timestep_spacing == "leading"


@pytest.mark.parametrize("call, match", [
    (lambda: make_scheduler("pndm", SDXL), "unknown scheduler 'pndm'.*'ddim'"),
    (lambda: scheduler_from_config({**SDXL, "_class_name": "PNDMScheduler"}), "_class_name='PNDMScheduler'"),
    (lambda: scheduler_from_config({"beta_schedule": "linear"}), "_class_name=None"),
    (lambda: make_scheduler("ddim", {**SDXL, "thresholding": True}), "thresholding=True"),
    (lambda: make_scheduler("ddim", {**SDXL, "timestep_spacing": "middle"}), "timestep_spacing='middle'"),
    (lambda: make_scheduler("euler", {**SDXL, "beta_schedule": "sigmoid"}), "beta_schedule='sigmoid'"),
    (lambda: make_scheduler("euler", {**SDXL, "prediction_type": "flow_prediction"}), "prediction_type="),
    (lambda: make_scheduler("euler", {**SDXL, "use_exponential_sigmas": True}), "use_exponential_sigmas=True"),
    (lambda: make_scheduler("euler", {**SDXL, "interpolation_type": "cubic"}), "interpolation_type='cubic'"),
    (lambda: make_scheduler("euler", {**SDXL, "prediction_type": "v_prediction", "timestep_type": "continuous"}),
     "timestep_type='continuous'"),
    (lambda: make_scheduler("dpm-solver", {**SDXL, "algorithm_type": "sde-dpmsolver++"}), "algorithm_type="),
    (lambda: make_scheduler("dpm-solver", {**SDXL, "solver_order": 3}), "solver_order=3"),
    (lambda: make_scheduler("dpm-solver", {**SDXL, "use_lu_lambdas": True}), "use_lu_lambdas=True"),
    (lambda: make_scheduler("dpm-solver", {**SDXL, "final_sigmas_type": "one"}), "final_sigmas_type='one'"),
    (lambda: make_scheduler("ddim", {**SDXL, "num_train_timesteps": "1000"}), "num_train_timesteps="),
    (lambda: make_scheduler("ddim", {**SDXL, "trained_betas": [0.1, 0.2]}), "trained_betas"),
    (lambda: make_scheduler("ddim", SDXL).timesteps(1001), "num_inference_steps=1001"),
    (lambda: make_scheduler("euler", SDXL).init(0, jnp.zeros(2)), "num_inference_steps=0"),
])
def test_config_errors(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_unused_fields_are_ignored():
    # SDXL's Euler config carries Euler-only fields; DDIM ignores them, whatever their values.
    sched = make_scheduler("ddim", {**SDXL, "interpolation_type": "log_linear", "use_karras_sigmas": True})
    assert sched == make_scheduler("ddim", SDXL)
    # ...and an unsupported value of a field only DPM-Solver reads does not affect DDIM.
    make_scheduler("ddim", {**SDXL, "algorithm_type": "sde-dpmsolver++"})
