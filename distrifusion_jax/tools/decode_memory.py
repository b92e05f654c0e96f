"""Per-device memory of the SDXL VAE decode, one device vs row-sharded (compiled memory analysis, no weights).

python -m distrifusion_jax.tools.decode_memory [--sizes 1024 2048] [--device-counts 1 2 4 8] [--dtype float32]
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp

from ..config import DTYPE_NAMES
from ..flags import run_command
from ..models.presets import sdxl_vae_config
from ..models.vae import AutoencoderKL
from .abstract import abstract_weights
from .command import add_device_counts, cpu_devices, parser, positive
from .memory import decode_memory


def run(args) -> list:
    cpu_devices(max(args.device_counts))
    dtype = jnp.dtype(args.dtype)
    vae = AutoencoderKL(sdxl_vae_config(), dtype=dtype, param_dtype=dtype)
    params = abstract_weights(vae, dtype)
    print(
        f"SDXL VAE decode, batch 1, {args.dtype}, per device (XLA memory analysis on "
        f"{jax.devices()[0].platform}, JAX {jax.__version__}):"
    )
    rows = []
    for size in args.sizes:
        for n in args.device_counts:
            t0 = time.perf_counter()
            m = decode_memory(vae, params, size, n)
            rows.append(dict(size=size, devices=n, **m))
            print(
                f"  {size}^2 N={n}: temporaries {m['temp'] / 1e9:6.2f} GB, arguments {m['argument'] / 1e9:5.2f} GB, "
                f"output {m['output'] / 1e9:5.2f} GB  (compiled in {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    return rows


def build_parser():
    p = parser(__doc__, "decode_memory")
    p.add_argument("--sizes", type=positive, nargs="+", default=[1024, 2048], help="square image sizes")
    add_device_counts(p, [1, 2, 4, 8], "device counts (default 1 2 4 8)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    return p


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
