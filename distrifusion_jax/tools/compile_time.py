"""Cold and warm compile time of the full SDXL denoising program (abstract weights: nothing is run).

    python -m distrifusion_jax.tools.compile_time [--height 1024 --width 1024] [--devices 1] [--steps 50] [--cache DIR]

Any DistriConfig flag (--mode, --parallelism, --stale-kv, ...) picks the program. Cold: an empty
persistent compilation cache. Warm: a second compilation after clearing JAX's in-memory caches, which
finds the program on disk (what a new process sees).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time

import jax

from ..cache import enable_compilation_cache
from ..denoise import Denoiser
from ..flags import add_distri_flags, distri_config_from_args, run_command
from ..models.presets import scheduler_preset, sdxl_base
from ..schedulers import make_scheduler
from .abstract import Case, abstract_inputs, abstract_model, lower_loop
from .command import cpu_devices, parser, positive


def compile_twice(d: Denoiser, params, inputs) -> list:
    """[(trace+lower s, compile s)] of a cold then a warm compilation of the Denoiser's loop."""
    times = []
    for label in ("cold", "warm"):
        jax.clear_caches()
        t0 = time.perf_counter()
        lowered = lower_loop(d, params, *inputs)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        times.append((t1 - t0, t2 - t1))
        print(
            f"  {label}: trace+lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s, total {t2 - t0:.1f} s",
            flush=True,
        )
    return times


def run(args) -> list:
    cpu_devices(args.devices)
    dc = distri_config_from_args(args)
    cache = args.cache or tempfile.mkdtemp(prefix="dfj-cache-")
    enable_compilation_cache(cache)
    unet, params = abstract_model(sdxl_base(), "bfloat16")
    d = Denoiser(unet, dc, make_scheduler("ddim", scheduler_preset()), args.steps)
    inputs = abstract_inputs(Case(unet.config, dc.height, dc.width, len(d.devices)))
    dev = jax.devices()[0]
    print(
        f"SDXL denoising loop, {dc.width}x{dc.height}, {args.steps} steps, {len(d.devices)} {dev.platform} "
        f"device(s) ({dev.device_kind}), JAX {jax.__version__}, cache {cache}",
        flush=True,
    )
    try:
        return compile_twice(d, params, inputs)
    finally:
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)


def build_parser():
    p = parser(__doc__, "compile_time")
    add_distri_flags(p, devices=1)
    p.add_argument("--steps", type=positive, default=50)
    p.add_argument("--cache", default=None, help="cache directory (default: a fresh temporary one)")
    return p


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
