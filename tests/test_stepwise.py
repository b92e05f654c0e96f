"""The loop with progress: one compiled program per step, called from the host, against the one-program loop.

With a progress callback the Denoiser runs its steps as host calls of compiled programs (no host callback
inside a program, so every program can be cached), carrying the latents, the scheduler state and the stale
state between calls. It must give the loop's result on every kind of mesh and scheduler, report each step,
and keep the stale state on the devices, sharded.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import distrifusion_jax as dj
from distrifusion_jax.parallel import CFG, PATCH
from helpers import micro_setup, rel_l2, sdxl_scheduler_config

STEPS = 4
TOL = 1e-5  # float32 relative L2 between two compiled programs of one computation; measured 0 (bit-equal) on CPU

# name -> (image height, DistriConfig fields, scheduler): every mesh kind, displaced steps taken
CASES = {
    "one device": (64, dict(devices=1), "ddim"),
    "cfg split 2x2": (128, dict(devices=4, warmup_steps=1), "dpm-solver"),
    "no split 1x4": (128, dict(devices=4, split_batch=False, warmup_steps=1), "euler"),
    "guidance off 1x2": (128, dict(devices=2, do_classifier_free_guidance=False, warmup_steps=1), "ddim"),
    "odd 1x3": (96, dict(devices=3, split_batch=False, warmup_steps=1), "dpm-solver"),
    "naive alternate 2x2": (
        128,
        dict(devices=4, parallelism="naive_patch", split_scheme="alternate"),
        "ddim",
    ),
    "tensor 2x2": (64, dict(devices=4, parallelism="tensor"), "euler"),
    "all synchronous 2x2": (128, dict(devices=4, warmup_steps=STEPS), "ddim"),
}


def run_both(height, fields, scheduler):
    unet, params, (latents, ehs, added), _ = micro_setup(height, 64)
    config = dj.DistriConfig(height, 64, **fields)
    if not config.do_classifier_free_guidance:
        ehs, added = ehs[1:], {k: v[1:] for k, v in added.items()}
    sched = dj.make_scheduler(scheduler, sdxl_scheduler_config())
    loop = dj.make_denoise_fn(unet, config, sched, num_inference_steps=STEPS)
    steps = dj.make_denoise_fn(unet, config, sched, num_inference_steps=STEPS)
    seen = []
    steps.progress = lambda i, n: seen.append((i, n))
    want = np.asarray(loop(params, latents, ehs, added))
    got = steps(params, latents, ehs, added)
    return want, got, seen, steps


@pytest.mark.parametrize("case", list(CASES))
def test_stepwise_equals_the_loop(case):
    want, got, seen, d = run_both(*CASES[case])
    err = rel_l2(np.asarray(got), want)
    print(f"{case}: stepwise vs one-program loop, relative L2 {err:.1e}")
    assert err <= TOL
    assert seen == [(i, STEPS) for i in range(STEPS + 1)]  # 0 once compiled, then each finished step
    assert d.nonfinite_step() is None
    if d.mesh is not None:
        assert got.sharding.spec == P(None, PATCH)  # the result keeps the loop's row sharding


def test_stepwise_reports_where_it_went_nonfinite():
    unet, params, (latents, ehs, added), sched = micro_setup(128, 64)
    d = dj.make_denoise_fn(unet, dj.DistriConfig(128, 64, devices=2, warmup_steps=1), sched, STEPS)
    d.progress = lambda i, n: None
    bad = latents.at[0, 0, 0, 0].set(jnp.nan)
    d(params, bad, ehs, added)
    assert d.nonfinite_step() == 0


@pytest.mark.parametrize("fields", [dict(devices=4, warmup_steps=1), dict(devices=4, split_batch=False)])
def test_stale_state_stays_sharded_between_calls(fields):
    """The carry between step programs: each device's stale buffers and scheduler state stay on that device
    (one slice of a leading device axis each); nothing is gathered to one device."""
    unet, params, (latents, ehs, added), sched = micro_setup(128, 64)
    d = dj.make_denoise_fn(unet, dj.DistriConfig(128, 64, **fields), sched, STEPS)
    args = (params, latents, ehs, added, jnp.float32(5.0))
    args = tuple(jax.device_put(a, jax.NamedSharding(d.mesh, s)) for a, s in zip(args, d.in_specs()))
    lat, sstate, stale, i = d._executable("start", *args)(*args)
    varying = (CFG, PATCH) if d.cfg_size == 2 else (PATCH,)
    leaves = jax.tree.leaves(stale)
    assert leaves, "a displaced run carries stale state"
    for leaf in leaves + jax.tree.leaves(sstate):
        assert len(leaf.addressable_shards) == 4 and leaf.addressable_shards[0].data.shape[0] == 1
    assert all(leaf.sharding.spec == P(varying) for leaf in leaves)
    assert lat.sharding.spec == P(None, PATCH) and int(i) == 0
