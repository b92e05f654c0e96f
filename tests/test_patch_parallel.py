"""Displaced patch parallelism: exactness of synchronous steps, displaced accuracy, structure, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import distrifusion_jax as dj
from distrifusion_jax.parallel import CFG, PATCH, PatchPlan
from helpers import (
    SDXL_MICRO,
    loop_runner,
    micro_setup,
    output_taints,
    rel_l2,
    sdxl_scheduler_config,
    shard_map_body,
    torch_unet,
)

HEIGHT, WIDTH = 128, 192  # latents 16 x 24: non-square, 8 bands of 2 rows (1 row at the lower level)
EXACT = 1e-5  # float32 relative L2 tolerance for synchronous parallelism vs one device


@pytest.fixture(scope="module")
def setup():
    return micro_setup(HEIGHT, WIDTH)


run = loop_runner(HEIGHT, WIDTH)  # final latents of a loop, cached per configuration within the module


# (4 devices with the split, 8 without, 2 with guidance off and 3 run in test_displaced_meshes.py)
@pytest.mark.parametrize("devices, split_batch", [(2, True), (2, False), (8, True), (4, False)])
def test_full_sync_equals_single_device(setup, devices, split_batch):
    single = run(setup, devices=1)
    out = run(setup, devices=devices, split_batch=split_batch, mode="full_sync")
    err = rel_l2(out, single)
    print(f"full_sync on {devices} devices (split_batch={split_batch}): relative L2 {err:.1e}")
    assert err <= EXACT


@pytest.mark.parametrize("mode", dj.config.MODES)
def test_warmup_phase_of_every_mode_equals_single_device(setup, mode):
    """With warmup covering the run every step is synchronous, whatever the mode."""
    err = rel_l2(run(setup, devices=8, mode=mode, warmup_steps=4), run(setup, devices=1))
    print(f"{mode} warmup on 8 devices: relative L2 {err:.1e}")
    assert err <= EXACT


@pytest.mark.parametrize("scheme", ["col", "alternate"])
def test_naive_patch_schemes_run(setup, scheme):
    single = run(setup, steps=4, devices=1)
    out = run(setup, steps=4, devices=4, split_batch=False, parallelism="naive_patch", split_scheme=scheme)
    assert np.isfinite(out).all()
    assert 0.01 < rel_l2(out, single) < 2.0  # independent patches: visibly different, not garbage


def step_pair(setup, mode, devices=4, split_batch=True):
    """One synchronous step, then one displaced step, both under shard_map: (eps_sync, eps_displaced)."""
    unet, params, (latents, ehs, added), sched = setup
    d = dj.Denoiser(
        unet, dj.DistriConfig(HEIGHT, WIDTH, devices=devices, split_batch=split_batch, mode=mode), sched, 4
    )
    sync, disp = d.model(PatchPlan("sync", mode)), d.model(PatchPlan("displaced", mode))
    t = jnp.float32(500.0)

    def f(params, x1, x2, ehs, added):
        eps_sync, state = d.eps(sync, params, None, x1, t, ehs, added)
        eps_disp, _ = d.eps(disp, params, state, x2, t, ehs, added)
        return eps_sync, eps_disp

    batch = P(CFG) if d.cfg_size == 2 else P()
    sharded = jax.jit(
        jax.shard_map(
            f,
            mesh=d.mesh,
            in_specs=(P(), P(None, PATCH), P(None, PATCH), batch, batch),
            out_specs=(P(None, PATCH), P(None, PATCH)),
        )
    )
    return d, lambda x1, x2: [np.asarray(a) for a in sharded(params, x1, x2, ehs, added)]


@pytest.mark.parametrize("mode", ["corrected_async_gn", "stale_gn", "sync_gn", "full_sync"])
def test_displaced_step_is_a_fixed_point(setup, mode):
    """Fed the input of the previous (synchronous) step, a displaced step gives the synchronous result."""
    unet, params, (latents, ehs, added), sched = setup
    _, pair = step_pair(setup, mode)
    eps_sync, eps_disp = pair(latents, latents)
    one = dj.Denoiser(unet, dj.DistriConfig(HEIGHT, WIDTH, devices=1), sched, 4)
    single, _ = one.eps(unet, params, None, latents, jnp.float32(500.0), ehs, added)
    assert rel_l2(eps_sync, np.asarray(single)) <= EXACT
    err = rel_l2(eps_disp, eps_sync)
    print(f"{mode}: displaced step on the same input vs synchronous step: {err:.1e}")
    assert err <= EXACT


@pytest.mark.parametrize("mode", dj.config.MODES)
def test_every_mode_stays_finite_when_a_band_collapses(setup, mode):
    """The second step's input has a band whose variance collapsed: corrected GN variance goes negative."""
    _, _, (latents, _, _), _ = setup
    _, pair = step_pair(setup, mode)
    x2 = latents.at[:, :4].multiply(1e-3)  # the first band (of 4) almost constant now
    eps_sync, eps_disp = pair(latents, x2)
    assert np.isfinite(eps_disp).all() and np.isfinite(eps_sync).all()


