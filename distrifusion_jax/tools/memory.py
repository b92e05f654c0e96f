"""Per-device memory of SDXL generation at high resolution: denoising loop and VAE decode, N = 1, 2, 4, 8.

    python -m distrifusion_jax.tools.memory                    # 1024 2048 3840, N = 1 2 4 8, bf16
    python -m distrifusion_jax.tools.memory --sizes 3840 --device-counts 8 --stale-kv-dtype int8 --stale-kv hidden
    python -m distrifusion_jax.tools.memory --attention xla    # what XLA's own attention needs
    python -m distrifusion_jax.tools.memory --img2img          # 2048 3840: the refine loop, VAE encode, decode
    python -m distrifusion_jax.tools.memory --tiny --img2img   # micro-sdxl UNet, tiny-sdxl VAE, 64 128: seconds

XLA's memory analysis of the compiled programs with abstract weights (nothing is run, no weights
are created): per device, arguments (weights, inputs) + outputs + temporaries (activations, the
stale state carried by the loop) - buffers aliased between them. Fake CPU devices stand in for the
mesh, so the figures are XLA:CPU's buffer assignment; GPU programs differ in fusion, but the large
terms (weights, stale state, activations of the band) are the same arrays.

`--attention chunked` (default here) computes attention blockwise with a streaming softmax, as
cuDNN's fused kernel does on GPU: the [queries x keys] scores are never stored whole. XLA's own
attention on CPU (`--attention xla`) stores them, which dominates from 2048^2 up.

`--img2img` adds the row-sharded VAE encode of the input image and compiles the loop as the refine pass runs
it (from the first step `--strength` of `--steps` gives): the same programs as text-to-image, scanned over
fewer steps, so the same memory.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp

from ..arguments import check_strength
from ..config import DTYPE_NAMES
from ..decode import Decoder, Encoder
from ..denoise import Denoiser
from ..flags import FLAGS, add_distri_flags, distri_config_from_args, run_command
from ..models.presets import scheduler_preset, sdxl_base, sdxl_vae_config, unet_preset, vae_preset
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
from .command import add_device_counts, add_img2img_flags, cpu_devices, parser, positive
from .fmt import machine, write_json

# DistriConfig's flags from flags.py: patch parallelism's options; sizes and device counts are swept,
# and the loop has one synchronous step then displaced ones (its memory does not depend on the step count)
DISTRI_FLAGS = ("split_batch", "mode", "stale_kv", "stale_kv_dtype")
STEPS, WARMUP = 4, 1
SIZES, IMG2IMG_SIZES, TINY_SIZES = [1024, 2048, 3840], [2048, 3840], [64, 128]


def denoise_memory(unet, params, size: int, n: int, args, first_step: int = 0) -> dict:
    """The denoising loop's per-device bytes (memory(): argument ... peak), the weights' and the stale state's.

    `first_step` > 0: the loop of an img2img refine from that step of `args.steps` (its sync and displaced scans).
    """
    dc = distri_config_from_args(args, height=size, width=size, devices=n, warmup_steps=WARMUP)
    steps = args.steps if first_step else STEPS  # both scans compiled
    d = Denoiser(unet, dc, make_scheduler("ddim", scheduler_preset()), steps, first_step=first_step)
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


def encode_memory(vae, params, size: int, n: int) -> dict:
    """The VAE encode's per-device bytes (memory()) of one [1, size, size, 3] image (img2img) on n devices."""
    e, cfg = Encoder(vae, jax.devices()[:n]), vae.config
    image = jax.ShapeDtypeStruct((1, size, size, cfg.in_channels), vae.dtype)
    f = cfg.downsample_factor
    noise = jax.ShapeDtypeStruct((1, size // f, size // f, cfg.latent_channels), jnp.float32)
    fn = e._banded if e.parallel_for(image) else e._single
    return memory(fn.lower(params, image, noise).compile())


def header(img2img: bool) -> str:
    loop = "refine" if img2img else "denoise"
    encode = " encode: temp   peak |" if img2img else ""
    return f" size     N | weights  stale  {loop}: temp   peak |{encode} decode: temp   peak | compile s"


def format_row(row: dict, unit: float = 1e9) -> str:
    """One table line, bytes in GB (`unit` 1e6: MB)."""
    cell = lambda n: f"{n / unit:6.2f}"
    den = row.get("refine", row.get("denoise"))
    den = (
        f"{cell(den['weights'])} {cell(den['stale'])}         {cell(den['temp'])} {cell(den['peak'])}"
        if den
        else "     -      -               -      -"
    )
    vae = lambda m: f"       {cell(m['temp'])} {cell(m['peak'])} |" if m else "            -      - |"
    encode = vae(row.get("encode")) if "encode" in row or "refine" in row else ""
    return f" {row['size']:4d}^2 {row['devices']:3d} | {den} |{encode}{vae(row.get('decode'))} {row['compile_s']:.0f}"


def models(args) -> tuple:
    """(unet, vae, their abstract weights, name): SDXL's, or with --tiny the micro-sdxl UNet and tiny-sdxl VAE."""
    dt, vdt = jnp.dtype(args.dtype), jnp.dtype(args.vae_dtype)
    unet_config, vae_config = (
        (unet_preset("micro-sdxl"), vae_preset("tiny-sdxl"))
        if args.tiny
        else (sdxl_base(), sdxl_vae_config())
    )
    unet = UNet2DConditionModel(unet_config, dtype=dt, param_dtype=dt, attention_impl=args.attention)
    vae = AutoencoderKL(vae_config, dtype=vdt, param_dtype=vdt, attention_impl=args.attention)
    name = "micro-sdxl UNet, tiny-sdxl VAE" if args.tiny else "SDXL"
    return unet, vae, abstract_weights(unet, dt), abstract_weights(vae, vdt), name


def run(args) -> list:
    first_step = check_strength(args.strength, args.steps) if args.img2img else 0  # before any work
    cpu_devices(max(args.device_counts))
    unet, vae, params, vae_params, name = models(args)
    sizes = args.sizes or (TINY_SIZES if args.tiny else IMG2IMG_SIZES if args.img2img else SIZES)
    dev = jax.devices()[0]
    refine = f", refine from step {first_step} of {args.steps}" if args.img2img else ""
    print(
        f"{name} per-device memory ({'MB' if args.tiny else 'GB'}), batch 1 with CFG, UNet {args.dtype}, "
        f"VAE {args.vae_dtype}, mode {args.mode}, attention {args.attention}, "
        f"stale K/V {args.stale_kv_dtype or args.dtype} ({args.stale_kv}){refine}; "
        f"XLA memory analysis on {dev.platform}, JAX {jax.__version__}",
        flush=True,
    )
    print(header(args.img2img))
    rows = []
    for size in sizes:
        for n in args.device_counts:
            t0 = time.perf_counter()
            row = {"size": size, "devices": n}
            if not args.no_denoise:
                loop = denoise_memory(unet, params, size, n, args, first_step)
                row["refine" if args.img2img else "denoise"] = loop
            if args.img2img:
                row["encode"] = encode_memory(vae, vae_params, size, n)
            if not args.no_decode:
                row["decode"] = decode_memory(vae, vae_params, size, n, args.decode_tile_rows)
            row["compile_s"] = time.perf_counter() - t0
            rows.append(row)
            print(format_row(row, 1e6 if args.tiny else 1e9), flush=True)
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        meta.update(sizes=sizes, first_step=first_step, model=name)
        meta.update(
            platform=dev.platform, machine=machine(), jax=jax.__version__, date=time.strftime("%Y-%m-%d")
        )
        write_json(args.json, {"meta": meta, "rows": rows})
    return rows


def build_parser():
    p = parser(__doc__, "memory")
    p.add_argument(
        "--sizes",
        type=positive,
        nargs="+",
        help="square image sizes (default 1024 2048 3840; --img2img: 2048 3840; --tiny: 64 128)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="the micro-sdxl UNet and tiny-sdxl VAE at small sizes: a quick check of the tool",
    )
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
    p.add_argument("--no-decode", action="store_true", help="no VAE decode")
    p.add_argument(
        "--no-denoise", action="store_true", help="only the VAE (the decode; with --img2img also the encode)"
    )
    p.add_argument(
        "--decode-tile-rows",
        type=positive,
        default=None,
        help="one-device decode in overlapping tiles of this many latent rows (Decoder(tile_rows=))",
    )
    add_img2img_flags(p, "also the row-sharded VAE encode, and the loop compiled as the refine pass runs it")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    return p


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
