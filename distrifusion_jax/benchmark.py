"""`distrifusion-jax benchmark`: parallel configurations side by side: compile time, latency, memory."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .config import DTYPE_NAMES, MODES, DistriConfig, read_json
from .models.unet import UNetConfig
from .distributed import devices as jax_devices
from .errors import CheckpointError, ConfigError, DistriFusionError
from .flags import seed_arg
from .preflight import check_steps
from .schedulers import make_scheduler

CONFIGS = ("single", "full_sync", "displaced", "naive_patch", "tensor")
# Execution order: per-device memory roughly ascending, so that each configuration raises the
# process-wide peak that `memory_stats()` reports (it cannot be reset) and its own peak is visible.
RUN_ORDER = ("naive_patch", "full_sync", "displaced", "tensor", "single")
TEXT_TOKENS = 77  # CLIP prompt length: the shape of the random prompt embeddings

# The smallest SDXL-shaped UNet that compiles in seconds on a CPU: a plain level then a cross-attention
# level (linear projections), text_time micro-conditioning as SDXL's. The tiny pipeline's VAE decodes.
TINY_UNET = {
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8, "attention_head_dim": [2, 4],
    "block_out_channels": [32, 64], "cross_attention_dim": 64, "layers_per_block": 1, "norm_num_groups": 16,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 32 + 6 * 8, "transformer_layers_per_block": [1, 1],
    "use_linear_projection": True,
}

NOTES = """\
  step: the whole jitted denoising loop (device-synchronised, after warm-up) / steps, median (min-max) of
    the repeats; e2e: the loop, from inputs on the devices to the final latents (median); +VAE: the loop
    then the VAE decode of its final latents on the first device (median); compile: Denoiser.last_compile_s
    of the first call (no persistent compilation cache).
  speedup, e2e+VAE: the baseline's median over this configuration's (per step; end to end with the VAE).
  Inputs: random noise and random prompt embeddings of the text encoders' shapes ([2B, 77, D] and
    pooled [2B, D], guidance batch [uncond; cond]); no text encoding is run or timed.
  full_sync: patch parallelism with every step synchronous; displaced: DistriFusion (warmup steps
    synchronous, then displaced); naive_patch: independent bands, no exchange."""


# ---- timing and random weights (also used by examples/benchmark_unet.py) ----
def timed(fn, repeats: int, warmup: int = 3) -> dict:
    """Median / min / max seconds of fn() (fn must block until the device is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def _draw_impl(seed, index, scale, offset, shape, dtype):
    # the leaf's key is derived inside the program: no per-leaf key slicing dispatched from the host
    key = jax.random.fold_in(jax.random.key(seed), index)
    return (offset + scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@functools.lru_cache(maxsize=None)
def _drawer(sharding):
    # one jitted drawer per output placement: with a replicated sharding every device draws the same
    # values itself, so no copy of the weights passes through the first device
    return jax.jit(_draw_impl, static_argnums=(4, 5), out_shardings=sharding)


def random_params(model, dtype, seed: int = 0, sharding=None):
    """Random parameters of a UNet or VAE generated on the device (kernels ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.02), others N(0, 0.02)), placed with `sharding` (default: the default device).

    One small compiled program per distinct shape: a single program drawing all 1,680 SDXL tensors
    takes minutes to compile.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(model.abstract_params())
    draw = _drawer(sharding)
    out = []
    for i, (path, a) in enumerate(leaves):
        name = path[-1].key
        scale, offset = ((1 / np.sqrt(np.prod(a.shape[:-1])), 0.0) if name == "kernel" else
                         (0.02, 1.0) if name == "scale" else (0.02, 0.0))
        out.append(draw(np.uint32(seed), np.uint32(i), np.float32(scale), np.float32(offset), tuple(a.shape),
                        jnp.dtype(dtype)))
    return jax.tree_util.tree_unflatten(treedef, out)


# ---- models and inputs ----
@dataclasses.dataclass
class Setup:
    """What every configuration shares: models, weights (replicated on the devices), inputs, scheduler."""

    devices: tuple
    unet: Any
    params: Any
    vae: Any
    vae_params: Any
    scheduler: Any
    inputs: tuple  # (latents [B, h, w, C] f32 scaled by the initial sigma, ehs [2B, 77, D], added_cond_kwargs)


def unet_config_of(args) -> UNetConfig:
    """The UNet's configuration (read before any weight, so bad sizes fail fast)."""
    from .models.presets import sdxl_base

    if args.random == "sdxl":
        return sdxl_base()
    if args.random == "tiny":
        return UNetConfig.from_dict(TINY_UNET)
    return UNetConfig.from_json(model_root(args.model) / "unet" / "config.json")


@functools.lru_cache(maxsize=None)
def model_root(model) -> Path:
    """The pipeline folder of --model (a hub id resolves through the local cache), with unet/ and vae/."""
    from .preflight import resolve_model_path

    root = resolve_model_path(model)
    missing = [c for c in ("unet", "vae") if not (root / c / "config.json").is_file()]
    if missing:
        raise CheckpointError(f"{root}: no {' or '.join(c + '/config.json' for c in missing)}; the benchmark needs "
                              "a pipeline folder with unet/ and vae/ (text encoders are not used)")
    return root


def scheduler_config(args) -> dict:
    """The pipeline's scheduler config, or SDXL's for random weights (the chosen class replaces its own)."""
    if args.model and (model_root(args.model) / "scheduler" / "scheduler_config.json").is_file():
        return read_json(model_root(args.model) / "scheduler" / "scheduler_config.json")
    text = resources.files(__package__).joinpath("configs", "sdxl-base-1.0", "scheduler", "scheduler_config.json")
    return json.loads(text.read_text())


def load_models(args, config: UNetConfig, replicated, first):
    """(unet, params replicated over the devices, vae, vae params on the first device)."""
    from .models import UNet2DConditionModel
    from .models.presets import sdxl_vae_config
    from .models.vae import AutoencoderKL, VAEConfig
    from .tiny import VAE as TINY_VAE

    dtype, vae_dtype = jnp.dtype(args.dtype), jnp.dtype(args.vae_dtype)
    if args.model:
        from .weights import load_unet, load_vae

        root = model_root(args.model)
        unet, params = load_unet(root / "unet", dtype=dtype)
        vae, vae_params = load_vae(root / "vae", dtype=vae_dtype)
        return unet, jax.device_put(params, replicated), vae, jax.device_put(vae_params, first)
    unet = UNet2DConditionModel(config, dtype=dtype, param_dtype=dtype)
    vae_config = sdxl_vae_config() if args.random == "sdxl" else VAEConfig.from_dict(TINY_VAE)
    vae = AutoencoderKL(vae_config, dtype=vae_dtype, param_dtype=vae_dtype)
    if args.random == "tiny":  # a few MB: drawn on the host faster than one small program per shape compiles
        return (unet, jax.device_put(unet.init_params(args.seed), replicated), vae,
                jax.device_put(vae.init_params(args.seed + 1), first))
    return (unet, random_params(unet, dtype, args.seed, replicated), vae,
            random_params(vae, vae_dtype, args.seed + 1, first))


def random_inputs(config: UNetConfig, args, sigma: float, sharding):
    """Noise latents and random prompt embeddings of the text encoders' shapes (no text encoders run)."""
    from .parallel.report import Case, abstract_inputs

    case = Case(config, args.height, args.width, 1, dtype=args.dtype, batch=args.batch)
    lat, ehs, added = abstract_inputs(case)
    rng = np.random.default_rng(args.seed)
    normal = lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype)
    latents, ehs = normal(lat) * sigma, normal(ehs)
    if added is not None:
        ids = added["time_ids"]
        # SDXL's six micro-conditioning ids: (original size, crop top-left, target size)
        sizes = [args.height, args.width, 0, 0, args.height, args.width]
        time_ids = jnp.asarray(np.tile(sizes, (ids.shape[0], 1)) if ids.shape[1] == 6 else
                               rng.standard_normal(ids.shape), ids.dtype)
        added = {"text_embeds": normal(added["text_embeds"]), "time_ids": time_ids}
    return jax.device_put((latents, ehs, added), sharding)


def build(args, config: UNetConfig, devices) -> Setup:
    """Weights and inputs on the devices, replicated once and shared by every configuration."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    replicated = NamedSharding(Mesh(np.asarray(devices), ("devices",)), P())
    first = jax.sharding.SingleDeviceSharding(devices[0])
    unet, params, vae, vae_params = load_models(args, config, replicated, first)
    scheduler = make_scheduler(args.scheduler, scheduler_config(args))
    inputs = random_inputs(config, args, scheduler.init_noise_sigma(args.steps), replicated)
    return Setup(tuple(devices), unet, jax.block_until_ready(params), vae, vae_params, scheduler, inputs)


# ---- the configurations ----
def distri_configs(args, n: int) -> dict:
    """name -> DistriConfig, or a string saying why the configuration is skipped."""
    base = dict(height=args.height, width=args.width, split_batch=not args.no_split_batch)
    out = {"single": DistriConfig(**base, devices=1)}
    multi = {
        # every step synchronous: warmup covering the run compiles one phase (the same computation)
        "full_sync": dict(mode="full_sync", warmup_steps=args.steps),
        "displaced": dict(mode=args.mode, warmup_steps=args.warmup_steps),
        "naive_patch": dict(parallelism="naive_patch"),
        "tensor": dict(parallelism="tensor"),
    }
    for name, fields in multi.items():
        if n < 2:
            out[name] = "needs at least 2 devices"
            continue
        try:
            out[name] = DistriConfig(**base, devices=n, **fields)
        except ConfigError as e:
            if name != "tensor":
                raise
            out[name] = f"this version's DistriConfig does not accept parallelism='tensor' ({e})"
    return {k: v for k, v in out.items() if k in args.configs}


def overhead_config(args, n: int) -> Optional[DistriConfig]:
    """The displaced configuration whose step `--overhead` times (None: not asked for, or one device)."""
    if not args.overhead or n < 2:
        return None
    return DistriConfig(args.height, args.width, devices=n, split_batch=not args.no_split_batch, mode=args.mode)


def check_configs(configs: dict, unet_config: UNetConfig) -> None:
    """User errors (a size that does not split, an odd device count) before any weight is made."""
    for name, dc in configs.items():
        if isinstance(dc, DistriConfig) and name != "tensor":
            dc.check_model(unet_config, len(dc.resolve_devices()))


def placed(d, setup: Setup):
    """(params, latents, ehs, added) placed as the Denoiser's program expects them, without copying
    the weights: they are already replicated on these devices."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from .parallel import PATCH

    arrays = (setup.params,) + tuple(setup.inputs)
    if len(d.devices) == 1:  # its shard of each replicated array
        return jax.tree.map(lambda a: _shard_on(a, d.devices[0]), arrays)
    if d.mesh is None:  # another layout (tensor parallelism) places them in the call, caching the weights
        return arrays
    params, lat, ehs, added = jax.device_put(arrays, NamedSharding(d.mesh, P()))
    return params, jax.device_put(lat, NamedSharding(d.mesh, P(None, PATCH))), ehs, added


def mesh_of(d) -> str:
    """The device layout "cfg x (patch or tensor)" of a Denoiser, "1" for one device."""
    n = len(d.devices)
    return f"{d.cfg_size}x{n // d.cfg_size}" if n > 1 else "1"


def _shard_on(a, device):
    return next(s.data for s in a.addressable_shards if s.device == device)


def _program(d):
    """The program the Denoiser compiled on its first call (a benchmark calls it with one input shape)."""
    return next(iter(d._executables.values()))  # the Denoiser keeps no public handle on it


# ---- memory ----
def peak_marks(devices) -> Optional[list]:
    """Each device's `peak_bytes_in_use` (process-wide high-water mark), or None where not reported."""
    marks = [(dev.memory_stats() or {}).get("peak_bytes_in_use") for dev in devices]
    return None if None in marks else marks


def program_bytes(compiled) -> Optional[int]:
    """Per-device bytes of a compiled program by XLA's memory analysis: arguments + outputs + temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               + m.generated_code_size_in_bytes - m.alias_size_in_bytes)


def memory_entry(before: Optional[list], after: Optional[list], analysed: Optional[int]) -> dict:
    """Peak device memory of one configuration, from memory_stats where available, else the analysis.

    memory_stats' peak cannot be reset: the devices whose mark rose during this configuration give
    its peak exactly; if none rose, an earlier configuration's peak bounds it from above. The marks
    are read around the first call, so scratch memory of compilation (GPU autotuning) counts too.
    """
    if before is None or after is None:
        return {"peak_bytes": analysed, "peak_source": "memory_analysis", "program_bytes": analysed}
    rose = [a for b, a in zip(before, after) if a > b]
    return {"peak_bytes": max(rose or after), "peak_source": "memory_stats", "peak_exact": bool(rose),
            "program_bytes": analysed}


# ---- one configuration ----
def run_loop(dc: DistriConfig, setup: Setup, args) -> tuple:
    """Compile, time and measure the memory of one configuration's denoising loop: (result, call)."""
    from .denoise import Denoiser

    d = Denoiser(setup.unet, dc, setup.scheduler, args.steps, guidance_scale=args.guidance_scale)
    params, lat, ehs, added = placed(d, setup)
    call = lambda: jax.block_until_ready(d(params, lat, ehs, added))
    before = peak_marks(d.devices)
    t0 = time.perf_counter()
    call()
    first, compile_s = time.perf_counter() - t0, d.last_compile_s
    loop = timed(call, args.repeats, warmup=1)
    result = dict(devices=len(d.devices), mesh=mesh_of(d), parallelism=dc.parallelism, mode=dc.mode,
                  warmup_steps=dc.warmup_steps, compile_s=compile_s, first_call_s=first, e2e_s=loop,
                  step_ms={k[:-2]: 1e3 * loop[k] / args.steps for k in ("median_s", "min_s", "max_s")})
    result.update(memory_entry(before, peak_marks(d.devices), program_bytes(_program(d))))
    return result, call


def make_decode(setup: Setup):
    """Final latents -> image on the first device, as the pipeline decodes (latents / scaling_factor)."""
    vae, device = setup.vae, setup.devices[0]
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, (z / vae.config.scaling_factor).astype(vae.dtype),
                                            method=vae.decode))
    return lambda z: jax.block_until_ready(decode(setup.vae_params, jax.device_put(z, device)))


