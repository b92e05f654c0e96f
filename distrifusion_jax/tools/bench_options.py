"""The benchmark's options: one frozen, checked object, from the command line or built in Python.

BenchmarkOptions(random="tiny", distri=DistriConfig(64, 64, devices=4, warmup_steps=0), steps=2,
                 dtype="float32", repeats=2, overhead=True)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Optional

from ..arguments import SEED_LIMIT
from ..config import DTYPE_NAMES, DistriConfig
from ..errors import ConfigError, DistriFusionError
from ..flags import distri_config_from_args
from ..schedulers import SCHEDULERS

CONFIGS = ("single", "full_sync", "displaced", "naive_patch", "tensor")
RANDOM = ("sdxl", "tiny")
# the image size without --height: SDXL's, or a size the tiny UNet runs in seconds on a CPU
DEFAULT_SIZE = {"sdxl": 1024, "tiny": 256}
# DistriConfig's flags the benchmark takes from flags.py (each configuration sets its own parallelism)
SKIPPED_FLAGS = ("parallelism",)


def _check_count(name: str, value) -> None:
    """--steps, --repeats, --batch: a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DistriFusionError(f"--{name} {value!r}: must be a whole number, at least 1")
    if value < 1:
        raise DistriFusionError(f"--{name} {value}: must be at least 1")


def parse_configs(configs) -> tuple:
    """--configs as a tuple of names: "a,b" or a sequence; 'none' and blanks dropped."""
    items = configs.split(",") if isinstance(configs, str) else list(configs)
    return tuple(c.strip() for c in items if c.strip() not in ("", "none"))


def check_json_path(path, overwrite: bool = False) -> None:
    """The report can be written there: checked before the run, not after it (minutes on a GPU)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"--json {path} is a folder; name a file in it, e.g. {p / 'report.json'}")
    if p.exists() and not overwrite:
        raise ConfigError(
            f"--json {path} already exists; pass --overwrite to replace it, or choose another name"
        )
    if not p.parent.is_dir():
        raise ConfigError(
            f"--json {path}: folder {p.parent} does not exist; create it first (mkdir -p {p.parent}) "
            "or write elsewhere"
        )
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--json {path}: folder {p.parent} is not writable; write the report elsewhere")


@dataclasses.dataclass(frozen=True)
class BenchmarkOptions:
    """What the benchmark runs, checked on construction (one-line DistriFusionErrors naming the flag).

    model / random: a pipeline folder (or hub id) with unet/ and vae/, or random weights ("sdxl": the
      full-size UNet + VAE made on the devices; "tiny": the small-sdxl UNet and the tiny-sdxl VAE); exactly
      one of them.
    distri: the displaced configuration (image size, devices, split_batch, warmup_steps, mode, the stale
      K/V options; split_scheme for naive_patch); the other configurations change its parallelism, mode
      or warmup. Default: DEFAULT_SIZE's square image on all devices.
    configs: a subset of CONFIGS (a tuple, or "a,b" as --configs takes it); empty only with overhead.
    """

    model: Optional[str] = None
    random: Optional[str] = None
    distri: Optional[DistriConfig] = None
    steps: int = 50
    scheduler: str = "ddim"
    dtype: str = "bfloat16"
    vae_dtype: str = "float32"
    batch: int = 1
    guidance_scale: float = 5.0
    configs: tuple = CONFIGS
    repeats: int = 5
    overhead: bool = False
    dry_run: bool = False
    seed: int = 0
    json: Optional[str] = None
    overwrite: bool = False

    def __post_init__(self):
        self._check_source()
        if self.distri is None:
            size = DEFAULT_SIZE[self.random or "sdxl"]
            object.__setattr__(self, "distri", DistriConfig(size, size))
        if not isinstance(self.distri, DistriConfig):
            raise ConfigError(f"distri={self.distri!r}: pass a DistriConfig")
        configs = parse_configs(self.configs)
        unknown = [c for c in configs if c not in CONFIGS]
        if unknown or not (configs or self.overhead):
            raise DistriFusionError(
                f"--configs {','.join(unknown) or 'none'}: choose from {','.join(CONFIGS)} "
                "('none' only with --overhead)"
            )
        object.__setattr__(self, "configs", configs)
        for name in ("steps", "repeats", "batch"):
            _check_count(name, getattr(self, name))
        self._check_choices()
        if self.json:
            check_json_path(self.json, self.overwrite)

    def _check_source(self) -> None:
        if (self.model is None) == (self.random is None):
            raise DistriFusionError("one of --model (a pipeline) and --random (random weights) is required")
        if self.random is not None and self.random not in RANDOM:
            raise DistriFusionError(f"--random {self.random}: choose from {', '.join(RANDOM)}")

    def _check_choices(self) -> None:
        choices = (
            ("--scheduler", self.scheduler, tuple(SCHEDULERS)),
            ("--dtype", self.dtype, DTYPE_NAMES),
            ("--vae-dtype", self.vae_dtype, DTYPE_NAMES),
        )
        for flag, value, allowed in choices:
            if value not in allowed:
                raise DistriFusionError(f"{flag} {value}: choose from {', '.join(allowed)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise DistriFusionError(f"--seed {self.seed}: pass a whole number 0 <= seed < 2^63")

    @property
    def height(self) -> int:
        return self.distri.height

    @property
    def width(self) -> int:
        return self.distri.width

    @property
    def source(self) -> str:
        """The model as the report names it."""
        return self.model or f"random {self.random}"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchmarkOptions":
        """The options of a parsed `benchmark` command line (see tools/benchmark.py's add_arguments)."""
        height = args.height or DEFAULT_SIZE[args.random or "sdxl"]
        distri = distri_config_from_args(args, height=height, width=args.width or height)
        fields = {f.name for f in dataclasses.fields(cls)} - {"distri"}
        return cls(distri=distri, **{name: getattr(args, name) for name in fields})
