"""Cold and warm compile time of the full SDXL denoising program (abstract weights: nothing is run).

    python examples/compile_time.py [--size 1024] [--devices 1] [--steps 50] [--cache DIR]

Cold: an empty persistent compilation cache. Warm: a second compilation after clearing JAX's
in-memory caches, which finds the program on disk (what a new process sees).
"""

import argparse
import shutil
import tempfile
import time

import jax


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--mode", default="corrected_async_gn")
    p.add_argument("--cache", default=None, help="cache directory (default: a fresh temporary one)")
    args = p.parse_args()
    jax.config.update("jax_num_cpu_devices", max(args.devices, 1))
    import jax.numpy as jnp

    import distrifusion_jax as dj
    from distrifusion_jax.cache import enable_compilation_cache

    cache = args.cache or tempfile.mkdtemp(prefix="dfj-cache-")
    enable_compilation_cache(cache)
    config = dj.sdxl_base()
    unet = dj.UNet2DConditionModel(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), unet.abstract_params())
    sched = dj.make_scheduler("ddim", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                       "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False})
    d = dj.Denoiser(unet, dj.DistriConfig(args.size, args.size, devices=args.devices, mode=args.mode), sched,
                    args.steps)
    h = args.size // 8
    s = jax.ShapeDtypeStruct
    inputs = (params, s((1, h, h, 4), jnp.float32), s((2, 77, 2048), jnp.bfloat16),
              {"text_embeds": s((2, 1280), jnp.bfloat16), "time_ids": s((2, 6), jnp.float32)},
              s((), jnp.float32))
    dev = jax.devices()[0]
    print(f"SDXL denoising loop, {args.size}^2, {args.steps} steps, {args.devices} {dev.platform} device(s) "
          f"({dev.device_kind}), JAX {jax.__version__}, cache {cache}", flush=True)
    times = []
    for label in ("cold", "warm"):
        jax.clear_caches()
        t0 = time.perf_counter()
        lowered = d._jitted.lower(*inputs)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        times.append(t2 - t0)
        print(f"  {label}: trace+lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s, total {t2 - t0:.1f} s", flush=True)
    if args.cache is None:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