def _failure(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return f"does not fit in device memory ({text[:200]})"
    return f"failed: {type(e).__name__}: {text[:300]}"


def run_all(configs: dict, setup: Setup, args, log) -> tuple:
    """Every configuration's loop (in RUN_ORDER), then the same loops followed by the VAE decode.

    Returns ({name: result} in CONFIGS order, VAE decode timings or None).
    """
    results, calls = {}, {}
    for name in sorted(configs, key=RUN_ORDER.index):
        dc = configs[name]
        if isinstance(dc, str):
            results[name] = {"skipped": dc}
            log(f"{name}: skipped, {dc}")
            continue
        log(f"{name}: compiling and timing the {args.steps}-step loop on {len(dc.resolve_devices())} device(s)")
        try:
            results[name], calls[name] = run_loop(dc, setup, args)
        except Exception as e:  # noqa: BLE001 - one configuration failing (memory, unsupported) is reported
            results[name] = {"skipped": _failure(e)}
            log(f"{name}: skipped, {results[name]['skipped']}")
    vae = None
    if calls:  # the decode runs after every loop so its activations do not mask the loops' memory peaks
        decode, latents = make_decode(setup), next(iter(calls.values()))()
        t0 = time.perf_counter()
        decode(latents)
        vae = dict(first_call_s=time.perf_counter() - t0, **timed(lambda: decode(latents), args.repeats, warmup=1))
    for name, call in calls.items():
        log(f"{name}: timing the loop followed by the VAE decode")
        results[name]["e2e_decode_s"] = timed(lambda: decode(call()), args.repeats, warmup=1)
    return {name: results[name] for name in CONFIGS if name in results}, vae


def add_ratios(results: dict) -> Optional[str]:
    """Speedups (baseline median / this one) and memory (this / baseline) vs single, else full_sync."""
    measured = [n for n in ("single", "full_sync") if "step_ms" in results.get(n, {})]
    if not measured:
        return None
    base = results[measured[0]]
    for r in results.values():
        if "step_ms" not in r:
            continue
        r["vs_baseline"] = {
            "step_speedup": base["step_ms"]["median"] / r["step_ms"]["median"],
            "e2e_decode_speedup": base["e2e_decode_s"]["median_s"] / r["e2e_decode_s"]["median_s"],
            "compile_ratio": r["compile_s"] / base["compile_s"],
        }
        if r.get("peak_bytes") and base.get("peak_bytes"):
            r["vs_baseline"]["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"]
    return measured[0]


# ---- the displaced step's overhead ----
def measure_overhead(dc: DistriConfig, setup: Setup, args) -> dict:
    """One displaced step vs one naive-patch step of the same shapes (one noise prediction each).

    Both are jitted shard_map programs over the same mesh and bands; the displaced one reads the
    stale state (zeros of its shapes: the cost does not depend on the values) and writes the next
    one, as a step of the loop does. Medians of `args.repeats` device-synchronised runs.
    """
    from jax.sharding import NamedSharding, PartitionSpec as P

    from .denoise import Denoiser
    from .parallel import CFG, PATCH

    d = Denoiser(setup.unet, dc, setup.scheduler, args.steps, guidance_scale=args.guidance_scale)
    if d.mesh is None or d.patches == 1:
        return {"skipped": "one band per device group: nothing is displaced"}
    params, lat, ehs, added = placed(d, setup)
    t = d.timesteps[d.num_steps // 2]
    plain, displaced = d.model(None), d.model(d.plan("displaced"))
    batch, band, state = (P(CFG) if d.cfg_size == 2 else P()), P(None, PATCH), P((CFG, PATCH))
    shard = lambda fn, specs, out: jax.jit(jax.shard_map(fn, mesh=d.mesh, in_specs=specs, out_specs=out))
    naive = shard(lambda p, x, e, a: d.eps(plain, p, None, x, t, e, a)[0], (P(), band, batch, batch), band)
    step = shard(lambda p, s, x, e, a: d.eps(displaced, p, s, x, t, e, a), (P(), state, band, batch, batch),
                 (band, state))
    # the state's shapes from a first displaced step without one (Flax starts a missing collection at zeros)
    first = shard(lambda p, x, e, a: d.eps(displaced, p, None, x, t, e, a)[1], (P(), band, batch, batch), state)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=NamedSharding(d.mesh, state)),
                         jax.eval_shape(first, params, lat, ehs, added))
    out = {"devices": len(d.devices), "mesh": f"{d.cfg_size}x{d.patches}", "mode": dc.mode}
    for name, fn, fargs in (("naive_patch", naive, (params, lat, ehs, added)),
                            ("displaced", step, (params, zeros, lat, ehs, added))):
        t0 = time.perf_counter()
        compiled = fn.lower(*fargs).compile()
        compile_s = time.perf_counter() - t0
        r = timed(lambda: jax.block_until_ready(compiled(*fargs)), args.repeats, warmup=2)
        out[name] = dict(compile_s=compile_s, step_ms={k[:-2]: 1e3 * r[k] for k in ("median_s", "min_s", "max_s")},
                         repeats=r["repeats"])
    out["ratio"] = out["displaced"]["step_ms"]["median"] / out["naive_patch"]["step_ms"]["median"]
    return out


