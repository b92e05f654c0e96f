"""Command line: `distrifusion-jax generate|benchmark|convert ...` (also `python -m distrifusion_jax`)."""

from __future__ import annotations

import argparse
import sys

from .config import DTYPE_NAMES
from .flags import OneLineErrorParser, run_command


def _convert(args) -> None:
    from .convert import convert
    from .weights.lora import parse_lora_arg

    convert(
        args.src,
        args.dst,
        dtype=args.dtype,
        variant=args.variant,
        overwrite=args.overwrite,
        config=args.config,
        loras=[parse_lora_arg(v) for v in args.lora],
    )


def build_parser() -> argparse.ArgumentParser:
    from .generate import add_parser as add_generate
    from .tools.benchmark import add_parser as add_benchmark

    parser = OneLineErrorParser(prog="distrifusion-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    add_generate(sub)
    add_benchmark(sub)
    p = sub.add_parser(
        "convert",
        help="convert a diffusers SDXL pipeline or UNet folder, or a single-file SDXL / SD checkpoint "
        "(safetensors), to our Flax format",
    )
    p.add_argument(
        "src",
        help="diffusers pipeline folder (model_index.json, unet/, vae/, scheduler/ and the text encoders and "
        "tokenizers it lists: SDXL base, its refiner, SD 1.x / 2.x) or UNet folder "
        "(config.json + diffusion_pytorch_model[.fp16].safetensors), or a single-file checkpoint in the "
        "original layout (model.safetensors: SDXL -> an SDXL pipeline folder, SD 1.x / 2.x -> an SD pipeline folder; "
        "pickles (.ckpt, .pt, .bin) are refused)",
    )
    p.add_argument(
        "dst",
        help="output folder, new or empty, outside SRC: the same pipeline layout, each model as "
        "config.json + flax_params.safetensors (a UNet folder: just those two files); "
        "written whole or not at all",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPE_NAMES,
        help="parameter dtype to store (default: float32, lossless; bfloat16 is the usual choice "
        "for SDXL and halves the size); a pipeline's VAE stays float32 if it has force_upcast",
    )
    p.add_argument(
        "--variant",
        default=None,
        choices=["fp16", "bf16"],
        help="read this weight variant of SRC (default: full precision, else fp16, else bf16)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="SDXL pipelines: fuse a LoRA (kohya or diffusers/peft safetensors) into the converted UNet and text "
        "encoders, scale default 1.0; repeat to stack several",
    )
    p.add_argument(
        "--config",
        default=None,
        help="single files only: the bundled config the checkpoint was trained with (sdxl-base-1.0, sd-1.5, "
        "sd-2.1, sd-2.1-base, ...; default: detected from its keys). SD 2.x files default to sd-2.1 (768, "
        "v-prediction), as diffusers does, since the keys cannot tell; pass sd-2.1-base for a 512 epsilon model",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST if it exists and is not empty (the old folder is deleted only once the new "
        "one is complete)",
    )
    p.set_defaults(func=_convert)
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit status (2 with a one-line `error: ...` for bad input)."""
    return run_command(build_parser(), None, argv)


if __name__ == "__main__":
    sys.exit(main())