def test_displaced_prediction_uses_no_collective_of_its_own_step(setup):
    """In a displaced step only conv_in's exact halo (and the CFG exchange) feed this step's prediction;
    every other collective only refreshes the state carried to the next step, so it can overlap compute."""
    unet, params, (latents, ehs, added), sched = setup

    def taints(phase):
        d = dj.Denoiser(unet, dj.DistriConfig(HEIGHT, WIDTH, devices=8), sched, 4)
        m = d.model(PatchPlan(phase, "corrected_async_gn"))
        sync = d.model(PatchPlan("sync", "corrected_async_gn"))

        def f(params, x, ehs, added):
            state = d.initial_stale(sync, params, x, ehs, added)
            return d.eps(m, params, state, x, jnp.float32(1.0), ehs, added)

        sharded = jax.shard_map(
            f,
            mesh=d.mesh,
            in_specs=(P(), P(None, PATCH), P(CFG), P(CFG)),
            out_specs=(P(None, PATCH), P(CFG, PATCH)),
        )
        body = shard_map_body(jax.make_jaxpr(sharded)(params, latents, ehs, added))
        found = []
        out = output_taints(body, [frozenset()] * len(body.invars), found)
        return found, out[0], frozenset().union(*out[1:])

    found, eps_taint, state_taint = taints("displaced")
    collectives = {id(e): e for e in found}
    feeding = [collectives[i] for i in eps_taint]
    names = sorted(e.primitive.name for e in feeding)
    assert names == ["all_gather_invariant", "ppermute", "ppermute"], names
    for e in feeding:
        if e.primitive.name == "ppermute":  # conv_in's halo: rows of the 4-channel latent
            assert e.invars[0].aval.shape[-1] == 4
        else:  # the CFG exchange of the noise prediction
            assert e.params["axis_name"] in (CFG, (CFG,))
    assert len(found) > 20 and len(state_taint - eps_taint) == len(found) - 3  # the rest feed the state
    # the analysis does see dependencies: in a synchronous step every collective feeds the prediction
    found, eps_taint, _ = taints("sync")
    assert len(eps_taint) == len(found)


def test_single_device_loop_equals_diffusers_ddim_loop(tmp_path):
    import torch
    from diffusers import DDIMScheduler

    model = torch_unet(SDXL_MICRO, seed=3)
    model.save_pretrained(tmp_path)
    unet, params = dj.load_unet(tmp_path)
    config = sdxl_scheduler_config()
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((1, 4, 16, 24)).astype(np.float32)
    ehs = rng.standard_normal((2, 7, 8)).astype(np.float32)
    added = {
        "text_embeds": rng.standard_normal((2, 8)).astype(np.float32),
        "time_ids": np.array([[128.0, 192.0, 0.0]] * 2, np.float32),
    }
    steps, scale = 6, 5.0
    ref = torch.from_numpy(latents)
    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(steps)
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([ref, ref]), t)
            out = model(
                inp,
                t,
                torch.from_numpy(ehs),
                added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()},
            ).sample
            u, c = out.chunk(2)
            ref = sched.step(u + scale * (c - u), t, ref).prev_sample
    denoise = dj.make_denoise_fn(
        unet,
        dj.DistriConfig(128, 192, devices=1),
        dj.make_scheduler("ddim", config),
        num_inference_steps=steps,
        guidance_scale=scale,
    )
    ours = np.asarray(denoise(params, latents.transpose(0, 2, 3, 1), ehs, added)).transpose(0, 3, 1, 2)
    err = rel_l2(ours, ref.numpy())
    print(f"single-device DDIM loop vs diffusers: relative L2 {err:.1e}")
    assert err <= EXACT


