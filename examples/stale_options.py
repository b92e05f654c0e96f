"""Stale-state options (DistriConfig.stale_kv, stale_kv_dtype): memory vs accuracy, measured.

    python examples/stale_options.py                  # the micro SDXL-shaped UNet, 8 fake CPU devices
    python examples/stale_options.py --sdxl 3840      # also SDXL base's stale bytes per device at 3840^2

For each option: the per-device stale state (self-attention part and total, from the traced shapes
of the state the loop carries) and the relative L2 error of the final latents of a displaced run
(10 DDIM steps, warmup 2, mesh 2 x 4) against the single-device loop and against the default
displaced run. 40-60 s on 2 CPU cores, almost all of it compiling the 7 loops.
"""

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

OPTIONS = {  # name -> DistriConfig fields
    "default (kv, compute dtype)": {},
    "bfloat16": dict(stale_kv_dtype="bfloat16"),
    "float8_e4m3fn": dict(stale_kv_dtype="float8_e4m3fn"),
    "int8": dict(stale_kv_dtype="int8"),
    "hidden": dict(stale_kv="hidden"),
    "hidden + int8": dict(stale_kv="hidden", stale_kv_dtype="int8"),
}
HEIGHT, WIDTH, STEPS, WARMUP = 128, 192, 10, 2


def stale_bytes(config, height, width, devices, dtype, **options):
    """(self-attention bytes, total bytes) of one device's stale state, by abstract evaluation."""
    from distrifusion_jax.parallel import report as R

    unet, params = R.abstract_model(config, dtype)
    case = R.Case(config, height, width, devices, True, dtype, **options)
    _, seen = R.trace_displaced_step(R.make_denoiser(unet, case), params, R.abstract_inputs(case))
    kinds = {k: sum(R.nbytes(a) for a in v) for k, v in R.state_by_kind(seen["state"]).items()}
    return kinds["kv"], sum(kinds.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sdxl", type=int, metavar="SIZE", help="also SDXL base's stale bytes at SIZE^2 on 8 devices")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # compile time dominates here (7 loops of a tiny UNet); LLVM's optimisations off halve it
    os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    import numpy as np

    import distrifusion_jax as dj
    from tiny import SDXL_MICRO, micro_setup, rel_l2

    start = time.perf_counter()
    unet, params, inputs, sched = micro_setup(HEIGHT, WIDTH)
    runs = {"single device": dict(devices=1)}
    runs.update({name: dict(devices=8, warmup_steps=WARMUP, **o) for name, o in OPTIONS.items()})

    def final_latents(fields):
        denoise = dj.make_denoise_fn(unet, dj.DistriConfig(HEIGHT, WIDTH, **fields), sched, STEPS)
        return np.asarray(denoise(params, *inputs))

    with ThreadPoolExecutor(2) as pool:  # XLA compiles outside the GIL
        out = dict(zip(runs, pool.map(final_latents, runs.values())))
    single, default = out["single device"], out["default (kv, compute dtype)"]
    micro = dj.UNetConfig.from_dict(SDXL_MICRO)
    sizes = {name: stale_bytes(micro, HEIGHT, WIDTH, 8, "float32", **o) for name, o in OPTIONS.items()}

    print(f"micro SDXL-shaped UNet, {WIDTH}x{HEIGHT}, float32, 8 devices (mesh 2x4), {STEPS} DDIM steps, "
          f"warmup {WARMUP}, corrected_async_gn")
    head = f"{'option':<28}{'attn state':>12}{'(x)':>7}{'all state':>12}{'err vs 1 device':>17}{'vs default':>12}"
    print(head + "\n" + "-" * len(head))
    kv0 = sizes["default (kv, compute dtype)"][0]
    for name in OPTIONS:
        kv, total = sizes[name]
        print(f"{name:<28}{kv:>12,}{kv / kv0:>7.3f}{total:>12,}{rel_l2(out[name], single):>17.4f}"
              f"{rel_l2(out[name], default):>12.1e}")
    print("(bytes per device; 'attn state' is the self-attention part of the stale state, 'all state' adds "
          "conv halos and GroupNorm statistics)")

    if args.sdxl:
        n = args.sdxl
        print(f"\nSDXL base UNet, {n}x{n}, bfloat16, 8 devices (mesh 2x4): stale state per device")
        base = None
        for name, o in OPTIONS.items():
            kv, total = stale_bytes(dj.sdxl_base(), n, n, 8, "bfloat16", **o)
            base = base or kv
            print(f"  {name:<28} attention {kv / 1e9:6.2f} GB ({kv / base:.3f}x), all {total / 1e9:6.2f} GB")
    print(f"\n{time.perf_counter() - start:.1f} s, JAX {jax.__version__}, {jax.device_count()} CPU devices")


if __name__ == "__main__":
    main()
