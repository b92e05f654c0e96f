"""Per-device memory of SDXL generation at high resolution: denoising loop and VAE decode, N = 1, 2, 4, 8.

    python examples/memory.py                                  # 1024 2048 3840, N = 1 2 4 8, bf16
    python examples/memory.py --sizes 3840 --devices 8 --stale-kv-dtype int8 --stale-kv hidden
    python examples/memory.py --attention xla                  # what XLA's own attention needs

XLA's memory analysis of the compiled programs with abstract weights (nothing is run, no weights
are created): per device, arguments (weights, inputs) + outputs + temporaries (activations, the
stale state carried by the loop) - buffers aliased between them. Fake CPU devices stand in for the
mesh, so the figures are XLA:CPU's buffer assignment; GPU programs differ in fusion, but the large
terms (weights, stale state, activations of the band) are the same arrays.

`--attention chunked` (default here) computes attention blockwise with a streaming softmax, as
cuDNN's fused kernel does on GPU: the [queries x keys] scores are never stored whole. XLA's own
attention on CPU (`--attention xla`) stores them, which dominates from 2048^2 up.
"""

import argparse
import json
import time

import jax


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 3840])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--vae-dtype", default="float32", help="the VAE's dtype (SDXL's VAE asks for float32)")
    p.add_argument("--mode", default="corrected_async_gn")
    p.add_argument("--attention", default="chunked", help="attention implementation (chunked | xla | cudnn)")
    p.add_argument("--stale-kv-dtype", default=None, help="DistriConfig.stale_kv_dtype (default: compute dtype)")
    p.add_argument("--stale-kv", default="kv", help="DistriConfig.stale_kv: kv | hidden")
    p.add_argument("--no-decode", action="store_true", help="only the denoising loop")
    p.add_argument("--no-denoise", action="store_true", help="only the VAE decode")
    p.add_argument("--decode-tile-rows", type=int, default=None,
                   help="one-device decode in overlapping tiles of this many latent rows (Decoder(tile_rows=))")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    return p.parse_args(argv)


def analysed(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def denoise_memory(unet, params, size: int, n: int, args) -> dict:
    import jax.numpy as jnp

    import distrifusion_jax as dj
    from distrifusion_jax.parallel import report

    extra = {}
    if args.stale_kv_dtype:
        extra["stale_kv_dtype"] = args.stale_kv_dtype
    if args.stale_kv != "kv":
        extra["stale_kv"] = args.stale_kv
    dc = dj.DistriConfig(size, size, devices=n, mode=args.mode, warmup_steps=1, **extra)
    sched = dj.make_scheduler("ddim", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                       "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False})
    d = dj.Denoiser(unet, dc, sched, 4)  # 2 sync + 2 displaced steps: both scans, memory independent of steps
    case = report.Case(unet.config, size, size, n, dtype=args.dtype)
    latents, ehs, added = report.abstract_inputs(case)
    out = analysed(d._jitted.lower(params, latents, ehs, added, jax.ShapeDtypeStruct((), jnp.float32)).compile())
    out["weights"] = sum(report.nbytes(a) for a in jax.tree.leaves(params))
    if d.mesh is not None and d.patches > 1:
        _, seen = report.trace_displaced_step(d, params, (latents, ehs, added))
        out["stale"] = sum(report.nbytes(a) for a in jax.tree.leaves(seen["state"]))
    else:
        out["stale"] = 0
    return out


def decode_memory(vae, params, size: int, n: int, tile_rows=None) -> dict:
    from distrifusion_jax.decode import Decoder

    d = Decoder(vae, jax.devices()[:n], tile_rows=tile_rows)
    z = jax.ShapeDtypeStruct((1, size // 8, size // 8, 4), vae.dtype)
    fn = d._banded if n > 1 and d.parallel_for(z) else d._single
    return analysed(fn.lower(params, z).compile())


def gb(b) -> str:
    return f"{b / 1e9:6.2f}"


def main(argv=None):
    args = parse_args(argv)
    jax.config.update("jax_num_cpu_devices", max(args.devices))
    import jax.numpy as jnp

    import distrifusion_jax as dj
    from distrifusion_jax.models.presets import sdxl_vae_config
    from distrifusion_jax.models.vae import AutoencoderKL

    impl = None if args.attention == "xla" else args.attention
    dt, vdt = jnp.dtype(args.dtype), jnp.dtype(args.vae_dtype)
    unet = dj.UNet2DConditionModel(dj.sdxl_base(), dtype=dt, param_dtype=dt, attention_impl=impl)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dt), unet.abstract_params())
    vae = AutoencoderKL(sdxl_vae_config(), dtype=vdt, param_dtype=vdt, attention_impl=impl)
    vae_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, vdt), vae.abstract_params())
    dev = jax.devices()[0]
    print(f"SDXL per-device memory (GB), batch 1 with CFG, UNet {args.dtype}, VAE {args.vae_dtype}, mode "
          f"{args.mode}, attention {args.attention}, stale K/V {args.stale_kv_dtype or args.dtype} "
          f"({args.stale_kv}); XLA memory analysis on {dev.platform}, JAX {jax.__version__}", flush=True)
    print(" size     N | weights  stale  denoise: temp   peak | decode: temp   peak | compile s")
    rows = []
    for size in args.sizes:
        for n in args.devices:
            t0 = time.perf_counter()
            row = {"size": size, "devices": n}
            if not args.no_denoise:
                row["denoise"] = denoise_memory(unet, params, size, n, args)
            if not args.no_decode:
                row["decode"] = decode_memory(vae, vae_params, size, n, args.decode_tile_rows)
            row["compile_s"] = time.perf_counter() - t0
            rows.append(row)
            den, dec = row.get("denoise"), row.get("decode")
            den = (f"{gb(den['weights'])} {gb(den['stale'])}         {gb(den['temp'])} {gb(den['peak'])}" if den
                   else "     -      -               -      -")
            dec = f"{gb(dec['temp'])} {gb(dec['peak'])}" if dec else "     -      -"
            print(f" {size:4d}^2 {n:3d} | {den} |       {dec} | {row['compile_s']:.0f}", flush=True)
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        meta.update(platform=dev.platform, jax=jax.__version__, date=time.strftime("%Y-%m-%d"))
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