# ---- abstract check ----
def dry_run(configs: dict, unet_config: UNetConfig, args, log) -> dict:
    """Build every configuration and lower its loop with abstract weights and inputs (no memory, no compile)."""
    from .denoise import Denoiser
    from .models import UNet2DConditionModel
    from .parallel.report import Case, abstract_inputs
    dtype = jnp.dtype(args.dtype)
    unet = UNet2DConditionModel(unet_config, dtype=dtype, param_dtype=dtype)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), unet.abstract_params())
    count = sum(math.prod(a.shape) for a in jax.tree.leaves(params))
    lat, ehs, added = abstract_inputs(Case(unet_config, args.height, args.width, 1, dtype=args.dtype,
                                           batch=args.batch))
    scheduler = make_scheduler(args.scheduler, scheduler_config(args))
    results = {}
    for name, dc in configs.items():
        if isinstance(dc, str):
            results[name] = {"skipped": dc}
            continue
        t0 = time.perf_counter()
        try:
            d = Denoiser(unet, dc, scheduler, args.steps, guidance_scale=args.guidance_scale)
            # what the first call compiles (the Denoiser keeps no public handle on its jitted loop)
            d._jitted.lower(layout(d, params), lat, ehs, added, jnp.float32(args.guidance_scale))
            results[name] = {"lowered": True, "lower_s": time.perf_counter() - t0, "devices": len(d.devices),
                             "mesh": mesh_of(d)}
        except Exception as e:  # noqa: BLE001
            results[name] = {"skipped": _failure(e)}
        log(f"{name}: {'lowered' if 'lowered' in results[name] else results[name]['skipped']}")
    return {"unet_parameters": count, "configs": results}


