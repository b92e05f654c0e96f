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

# Relative error bound per step: max |ours - diffusers| / max |diffusers| (float32 on both sides; we reach
# <= 1.5e-6 except where CASE_RTOL says).
RTOL = 1e-5

SDXL = json.loads(
    resources.files("distrifusion_jax")
    .joinpath("configs", "sdxl-base-1.0", "scheduler", "scheduler_config.json")
    .read_text()
)
SDXL_BRIEF = {**SDXL, "clip_sample": False, "trained_betas": None}  # the config as published on the Hub
TORCH = {"ddim": TorchDDIM, "euler": TorchEuler, "dpm-solver": TorchDPM}
SHAPE = (2, 8, 8, 4)  # (batch, rows, cols, channels); the fake model is elementwise so layout is immaterial
STEPS = (10, 50)  # 50 >= 15 and 10 < 15: both sides of DPM-Solver's lower_order_final switch
BASE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
SPACING_VARIANTS = {
    f"{s}-offset{o}-{p}": dict(timestep_spacing=s, steps_offset=o, prediction_type=p)
    for s in ("leading", "trailing", "linspace")
    for o in (0, 1)
    for p in ("epsilon", "v_prediction")
}
ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
SDXL_CASES = {"sdxl-repo": SDXL, "sdxl-hub": SDXL_BRIEF}

