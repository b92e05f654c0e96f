"""Two of the benchmark's extra checks: one displaced step against one naive-patch step (the displaced
machinery's overhead), and the dry run (every configuration built and lowered with abstract weights)."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..config import DistriConfig
from ..denoise import Denoiser
from ..models.unet import UNetConfig
from ..parallel import CFG, PATCH
from ..schedulers import make_scheduler
from .abstract import Case, abstract_inputs, abstract_model, lower_loop
from .bench_options import BenchmarkOptions
from .bench_run import failure
from .bench_setup import Setup, mesh_of, placed, scheduler_config
from .timing import first_call, timed


def measure_overhead(dc: DistriConfig, setup: Setup, o: BenchmarkOptions) -> dict:
    """One displaced step vs one naive-patch step of the same shapes (one noise prediction each).

    Both are jitted shard_map programs over the same mesh and bands; the displaced one reads the
    stale state (zeros of its shapes: the cost does not depend on the values) and writes the next
    one, as a step of the loop does. Medians of `o.repeats` device-synchronised runs.
    """
    d = Denoiser(setup.unet, dc, setup.scheduler, o.steps, guidance_scale=o.guidance_scale)
    if d.mesh is None or d.patches == 1:
        return {"skipped": "one band per device group: nothing is displaced"}
    params, lat, ehs, added = placed(d, setup)
    t = d.timesteps[d.num_steps // 2]
    plain, displaced = d.model(None), d.model(d.plan("displaced"))
    batch, band, state = (P(CFG) if d.cfg_size == 2 else P()), P(None, PATCH), P((CFG, PATCH))
    shard = lambda fn, specs, out: jax.jit(jax.shard_map(fn, mesh=d.mesh, in_specs=specs, out_specs=out))
    naive = shard(lambda p, x, e, a: d.eps(plain, p, None, x, t, e, a)[0], (P(), band, batch, batch), band)
    step = shard(
        lambda p, s, x, e, a: d.eps(displaced, p, s, x, t, e, a),
        (P(), state, band, batch, batch),
        (band, state),
    )
    # the state's shapes from a first displaced step without one (Flax starts a missing collection at zeros)
    first = shard(
        lambda p, x, e, a: d.eps(displaced, p, None, x, t, e, a)[1], (P(), band, batch, batch), state
    )
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype, device=NamedSharding(d.mesh, state)),
        jax.eval_shape(first, params, lat, ehs, added),
    )
    out = {"devices": len(d.devices), "mesh": f"{d.cfg_size}x{d.patches}", "mode": dc.mode}
    for name, fn, fargs in (
        ("naive_patch", naive, (params, lat, ehs, added)),
        ("displaced", step, (params, zeros, lat, ehs, added)),
    ):
        compiled, compile_s = first_call(lambda: fn.lower(*fargs).compile())
        r = timed(lambda: jax.block_until_ready(compiled(*fargs)), o.repeats, warmup=2)
        out[name] = dict(
            compile_s=compile_s,
            step_ms={k[:-2]: 1e3 * r[k] for k in ("median_s", "min_s", "max_s")},
            repeats=r["repeats"],
        )
    out["ratio"] = out["displaced"]["step_ms"]["median"] / out["naive_patch"]["step_ms"]["median"]
    return out


def dry_run(configs: dict, unet_config: UNetConfig, o: BenchmarkOptions, log) -> dict:
    """Build every configuration and lower its loop with abstract weights and inputs (no memory, no compile)."""
    unet, params = abstract_model(unet_config, o.dtype)
    count = sum(math.prod(a.shape) for a in jax.tree.leaves(params))
    lat, ehs, added = abstract_inputs(Case(unet_config, o.height, o.width, 1, dtype=o.dtype, batch=o.batch))
    scheduler = make_scheduler(o.scheduler, scheduler_config(o))
    results = {}
    for name, dc in configs.items():
        if isinstance(dc, str):
            results[name] = {"skipped": dc}
            continue
        t0 = time.perf_counter()
        try:
            d = Denoiser(unet, dc, scheduler, o.steps, guidance_scale=o.guidance_scale)
            lower_loop(d, params, lat, ehs, added)  # what the first call compiles
            results[name] = {
                "lowered": True,
                "lower_s": time.perf_counter() - t0,
                "devices": len(d.devices),
                "mesh": mesh_of(d),
            }
        except Exception as e:  # noqa: BLE001
            results[name] = {"skipped": failure(e)}
        log(f"{name}: {'lowered' if 'lowered' in results[name] else results[name]['skipped']}")
    return {"unet_parameters": count, "configs": results}
