"""Stale-state options (DistriConfig.stale_kv, stale_kv_dtype): memory vs accuracy, measured.

    python -m distrifusion_jax.tools.stale_options              # the micro-sdxl UNet, 8 fake CPU devices
    python -m distrifusion_jax.tools.stale_options --sdxl 3840  # also SDXL base's stale bytes per device at 3840^2

For each option: the per-device stale state (self-attention part and total, from the traced shapes
of the state the loop carries) and the relative L2 error of the final latents of a displaced run
(10 DDIM steps, warmup 2, mesh 2 x 4) against the single-device loop and against the default
displaced run. 40-60 s on 2 CPU cores, almost all of it compiling the 7 loops.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from ..config import DistriConfig
from ..denoise import make_denoise_fn
from ..flags import run_command
from ..models.presets import scheduler_preset, sdxl_base, unet_preset
from ..models.unet import UNet2DConditionModel
from ..schedulers import make_scheduler
from .abstract import Case, abstract_inputs, abstract_model, make_denoiser, nbytes, trace_displaced_step
from .comm import state_by_kind
from .command import cpu_devices, parser, positive

OPTIONS = {  # name -> DistriConfig fields
    "default (kv, compute dtype)": {},
    "bfloat16": dict(stale_kv_dtype="bfloat16"),
    "float8_e4m3fn": dict(stale_kv_dtype="float8_e4m3fn"),
    "int8": dict(stale_kv_dtype="int8"),
    "hidden": dict(stale_kv="hidden"),
    "hidden + int8": dict(stale_kv="hidden", stale_kv_dtype="int8"),
}
HEIGHT, WIDTH, STEPS, WARMUP, DEVICES = 128, 192, 10, 2, 8
# compile time dominates here (7 loops of a tiny UNet); LLVM's optimisations off halve it
XLA_FLAGS = "--xla_backend_optimization_level=0"


def stale_bytes(config, height, width, devices, dtype, **options) -> tuple:
    """(self-attention bytes, total bytes) of one device's stale state, by abstract evaluation."""
    unet, params = abstract_model(config, dtype)
    case = Case(config, height, width, devices, True, dtype, **options)
    _, seen = trace_displaced_step(make_denoiser(unet, case), params, abstract_inputs(case))
    kinds = {k: sum(nbytes(a) for a in v) for k, v in state_by_kind(seen["state"]).items()}
    return kinds["kv"], sum(kinds.values())


def micro_setup(height: int, width: int) -> tuple:
    """(unet, params, (latents, ehs, added), DDIM scheduler): the micro-sdxl UNet (seed 0) and random inputs
    with the CFG batch (7 text tokens, 3 time ids), as the tests' runs of the same size."""
    unet = UNet2DConditionModel(unet_preset("micro-sdxl"))
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((1, height // 8, width // 8, 4)), jnp.float32)
    ehs = jnp.asarray(rng.standard_normal((2, 7, unet.config.cross_attention_dim[0])), jnp.float32)
    added = {
        "text_embeds": jnp.asarray(rng.standard_normal((2, 8)), jnp.float32),
        "time_ids": jnp.asarray([[float(height), float(width), 0.0]] * 2, jnp.float32),
    }
    return unet, unet.init_params(seed=0), (latents, ehs, added), make_scheduler("ddim", scheduler_preset())


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def final_latents() -> dict:
    """name -> the final latents of the single-device run and of each option's displaced run."""
    unet, params, inputs, sched = micro_setup(HEIGHT, WIDTH)
    runs = {"single device": dict(devices=1)}
    runs.update({name: dict(devices=DEVICES, warmup_steps=WARMUP, **o) for name, o in OPTIONS.items()})

    def run_one(fields):
        denoise = make_denoise_fn(unet, DistriConfig(HEIGHT, WIDTH, **fields), sched, STEPS)
        return np.asarray(denoise(params, *inputs))

    with ThreadPoolExecutor(2) as pool:  # XLA compiles outside the GIL
        return dict(zip(runs, pool.map(run_one, runs.values())))


def print_micro(out: dict) -> None:
    single, default = out["single device"], out["default (kv, compute dtype)"]
    sizes = {
        name: stale_bytes(unet_preset("micro-sdxl"), HEIGHT, WIDTH, DEVICES, "float32", **o)
        for name, o in OPTIONS.items()
    }
    print(
        f"micro-sdxl UNet, {WIDTH}x{HEIGHT}, float32, {DEVICES} devices (mesh 2x4), {STEPS} DDIM steps, "
        f"warmup {WARMUP}, corrected_async_gn"
    )
    head = f"{'option':<28}{'attn state':>12}{'(x)':>7}{'all state':>12}{'err vs 1 device':>17}{'vs default':>12}"
    print(head + "\n" + "-" * len(head))
    kv0 = sizes["default (kv, compute dtype)"][0]
    for name in OPTIONS:
        kv, total = sizes[name]
        print(
            f"{name:<28}{kv:>12,}{kv / kv0:>7.3f}{total:>12,}{rel_l2(out[name], single):>17.4f}"
            f"{rel_l2(out[name], default):>12.1e}"
        )
    print(
        "(bytes per device; 'attn state' is the self-attention part of the stale state, 'all state' adds "
        "conv halos and GroupNorm statistics)"
    )


def print_sdxl(n: int) -> None:
    print(f"\nSDXL base UNet, {n}x{n}, bfloat16, {DEVICES} devices (mesh 2x4): stale state per device")
    base = None
    for name, o in OPTIONS.items():
        kv, total = stale_bytes(sdxl_base(), n, n, DEVICES, "bfloat16", **o)
        base = base or kv
        print(f"  {name:<28} attention {kv / 1e9:6.2f} GB ({kv / base:.3f}x), all {total / 1e9:6.2f} GB")


def run(args) -> None:
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("XLA_FLAGS", XLA_FLAGS)  # read when JAX starts its backend
    cpu_devices(DEVICES)
    start = time.perf_counter()
    print_micro(final_latents())
    if args.sdxl:
        print_sdxl(args.sdxl)
    print(f"\n{time.perf_counter() - start:.1f} s, JAX {jax.__version__}, {jax.device_count()} CPU devices")


def build_parser():
    p = parser(__doc__, "stale_options")
    p.add_argument(
        "--sdxl", type=positive, metavar="SIZE", help="also SDXL base's stale bytes at SIZE^2 on 8 devices"
    )
    return p


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
