"""Per-device memory of SDXL generation at high resolution: denoising loop and VAE decode, N = 1, 2, 4, 8.

    python -m distrifusion_jax.tools.memory                    # 1024 2048 3840, N = 1 2 4 8, bf16
    python -m distrifusion_jax.tools.memory --sizes 3840 --device-counts 8 --stale-kv-dtype int8 --stale-kv hidden
    python -m distrifusion_jax.tools.memory --attention xla    # what XLA's own attention needs

XLA's memory analysis of the compiled programs with abstract weights (nothing is run, no weights
are created): per device, arguments (weights, inputs) + outputs + temporaries (activations, the
stale state carried by the loop) - buffers aliased between them. Fake CPU devices stand in for the
mesh, so the figures are XLA:CPU's buffer assignment; GPU programs differ in fusion, but the large
terms (weights, stale state, activations of the band) are the same arrays.

`--attention chunked` (default here) computes attention blockwise with a streaming softmax, as
cuDNN's fused kernel does on GPU: the [queries x keys] scores are never stored whole. XLA's own
attention on CPU (`--attention xla`) stores them, which dominates from 2048^2 up.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp

from ..config import DTYPE_NAMES
from ..decode import Decoder
from ..denoise import Denoiser
from ..flags import FLAGS, add_distri_flags, distri_config_from_args, run_command
from ..models.presets import scheduler_preset, sdxl_base, sdxl_vae_config
from ..models.unet import UNet2DConditionModel
from ..models.vae import AutoencoderKL
from ..nn.attention import IMPLEMENTATIONS
from ..schedulers import make_scheduler
from .abstract import (
    Case,
    abstract_inputs,
    abstract_weights,
    lower_loop,
    memory,
    nbytes,
    trace_displaced_step,
)
from .command import add_device_counts, cpu_devices, parser, positive
from .fmt import gb, write_json

# DistriConfig's flags from flags.py: patch parallelism's options; sizes and device counts are swept,
# and the loop has one synchronous step then displaced ones (its memory does not depend on the step count)
DISTRI_FLAGS = ("split_batch", "mode", "stale_kv", "stale_kv_dtype")
STEPS, WARMUP = 4, 1


def denoise_memory(unet, params, size: int, n: int, args) -> dict:
    """The denoising loop's per-device bytes (memory(): argument ... peak), the weights' and the stale state's."""
    dc = distri_config_from_args(args, height=size, width=size, devices=n, warmup_steps=WARMUP)
    d = Denoiser(unet, dc, make_scheduler("ddim", scheduler_preset()), STEPS)  # both scans compiled
    latents, ehs, added = abstract_inputs(Case(unet.config, size, size, n, dtype=args.dtype))
    out = memory(lower_loop(d, params, latents, ehs, added).compile())
    out["weights"] = sum(nbytes(a) for a in jax.tree.leaves(params))
    out["stale"] = 0
    if d.mesh is not None and d.patches > 1:
        _, seen = trace_displaced_step(d, params, (latents, ehs, added))
        out["stale"] = sum(nbytes(a) for a in jax.tree.leaves(seen["state"]))
    return out


def decode_memory(vae, params, size: int, n: int, tile_rows=None) -> dict:
    """The VAE decode's per-device bytes (memory()) of one [1, size/8, size/8, 4] latent on n devices."""
    d = Decoder(vae, jax.devices()[:n], tile_rows=tile_rows)
    z = jax.ShapeDtypeStruct((1, size // 8, size // 8, 4), vae.dtype)
    fn = d._banded if n > 1 and d.parallel_for(z) else d._single
    return memory(fn.lower(params, z).compile())


def format_row(row: dict) -> str:
    den, dec = row.get("denoise"), row.get("decode")
    den = (
        f"{gb(den['weights'])} {gb(den['stale'])}         {gb(den['temp'])} {gb(den['peak'])}"
        if den
        else "     -      -               -      -"
    )
    dec = f"{gb(dec['temp'])} {gb(dec['peak'])}" if dec else "     -      -"
    return f" {row['size']:4d}^2 {row['devices']:3d} | {den} |       {dec} | {row['compile_s']:.0f}"


def run(args) -> list:
    cpu_devices(max(args.device_counts))
    dt, vdt = jnp.dtype(args.dtype), jnp.dtype(args.vae_dtype)
    unet = UNet2DConditionModel(sdxl_base(), dtype=dt, param_dtype=dt, attention_impl=args.attention)
    vae = AutoencoderKL(sdxl_vae_config(), dtype=vdt, param_dtype=vdt, attention_impl=args.attention)
    params, vae_params = abstract_weights(unet, dt), abstract_weights(vae, vdt)
    dev = jax.devices()[0]
    print(
        f"SDXL per-device memory (GB), batch 1 with CFG, UNet {args.dtype}, VAE {args.vae_dtype}, mode "
        f"{args.mode}, attention {args.attention}, stale K/V {args.stale_kv_dtype or args.dtype} "
        f"({args.stale_kv}); XLA memory analysis on {dev.platform}, JAX {jax.__version__}",
        flush=True,
    )
    print(" size     N | weights  stale  denoise: temp   peak | decode: temp   peak | compile s")
    rows = []
    for size in args.sizes:
        for n in args.device_counts:
            t0 = time.perf_counter()
            row = {"size": size, "devices": n}
            if not args.no_denoise:
                row["denoise"] = denoise_memory(unet, params, size, n, args)
            if not args.no_decode:
                row["decode"] = decode_memory(vae, vae_params, size, n, args.decode_tile_rows)
            row["compile_s"] = time.perf_counter() - t0
            rows.append(row)
            print(format_row(row), flush=True)
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        meta.update(platform=dev.platform, jax=jax.__version__, date=time.strftime("%Y-%m-%d"))
        write_json(args.json, {"meta": meta, "rows": rows})
    return rows


def build_parser():
    p = parser(__doc__, "memory")
    p.add_argument("--sizes", type=positive, nargs="+", default=[1024, 2048, 3840], help="square image sizes")
    add_device_counts(p, [1, 2, 4, 8], "device counts (default 1 2 4 8)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="the UNet's dtype")
    p.add_argument(
        "--vae-dtype",
        default="float32",
        choices=DTYPE_NAMES,
        help="the VAE's dtype (SDXL's VAE asks for float32)",
    )
    p.add_argument(
        "--attention",
        default="chunked",
        choices=[i for i in IMPLEMENTATIONS if i],
        help="attention implementation (default chunked)",
    )
    add_distri_flags(p, skip=set(FLAGS) - set(DISTRI_FLAGS))
    p.add_argument("--no-decode", action="store_true", help="only the denoising loop")
    p.add_argument("--no-denoise", action="store_true", help="only the VAE decode")
    p.add_argument(
        "--decode-tile-rows",
        type=positive,
        default=None,
        help="one-device decode in overlapping tiles of this many latent rows (Decoder(tile_rows=))",
    )
    p.add_argument("--json", help="also write the numbers to this JSON file")
    return p


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
