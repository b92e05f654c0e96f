"""What the tools' command lines share: a parser with one-line errors (the CLI's), fake CPU devices, int flags."""

from __future__ import annotations

import argparse
import dataclasses

import jax

from ..flags import OneLineErrorParser, describe  # noqa: F401 - describe: the tools' import

RawDescription = (
    argparse.RawDescriptionHelpFormatter
)  # --help shows a module docstring's usage lines as written


def parser(module_doc: str, prog: str) -> OneLineErrorParser:
    """A tool's parser: `python -m distrifusion_jax.tools.<prog>`, its module docstring as the description."""
    return OneLineErrorParser(
        prog=f"python -m distrifusion_jax.tools.{prog}",
        description=module_doc,
        formatter_class=RawDescription,
    )


def cpu_devices(n: int) -> None:
    """Ask for n fake CPU devices: read by the CPU backend only, and only before JAX's first computation
    (later, e.g. in a process that already used JAX, the devices JAX has are used)."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass


def positive(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def option_defaults(cls) -> dict:
    """An options dataclass's field defaults, for its flags: `--help`, the command and the Python API then agree."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def options_from(cls, args: argparse.Namespace):
    """A tool's options dataclass from parsed flags: the fields it has (lists as tuples, so it stays hashable)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names})


def add_device_counts(p: argparse.ArgumentParser, default: list, help: str) -> None:
    """A sweep tool's --device-counts (flags.py's --devices stays one count, as everywhere else)."""
    p.add_argument("--device-counts", type=positive, nargs="+", default=default, metavar="N", help=help)


def add_img2img_flags(p: argparse.ArgumentParser, what: str) -> None:
    """A report's --img2img (`what` it then covers) and the refine pass's --steps and --strength."""
    p.add_argument("--img2img", action="store_true", help=f"img2img: {what} (default sizes 2048 3840)")
    p.add_argument(
        "--steps", type=positive, default=50, help="with --img2img: the schedule's steps (default 50)"
    )
    p.add_argument(
        "--strength",
        type=float,
        default=0.3,
        help="with --img2img: the refine's strength, the last int(steps * strength) steps run (default 0.3)",
    )