def test_second_call_does_not_recompile(setup):
    unet, params, inputs, sched = setup
    denoise = dj.make_denoise_fn(unet, dj.DistriConfig(HEIGHT, WIDTH, devices=4, mode="stale_gn"), sched, 3)
    first = denoise(params, *inputs)
    second = denoise(params, *inputs)
    assert len(denoise._executables) == 1 and denoise.last_compile_s == 0.0
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    # the result stays row-sharded over the patch axis, and can be fed back in: inputs are placed where the
    # program takes them, so another placement reuses the program
    assert first.sharding.spec == P(None, PATCH)
    again = denoise(params, first, *inputs[1:])
    assert len(denoise._executables) == 1 and np.isfinite(np.asarray(again)).all()


# ---- bad configurations ----
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="async"), "unknown mode 'async': use one of 'corrected_async_gn'"),
        (dict(parallelism="pipeline"), "unknown parallelism 'pipeline'"),
        (dict(parallelism="naive_patch", split_scheme="diagonal"), "unknown split_scheme 'diagonal'"),
        (dict(height=1001), "height=1001 must be a positive multiple of 8"),
        (dict(warmup_steps=-1), "warmup_steps=-1 must be an int >= 0"),
    ],
)
def test_bad_distri_config(kwargs, message):
    with pytest.raises(dj.ConfigError, match=message):
        dj.DistriConfig(**kwargs)


def test_bad_layouts(setup):
    unet, _, _, sched = setup
    with pytest.raises(dj.ConfigError, match="CFG split needs an even number of devices, got 3"):
        dj.make_denoise_fn(unet, dj.DistriConfig(HEIGHT, WIDTH, devices=3), sched, 2)
    with pytest.raises(
        dj.ConfigError,
        match=r"height=136 does not split into 4 patches.*multiple of 64 "
        r"\(e.g. 128 or 192\)",
    ):
        dj.make_denoise_fn(unet, dj.DistriConfig(136, WIDTH, devices=4, split_batch=False), sched, 2)
    with pytest.raises(dj.ConfigError, match="devices=16 but JAX sees 8"):
        dj.make_denoise_fn(unet, dj.DistriConfig(HEIGHT, WIDTH, devices=16), sched, 2)
    # an odd count is fine without the CFG split, and one device ignores every parallel field
    dj.make_denoise_fn(unet, dj.DistriConfig(HEIGHT, WIDTH, devices=1, mode="no_sync"), sched, 2)


def test_latents_must_match_the_config(setup):
    unet, params, (latents, ehs, added), sched = setup
    denoise = dj.make_denoise_fn(unet, dj.DistriConfig(256, 256, devices=2), sched, 2)
    with pytest.raises(dj.DistriFusionError, match="latents are 16x24 but the DistriConfig is for 256x256"):
        denoise(params, latents, ehs, added)
    denoise = dj.make_denoise_fn(unet, dj.DistriConfig(HEIGHT, WIDTH, devices=2), sched, 2)
    with pytest.raises(
        dj.DistriFusionError,
        match=r"channels first \(NCHW\); this loop takes NHWC \[batch, 16, 24, 4\]"
        r": pass latents.transpose\(0, 2, 3, 1\)",
    ):
        denoise(params, latents.transpose(0, 3, 1, 2), ehs, added)
    with pytest.raises(dj.DistriFusionError, match="expected NHWC"):
        denoise(params, latents[0], ehs, added)


class NaNAtStep:
    """A scheduler whose step `at` writes a NaN into the first latent row (of every band)."""

    def __init__(self, scheduler, at):
        self.scheduler, self.at = scheduler, at

    def __getattr__(self, name):
        return getattr(self.scheduler, name)

    def step(self, state, eps, i, lat):
        lat, state = self.scheduler.step(state, eps, i, lat)
        return jnp.where(i == self.at, lat.at[:, :1].set(jnp.nan), lat), state


@pytest.mark.parametrize("devices, split_batch", [(4, False)])  # one device: tests/test_api_inputs.py
def test_nonfinite_step_names_the_first_step_that_went_nan(setup, devices, split_batch):
    unet, params, inputs, sched = setup
    config = dj.DistriConfig(HEIGHT, WIDTH, devices=devices, split_batch=split_batch, warmup_steps=0)
    clean = dj.make_denoise_fn(unet, config, sched, 4)
    clean(params, *inputs)
    assert clean.nonfinite_step() is None
    bad = dj.make_denoise_fn(unet, config, NaNAtStep(sched, 2), 4)
    out = np.asarray(bad(params, *inputs))
    assert bad.nonfinite_step() == 2 and not np.isfinite(out).all()