def format_dry_run(report: dict) -> str:
    """One line per configuration: built and lowered (with the tracing time), or why not."""
    lines = [f"{report['model']} ({report['unet_parameters']:,} UNet parameters): {report['width']}x"
             f"{report['height']}, {report['steps']} steps {report['scheduler']}, {report['dtype']}, "
             f"{report['devices']} {report['platform']} devices; abstract weights, nothing compiled or run"]
    for name, r in report["configs"].items():
        state = f"lowered in {r['lower_s']:.1f} s" if "lowered" in r else f"skipped: {r['skipped']}"
        lines.append(f"  {name:<12}{r.get('devices', ''):>3} {r.get('mesh', ''):>5}  {state}")
    return "\n".join(lines)


def layout(d, params):
    """Abstract weights in the layout the Denoiser's program reads (tensor parallelism has its own)."""
    if getattr(d, "tensor", None) is None:
        return params
    from .tensor_parallel import to_layout

    return jax.eval_shape(to_layout, params)


# ---- output ----
def fmt_bytes(n) -> str:
    """Bytes as kB / MB / GB (powers of 10), '-' when unknown."""
    if not n:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def format_table(report: dict) -> str:
    """The configurations side by side, the overhead measurement and the notes, as text."""
    lines = [f"{report['model']}: {report['width']}x{report['height']} (latent {report['width'] // 8}x"
             f"{report['height'] // 8}), batch {report['batch']}, {report['steps']} steps {report['scheduler']}, "
             f"{report['dtype']} (VAE {report['vae_dtype']}), guidance {report['guidance_scale']}",
             f"{report['devices']} x {report['device_kind']} ({report['platform']}), JAX {report['jax']}, "
             f"{report['repeats']} repeats; baseline: {report.get('baseline') or '-'}; peak memory: "
             f"{report['memory_source']}", ""]
    head = (f"{'config':<12}{'dev':>4}{'mesh':>6}{'compile s':>11}{'step ms (min-max)':>24}{'e2e s':>11}"
            f"{'+VAE s':>9}{'peak mem':>12}{'program':>10}{'speedup':>9}{'e2e+VAE':>9}")
    lines += [head, "-" * len(head)]
    for name, r in report["configs"].items():
        if "step_ms" not in r:
            lines.append(f"{name:<12}  skipped: {r.get('skipped', '?')}")
            continue
        s, v = r["step_ms"], r.get("vs_baseline", {})
        step = f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"
        mem = ("<=" if r.get("peak_exact") is False else "") + fmt_bytes(r.get("peak_bytes"))
        ratio = lambda k: f"{v[k]:.2f}x" if k in v else "-"
        lines.append(f"{name:<12}{r['devices']:>4}{r['mesh']:>6}{r['compile_s']:>11.1f}{step:>24}"
                     f"{r['e2e_s']['median_s']:>11.3f}{r['e2e_decode_s']['median_s']:>9.3f}{mem:>12}"
                     f"{fmt_bytes(r.get('program_bytes')):>10}"
                     f"{ratio('step_speedup'):>9}{ratio('e2e_decode_speedup'):>9}")
    if report.get("vae_decode_s"):
        vae = report["vae_decode_s"]
        lines.append(f"VAE decode alone: {vae['median_s']:.3f} s (first call, compiling: {vae['first_call_s']:.1f} s)")
    o = report.get("overhead")
    if o:
        lines.append("")
        if "ratio" in o:
            n, dd = o["naive_patch"]["step_ms"], o["displaced"]["step_ms"]
            lines.append(f"displaced-step overhead ({o['devices']} devices, mesh {o['mesh']}, {o['mode']}, one noise "
                         f"prediction, median of {o['naive_patch']['repeats']}): displaced {dd['median']:.2f} ms "
                         f"({dd['min']:.2f}-{dd['max']:.2f}) / naive patch {n['median']:.2f} ms "
                         f"({n['min']:.2f}-{n['max']:.2f}) = {o['ratio']:.3f}")
        else:
            lines.append(f"displaced-step overhead: skipped, {o.get('skipped')}")
    notes = NOTES
    if report["platform"] == "cpu":
        notes += ("\n  CPU: the fake devices share this host's cores, so speedups between device counts mean "
                  "nothing; the\n    displaced/naive ratio is the displaced machinery's extra work: its compute "
                  "and the CPU runtime's\n    in-process exchanges between the fake devices (no interconnect).")
    notes += ("\n  program: per-device bytes of the compiled loop by XLA's memory analysis (arguments + outputs + "
              "temporaries).")
    if report["memory_source"] == "memory_analysis":
        notes += "\n  peak mem: this backend reports no memory_stats: the program figure."
    else:
        notes += ("\n  peak mem: max over the devices of memory_stats' peak_bytes_in_use during the loop (every "
                  "resident buffer:\n    the replicated weights too); '<=' where the process-wide peak was set "
                  "earlier and bounds it.")
    return "\n".join(lines + ["", notes])


