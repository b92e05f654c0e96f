"""Cold and warm compile time of the full SDXL denoising program (abstract weights: nothing is run).

    python -m distrifusion_jax.tools.compile_time [--height 1024 --width 1024] [--devices 1] [--steps 50] [--cache DIR]

Any DistriConfig flag (--mode, --parallelism, --stale-kv, ...) picks the program. It is prepared as a call
of the pipeline prepares it (`cache.compile_program`). Cold: empty caches, so the Python code is traced and
lowered, XLA compiles, and both the traced program and the compiled one are written. Warm: JAX's
in-memory caches cleared, so it finds both on disk (what a new process sees): no tracing, no compiling.
For comparison, tracing and lowering alone (what a warm run would cost without the kept traced program).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from ..cache import CompileClock, enable_compilation_cache
from ..denoise import Denoiser
from ..flags import add_distri_flags, distri_config_from_args, run_command
from ..models.presets import scheduler_preset, sdxl_base
from ..schedulers import make_scheduler
from ..tensor_parallel import to_layout
from .abstract import Case, abstract_inputs, abstract_model, lower_loop
from .command import cpu_devices, parser, positive


def compile_twice(d: Denoiser, params, inputs) -> dict:
    """{"cold" | "warm": {"trace_s", "lower_s", "compile_s", "total_s"}, "trace_lower_s": s} of the Denoiser's
    loop prepared as its first call would (from the caches when warm), and of tracing and lowering alone."""
    placed = jax.eval_shape(to_layout, params) if d.tensor is not None else params  # as the loop reads them
    args = (placed, *inputs, jax.ShapeDtypeStruct((), jnp.float32))
    out = {}
    for label in ("cold", "warm"):
        jax.clear_caches()
        d._executables.clear()
        clock, t0 = CompileClock(), time.perf_counter()
        d._executable("loop", *args)
        total = time.perf_counter() - t0
        split = clock.split()
        out[label] = {f"{k}_s": v for k, v in split.items()} | {"total_s": total}
        print(
            f"  {label}: trace {split['trace']:.1f} s, lower {split['lower']:.1f} s, "
            f"{'compile' if label == 'cold' else 'load'} {split['compile']:.1f} s, total {total:.1f} s",
            flush=True,
        )
    jax.clear_caches()
    t0 = time.perf_counter()
    lower_loop(d, params, *inputs)
    out["trace_lower_s"] = time.perf_counter() - t0
    print(f"  tracing and lowering alone (no traced program kept): {out['trace_lower_s']:.1f} s", flush=True)
    return out


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
