"""Convert a diffusers SDXL pipeline folder (or an SDXL / SD 1.x / 2.x UNet folder) to our Flax format.

    python convert/convert_sdxl.py SRC DST [--dtype float32|float16|bfloat16] [--variant fp16|bf16]

Same as `distrifusion-jax convert`; the logic lives in `distrifusion_jax.convert`.
"""

import sys

from distrifusion_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