# ---- command line ----
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by the subcommand and examples/benchmark.py)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="SDXL pipeline folder (or hub id) with unet/ and vae/; text encoders are not used")
    src.add_argument("--random", choices=("sdxl", "tiny"),
                     help="random weights, no download: the full-size SDXL UNet + VAE (made on the devices), or "
                          "a tiny SDXL-shaped UNet with the tiny pipeline's VAE (seconds on a CPU)")
    p.add_argument("--height", type=int, default=None, help="pixels (default 1024; 256 with --random tiny)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: --height)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "euler", "dpm-solver"])
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="UNet weights and compute")
    p.add_argument("--vae-dtype", default="float32", choices=DTYPE_NAMES, help="VAE decode (default float32)")
    p.add_argument("--devices", type=int, default=None,
                   help="devices for the parallel configurations (default: all); on a CPU host, N fake devices")
    p.add_argument("--warmup-steps", type=int, default=4, help="synchronous steps of the displaced configuration")
    p.add_argument("--mode", default="corrected_async_gn", choices=MODES, help="the displaced configuration's mode")
    p.add_argument("--no-split-batch", action="store_true", help="do not split the guidance batch across devices")
    p.add_argument("--batch", type=int, default=1, help="images per run")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)} (default: all), or 'none' with --overhead")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each loop after one warm-up run")
    p.add_argument("--overhead", action="store_true",
                   help="also time one displaced step against one naive-patch step of the same shapes")
    p.add_argument("--dry-run", action="store_true",
                   help="only build each configuration and lower its loop with abstract weights (no memory)")
    p.add_argument("--seed", type=seed_arg, default=0, help="0 <= SEED < 2^63 (default: 0)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (its folder must exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the `benchmark` subcommand on an argparse subparsers object."""
    p = sub.add_parser("benchmark", help="compare parallel configurations: compile time, step latency, end to end, "
                                         "memory", description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def check_args(args) -> None:
    """Fill the defaults that depend on the model and refuse impossible values (one-line errors)."""
    args.height = args.height or (256 if args.random == "tiny" else 1024)
    args.width = args.width or args.height
    args.configs = tuple(c.strip() for c in args.configs.split(",") if c.strip() not in ("", "none"))
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not (args.configs or args.overhead):
        raise DistriFusionError(f"--configs {','.join(unknown) or 'none'}: choose from {','.join(CONFIGS)} "
                                "('none' only with --overhead)")
    for name in ("steps", "repeats", "batch"):
        if getattr(args, name) < 1:
            raise DistriFusionError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.devices is not None and args.devices < 1:
        raise DistriFusionError(f"--devices {args.devices}: must be at least 1")
    if args.json:
        check_json_path(args.json, args.overwrite)


def check_json_path(path, overwrite: bool = False) -> None:
    """The report can be written there: checked before the run, not after it (minutes on a GPU)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"--json {path} is a folder; name a file in it, e.g. {p / 'report.json'}")
    if p.exists() and not overwrite:
        raise ConfigError(f"--json {path} already exists; pass --overwrite to replace it, or choose another name")
    if not p.parent.is_dir():
        raise ConfigError(f"--json {path}: folder {p.parent} does not exist; create it first (mkdir -p {p.parent}) "
                          "or write elsewhere")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--json {path}: folder {p.parent} is not writable; write the report elsewhere")


def run(args) -> dict:
    """Run the benchmark, print the table and write the JSON; returns the report dict."""
    if args.devices:
        try:  # only the CPU backend reads it, and only before JAX's first computation
            jax.config.update("jax_num_cpu_devices", args.devices)
        except RuntimeError:
            pass  # already started (a caller in this process): the devices JAX has are used
    check_args(args)
    available = jax_devices()
    if args.devices and args.devices > len(available):
        raise DistriFusionError(f"--devices {args.devices} but JAX sees {len(available)} ({available[0].platform})")
    devices = available[: args.devices or len(available)]
    unet_config = unet_config_of(args)
    configs = distri_configs(args, len(devices))
    check_configs(dict(configs, overhead=overhead_config(args, len(devices))), unet_config)
    check_steps(make_scheduler(args.scheduler, scheduler_config(args)), args.steps, "--steps")
    report = dict(model=args.model or f"random {args.random}", height=args.height, width=args.width,
                  batch=args.batch, steps=args.steps, scheduler=args.scheduler, dtype=args.dtype,
                  vae_dtype=args.vae_dtype, guidance_scale=args.guidance_scale, warmup_steps=args.warmup_steps,
                  mode=args.mode, split_batch=not args.no_split_batch, devices=len(devices),
                  device_kind=devices[0].device_kind, platform=devices[0].platform, jax=jax.__version__,
                  repeats=args.repeats, date=time.strftime("%Y-%m-%d"),
                  inputs=f"random prompt embeddings [{2 * args.batch}, {TEXT_TOKENS}, "
                         f"{unet_config.cross_attention_dim[0]}] and pooled embeddings (no text encoders)")
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)
    if args.dry_run:
        report.update(dry_run(configs, unet_config, args, log))
        print(format_dry_run(report))
    else:
        with cold_compiles():
            report.update(measure(configs, unet_config, devices, args, log))
        print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        log(f"wrote {args.json}")
    return report


def measure(configs: dict, unet_config: UNetConfig, devices, args, log) -> dict:
    """The measured part of the report: configurations, ratios, VAE decode, overhead."""
    log(f"making the weights and inputs on {len(devices)} {devices[0].platform} device(s)")
    setup = build(args, unet_config, devices)
    out = {"unet_parameters": sum(a.size for a in jax.tree.leaves(setup.params))}
    out["configs"], out["vae_decode_s"] = run_all(configs, setup, args, log)
    out["baseline"] = add_ratios(out["configs"])
    measured = [r for r in out["configs"].values() if "peak_source" in r]
    out["memory_source"] = measured[0]["peak_source"] if measured else "-"
    if args.overhead:
        log("timing one displaced step against one naive-patch step")
        dc = overhead_config(args, len(devices))
        out["overhead"] = measure_overhead(dc, setup, args) if dc else {"skipped": "needs at least 2 devices"}
    return out


@contextlib.contextmanager
def cold_compiles():
    """Compile times measured without JAX's persistent compilation cache (restored afterwards)."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
