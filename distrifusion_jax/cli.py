"""Command line: `distrifusion-jax convert SRC DST [--dtype]` (also `python -m distrifusion_jax`)."""

from __future__ import annotations

import argparse
import sys

from .errors import DistriFusionError


def _convert(args) -> None:
    from .convert import convert_unet

    convert_unet(args.src, args.dst, dtype=args.dtype, variant=args.variant)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distrifusion-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="convert a diffusers UNet folder (safetensors) to our Flax format")
    p.add_argument("src", help="diffusers UNet folder: config.json + diffusion_pytorch_model[.fp16].safetensors")
    p.add_argument("dst", help="output folder (config.json + flax_params.safetensors)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="parameter dtype to store (default: float32)")
    p.add_argument("--variant", default=None, choices=["fp16", "bf16"],
                   help="read this weight variant of SRC (default: full precision, else fp16, else bf16)")
    p.set_defaults(func=_convert)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DistriFusionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
