"""DistriConfig's command-line flags, declared once: every command and tool adds them here and builds its config here.

    add_distri_flags(parser)                       # --height ... --stale-kv-dtype, defaults from DistriConfig
    config = distri_config_from_args(args, do_classifier_free_guidance=args.guidance_scale > 1)

A tool that sweeps a field (sizes, device counts) skips its flag and passes each value as an override.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Iterable

from .arguments import SEED_LIMIT
from .config import MODES, PARALLELISMS, SPLIT_SCHEMES, STALE_KV, STALE_KV_DTYPES, DistriConfig
from .errors import DistriFusionError

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DistriConfig)}

# DistriConfig field -> (flag, argparse keyword arguments). `split_batch` is the negated flag.
FLAGS = {
    "height": ("--height", dict(type=int, help="image height in pixels (default: %(default)s)")),
    "width": ("--width", dict(type=int, help="image width in pixels (default: %(default)s)")),
    "devices": (
        "--devices",
        dict(
            type=int,
            metavar="N",
            help=("number of devices (default: all); without accelerators, N CPU devices are created"),
        ),
    ),
    "split_batch": (
        "--no-split-batch",
        dict(
            action="store_false",
            help=(
                "do not split the guidance batch across devices (needed for an odd device count with guidance)"
            ),
        ),
    ),
    "warmup_steps": (
        "--warmup-steps",
        dict(
            type=int, metavar="K", help=("synchronous steps before the displaced ones (default: %(default)s)")
        ),
    ),
    "mode": ("--mode", dict(choices=MODES, help="behaviour of displaced steps (default: %(default)s)")),
    "parallelism": (
        "--parallelism",
        dict(
            choices=PARALLELISMS,
            help=(
                "patch: DistriFusion; naive_patch: independent patches; tensor: the tensor-parallel baseline "
                "(default: %(default)s)"
            ),
        ),
    ),
    "split_scheme": (
        "--split-scheme",
        dict(choices=SPLIT_SCHEMES, help=("how naive patches split the image (default: %(default)s)")),
    ),
    "stale_kv": (
        "--stale-kv",
        dict(
            choices=STALE_KV,
            help=(
                "what displaced steps keep and exchange per self-attention: K and V, or the input tokens (half the "
                "memory and traffic, K/V projected again each step) (default: %(default)s)"
            ),
        ),
    ),
    "stale_kv_dtype": (
        "--stale-kv-dtype",
        dict(
            choices=[d for d in STALE_KV_DTYPES if d],
            help=("store and exchange those tokens narrower (default: the compute dtype)"),
        ),
    ),
}


def add_distri_flags(
    parser, *, skip: Iterable[str] = (), title: str = "parallelism (DistriConfig)", **defaults
) -> None:
    """Add DistriConfig's flags to `parser` (an argument group), except the fields in `skip`.

    `defaults` overrides a field's default for this command (e.g. `height=256`).
    """
    unknown = (set(skip) | set(defaults)) - set(FLAGS)
    if unknown:
        raise ValueError(f"add_distri_flags: no flag for {sorted(unknown)}; fields are {sorted(FLAGS)}")
    group = parser.add_argument_group(title)
    for field, (flag, kwargs) in FLAGS.items():
        if field not in skip:
            group.add_argument(flag, dest=field, default=defaults.get(field, _DEFAULTS[field]), **kwargs)


def describe(parser: argparse.ArgumentParser, flag: str, text: str) -> None:
    """Replace the help of an option added elsewhere (add_distri_flags') where this command's default differs."""
    for action in parser._actions:
        if flag in action.option_strings:
            action.help = text


def distri_config_from_args(args: argparse.Namespace, **overrides) -> DistriConfig:
    """The DistriConfig of parsed flags; `overrides` set the skipped (or any other) fields."""
    fields = {f: getattr(args, f) for f in FLAGS if hasattr(args, f)}
    return DistriConfig(**{**fields, **overrides})


def seed_arg(text: str) -> int:
    """argparse type of --seed: a whole number in [0, 2^63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number: pass a seed 0 <= seed < 2^63"
        ) from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} is out of range: pass a seed 0 <= seed < 2^63 (e.g. 0)")
    return value


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: ...` and exit status 2, like our own errors."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_command(parser: argparse.ArgumentParser, run, argv=None) -> int:
    """Parse argv and run(args): the exit status (0; 2 with a one-line `error: ...` for bad input).

    `run` may also be None: then the parsed arguments' `func` runs (argparse subcommands).
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a parse error already printed in one line
        return int(e.code or 0)
    try:
        (run or args.func)(args)
    except DistriFusionError as e:
        print(f"error: {for_cli(str(e))}", file=sys.stderr)
        return 2
    return 0


def flag_of(field: str) -> str:
    """The command-line spelling of a DistriConfig setting, as errors name it (`split_batch` -> --no-split-batch)."""
    return FLAGS[field][0]


def for_cli(message: str) -> str:
    """An error message with the Python spelling of settings replaced by their command-line flags."""
    return message.replace("split_batch=False", flag_of("split_batch"))
