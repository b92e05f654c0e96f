"""Per-device memory of the SDXL VAE decode, one device vs row-sharded (compiled memory analysis, no weights).

    python examples/decode_memory.py [--sizes 1024 2048] [--devices 1 2 4 8] [--dtype float32]
"""

import argparse
import time

import jax


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    jax.config.update("jax_num_cpu_devices", max(args.devices))
    import jax.numpy as jnp

    from distrifusion_jax.decode import Decoder
    from distrifusion_jax.models.presets import sdxl_vae_config
    from distrifusion_jax.models.vae import AutoencoderKL

    dtype = jnp.dtype(args.dtype)
    vae = AutoencoderKL(sdxl_vae_config(), dtype=dtype, param_dtype=dtype)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), vae.abstract_params())
    print(f"SDXL VAE decode, batch 1, {args.dtype}, per device (XLA memory analysis on "
          f"{jax.devices()[0].platform}, JAX {jax.__version__}):")
    for size in args.sizes:
        z = jax.ShapeDtypeStruct((1, size // 8, size // 8, 4), dtype)
        for n in args.devices:
            d = Decoder(vae, jax.devices()[:n])
            fn = d._banded if n > 1 else d._single
            t0 = time.perf_counter()
            m = fn.lower(params, z).compile().memory_analysis()
            temp, args_b, out_b = m.temp_size_in_bytes, m.argument_size_in_bytes, m.output_size_in_bytes
            print(f"  {size}^2 N={n}: temporaries {temp / 1e9:6.2f} GB, arguments {args_b / 1e9:5.2f} GB, "
                  f"output {out_b / 1e9:5.2f} GB  (compiled in {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