# Every case is a diffusers config dict; SDXL's Euler config is also read by DDIM and DPM-Solver.
CASES = {
    "ddim": {
        **{
            f"{k}-alpha1{a}": {**BASE, **v, "clip_sample": False, "set_alpha_to_one": a}
            for k, v in SPACING_VARIANTS.items()
            for a in (False, True)
        },
        **SDXL_CASES,
        "linear": {"_class_name": "DDIMScheduler", "beta_schedule": "linear"},
        "cosine-sample": {**BASE, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"},
        "clip": {**BASE, "clip_sample": True, "clip_sample_range": 1.5},
        "zero-snr": {**BASE, **ZERO_SNR},
        "trained-betas": {**BASE, "trained_betas": list(np.linspace(1e-4, 2e-2, 1000))},
    },
    "euler": {
        **{k: {**BASE, **v} for k, v in SPACING_VARIANTS.items()},
        **SDXL_CASES,
        "karras": {**BASE, "use_karras_sigmas": True},
        "karras-minmax": {
            **BASE,
            "use_karras_sigmas": True,
            "timestep_spacing": "leading",
            "sigma_min": 0.05,
            "sigma_max": 10.0,
        },
        "log-linear": {**BASE, "interpolation_type": "log_linear"},
        "sigma-min-sample": {**BASE, "final_sigmas_type": "sigma_min", "prediction_type": "sample"},
        "zero-snr": {**BASE, **ZERO_SNR},
        "cosine": {**BASE, "beta_schedule": "squaredcos_cap_v2", "timestep_type": "continuous"},
    },
    "dpm-solver": {
        **{k: {**BASE, **v} for k, v in SPACING_VARIANTS.items()},
        **SDXL_CASES,
        "karras": {**BASE, "use_karras_sigmas": True},
        "sigma-min": {**BASE, "final_sigmas_type": "sigma_min"},
        "no-lower-final": {**BASE, "final_sigmas_type": "sigma_min", "lower_order_final": False},
        "euler-final": {**BASE, "euler_at_final": True, "final_sigmas_type": "sigma_min"},
        "heun": {**BASE, "solver_type": "heun"},
        "order1": {**BASE, "solver_order": 1},
        "deis-sample": {
            **BASE,
            "algorithm_type": "deis",
            "final_sigmas_type": "sigma_min",
            "prediction_type": "sample",
        },
        "zero-snr": {**BASE, **ZERO_SNR},
        "cosine-clipped": {**BASE, "beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    },
}
# Max relative error per step allowed, by case; RTOL elsewhere. With zero terminal SNR, Euler's first step
# goes from sigma = 4096 to sigma = 18 and cancels ~230x, so 1-ulp float32 differences (torch's float32 sqrt
# is not correctly rounded; diffusers' alpha_bar tail is itself ill-conditioned) grow to ~1.4e-5.
CASE_RTOL = {("euler", "zero-snr"): 3e-5}


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


def denoise(sched, state, latents, noise, coefs):
    """Our loop: a `lax.scan` over traced int32 step indices; returns every step's sample."""

    def body(carry, inputs):
        x, st = carry
        i, c = inputs
        model_output = 0.3 * sched.scale_model_input(st, x, i) + c * noise
        x, st = sched.step(st, model_output, i, x)
        return (x, st), x

    steps = jnp.arange(coefs.shape[0], dtype=jnp.int32)
    return jax.lax.scan(body, (latents, state), (steps, coefs))[1]


# XLA takes ~0.3 s per program on CPU whatever its size, so each family's cases (each traced with its
# own scheduler) are jitted together as one program of independent scans.
@functools.partial(jax.jit, static_argnums=0)
def denoise_many(scheds, states, latents, noise, coefs):
    return [denoise(s, st, x, noise, c) for s, st, x, c in zip(scheds, states, latents, coefs)]


@functools.lru_cache(maxsize=None)
def family_results(name):
    """{(case, n): (diffusers run, our scheduler, our samples at every step)} for all cases of a family."""
    latents, noise = _inputs()
    keys, refs, scheds, states, starts, coefs = [], [], [], [], [], []
    for case, config in CASES[name].items():
        for n in STEPS:
            ts, sigma0, ref = run_diffusers(name, config, n, latents, noise)
            sched = make_scheduler(name, config)
            keys.append((case, n))
            refs.append((ts, sigma0, ref))
            scheds.append(sched)
            states.append(sched.init(n, jnp.asarray(latents)))
            starts.append(jnp.asarray(latents) * np.float32(sched.init_noise_sigma(n)))
            coefs.append(jnp.asarray(_coefs(ts)))
    ours = denoise_many(tuple(scheds), states, starts, jnp.asarray(noise), coefs)
    return {k: (r, s, np.asarray(o)) for k, r, s, o in zip(keys, refs, scheds, ours)}


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("name, case", [(name, case) for name in CASES for case in CASES[name]])
def test_matches_diffusers_step_by_step(name, case, n):
    (ts, sigma0, ref), sched, ours = family_results(name)[case, n]
    ours_ts = sched.timesteps(n)
    assert ours_ts.dtype == ts.dtype and ours_ts.shape == ts.shape
    if name == "euler" and CASES[name][case].get("use_karras_sigmas"):
        # Fractional timesteps from log-sigma interpolation: equal up to diffusers' float32 rounding.
        np.testing.assert_allclose(ours_ts, ts, rtol=0, atol=1e-3)
    else:
        np.testing.assert_array_equal(ours_ts, ts)
    assert sched.init_noise_sigma(n) == pytest.approx(sigma0, rel=1e-6)
    assert ours.shape == ref.shape
    scale = np.abs(ref).reshape(len(ref), -1).max(1)
    err = np.abs(ours - ref).reshape(len(ref), -1).max(1) / scale
    rtol = CASE_RTOL.get((name, case), RTOL)
    assert err.max() <= rtol, f"max relative error {err.max():.2e} at step {err.argmax()} > {rtol:.0e}"


ROWS = 16  # 2 rows per device of the 8 fake CPU devices


@functools.partial(jax.jit, static_argnums=(0, 1))
def _whole_and_banded(scheds, n, latents, noise):
    """Each scheduler's loop on the whole latent, and under shard_map on 8 row bands (one per device),
    each band with its own band-shaped state: how the DistriFusion loop runs the scheduler."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("rows",))
    rows = jax.sharding.PartitionSpec(None, "rows")
    out = []
    for sched in scheds:
        coefs = jnp.asarray(_coefs(sched.timesteps(n)))
        x0 = latents * np.float32(sched.init_noise_sigma(n))

        def run(x, nz, sched=sched, coefs=coefs):
            return denoise(sched, sched.init(n, x), x, nz, coefs)

        banded = jax.shard_map(
            run, mesh=mesh, in_specs=(rows, rows), out_specs=jax.sharding.PartitionSpec(None, None, "rows")
        )(x0, noise)
        out.append((run(x0, noise), banded))
    return out


def test_step_is_elementwise_over_row_bands():
    # The scheduler must never mix pixels: run on each device's row band it equals the whole-sample run.
    scheds = tuple(make_scheduler(name, SDXL) for name in ("ddim", "euler", "dpm-solver"))
    latents, noise = _inputs((2, ROWS, 8, 4))
    for sched, (whole, banded) in zip(
        scheds, _whole_and_banded(scheds, 6, jnp.asarray(latents), jnp.asarray(noise))
    ):
        assert banded.shape == whole.shape == (6, 2, ROWS, 8, 4)
        np.testing.assert_array_equal(np.asarray(banded), np.asarray(whole), err_msg=sched.name)


def test_make_scheduler_and_from_config():
    assert isinstance(scheduler_from_config(SDXL), SCHEDULERS["euler"])
    for cls_name, name in [("DDIMScheduler", "ddim"), ("DPMSolverMultistepScheduler", "dpm-solver")]:
        sched = scheduler_from_config({**SDXL, "_class_name": cls_name})
        assert sched.name == name and isinstance(sched, SCHEDULERS[name])
    # PNDM (SD 1.x's published class, which we do not implement) runs as DDIM, its first-order case.
    pndm = {**SDXL, "_class_name": "PNDMScheduler", "prediction_type": "v_prediction"}
    assert scheduler_from_config(pndm) == make_scheduler("ddim", pndm)
    assert scheduler_from_config(pndm).prediction_type == "v_prediction"
    # Hashable and comparable: a static argument of jit.
    assert hash(make_scheduler("ddim", SDXL)) == hash(make_scheduler("ddim", dict(SDXL)))
    # `_use_default_values` keys fall back to the scheduler's own defaults, as in diffusers.
    sched = make_scheduler(
        "ddim", {**SDXL, "_use_default_values": ["timestep_spacing"], "timestep_spacing": "x"}
    )
    assert sched.timestep_spacing == "leading"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: make_scheduler("pndm", SDXL), "unknown scheduler 'pndm'.*'ddim'"),
        (
            lambda: scheduler_from_config({**SDXL, "_class_name": "LMSDiscreteScheduler"}),
            "_class_name='LMSDiscreteScheduler'",
        ),
        (lambda: scheduler_from_config({"beta_schedule": "linear"}), "_class_name=None"),
        (lambda: make_scheduler("ddim", {**SDXL, "thresholding": True}), "thresholding=True"),
        (lambda: make_scheduler("ddim", {**SDXL, "timestep_spacing": "middle"}), "timestep_spacing='middle'"),
        (lambda: make_scheduler("euler", {**SDXL, "beta_schedule": "sigmoid"}), "beta_schedule='sigmoid'"),
        (lambda: make_scheduler("euler", {**SDXL, "prediction_type": "flow_prediction"}), "prediction_type="),
        (
            lambda: make_scheduler("euler", {**SDXL, "use_exponential_sigmas": True}),
            "use_exponential_sigmas=True",
        ),
        (
            lambda: make_scheduler("euler", {**SDXL, "interpolation_type": "cubic"}),
            "interpolation_type='cubic'",
        ),
        (
            lambda: make_scheduler(
                "euler", {**SDXL, "prediction_type": "v_prediction", "timestep_type": "continuous"}
            ),
            "timestep_type='continuous'",
        ),
        (
            lambda: make_scheduler("dpm-solver", {**SDXL, "algorithm_type": "sde-dpmsolver++"}),
            "algorithm_type=",
        ),
        (lambda: make_scheduler("dpm-solver", {**SDXL, "solver_order": 3}), "solver_order=3"),
        (lambda: make_scheduler("dpm-solver", {**SDXL, "use_lu_lambdas": True}), "use_lu_lambdas=True"),
        (
            lambda: make_scheduler("dpm-solver", {**SDXL, "final_sigmas_type": "one"}),
            "final_sigmas_type='one'",
        ),
        (
            lambda: make_scheduler("dpm-solver", {**SDXL, "algorithm_type": "deis"}),
            "final_sigmas_type='zero'",
        ),
        (lambda: make_scheduler("dpm-solver", {**SDXL, "thresholding": True}), "thresholding=True"),
        (lambda: make_scheduler("ddim", {**SDXL, "prediction_type": "flow_prediction"}), "prediction_type="),
        (lambda: make_scheduler("ddim", [("beta_schedule", "linear")]), "must be a dict"),
        (lambda: make_scheduler("ddim", {**SDXL, "num_train_timesteps": "1000"}), "num_train_timesteps="),
        (lambda: make_scheduler("ddim", {**SDXL, "trained_betas": [0.1, 0.2]}), "trained_betas"),
        (lambda: make_scheduler("ddim", SDXL).timesteps(1001), "num_inference_steps=1001"),
        (lambda: make_scheduler("euler", SDXL).init(0, jnp.zeros(2)), "num_inference_steps=0"),
    ],
)
def test_config_errors(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_unused_fields_are_ignored():
    # SDXL's Euler config carries Euler-only fields; DDIM ignores them, whatever their values.
    sched = make_scheduler("ddim", {**SDXL, "interpolation_type": "log_linear", "use_karras_sigmas": True})
    assert sched == make_scheduler("ddim", SDXL)
    # ...and an unsupported value of a field only DPM-Solver reads does not affect DDIM.
    make_scheduler("ddim", {**SDXL, "algorithm_type": "sde-dpmsolver++"})
