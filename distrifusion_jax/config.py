"""`DistriConfig` (how one image is split over devices), the parallel enumerations, and the JSON reader."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import numpy as np

from .errors import ConfigError

# The parallel enumerations: DistriConfig's choices, imported by everything else that names them.
PARALLELISMS = ("patch", "naive_patch", "tensor")
SPLIT_SCHEMES = ("row", "col", "alternate")
MODES = ("corrected_async_gn", "stale_gn", "sync_gn", "separate_gn", "full_sync", "no_sync")
STALE_KV = ("kv", "hidden")
STALE_KV_DTYPES = (None, "bfloat16", "float8_e4m3fn", "int8")
# Compute and parameter dtypes accepted by name (command lines, converter, loaders); `jnp.dtype(name)` makes one.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def read_json(path) -> dict:
    """A config.json as a dict; ConfigError if it is not valid JSON or not an object."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw


def fmt_allowed(allowed) -> str:
    return ", ".join(repr(a) for a in allowed)


def _as_int(value) -> Optional[int]:
    """`value` as a Python int if it is an integer (numpy's included), else None.

    bool is refused: `True` would pass for 1 and hide a misplaced argument.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


_DEVICES_FORMS = (
    "pass None (all of jax.devices()), a positive int (the first N of jax.devices()) or a "
    "non-empty list of jax devices"
)


def _check_devices(devices):
    """DistriConfig.devices normalised (an int, a tuple of devices or None), or a one-line ConfigError."""
    if devices is None:
        return None
    n = _as_int(devices)
    if n is not None:
        if n < 1:
            raise ConfigError(f"devices={devices} must be at least 1: {_DEVICES_FORMS}")
        return n
    if isinstance(devices, (str, bytes)) or not isinstance(devices, (list, tuple)):
        raise ConfigError(f"devices={devices!r} is not supported: {_DEVICES_FORMS}")
    import jax  # only for the Device type: no backend is started here

    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise ConfigError(f"devices={list(devices)!r} is not supported: {_DEVICES_FORMS}")
    if len(set(devices)) != len(devices):
        raise ConfigError(f"devices lists a device more than once ({list(devices)!r}): list each device once")
    return tuple(devices)


@dataclasses.dataclass(frozen=True)
class DistriConfig:
    """How one image is split across devices (names and defaults as in mit-han-lab/distrifuser).

    height, width: image size in pixels (latents are 1/8 of it).
    devices: the devices to use, or their number (the first N of `jax.devices()`); None: all.
    do_classifier_free_guidance, split_batch: with guidance and an even number of devices >= 2,
      the mesh gets a `cfg` axis of size 2 (one half per guidance branch).
    warmup_steps: steps with index <= warmup_steps run synchronous patch parallelism (exact); a
      warmup at least as long as the run makes the whole run synchronous.
    mode: behaviour of displaced steps, one of MODES.
    parallelism: "patch" (DistriFusion) or "naive_patch" (independent patches, no exchange), the
      latter split by "row", "col" or "alternate" (rows on even steps, columns on odd); or "tensor"
      (heads and channels split, the reference's baseline: distrifusion_jax.tensor_parallel), which
      ignores mode, warmup_steps and split_scheme.
    stale_kv: what each self-attention keeps for displaced steps and exchanges: "kv" (its K and V,
      as distrifuser) or "hidden" (its input tokens, C channels instead of 2C: half the stale memory
      and K/V communication; the whole image's K/V are projected from them every step with the
      layer's to_k / to_v, which costs (P - 1) / P more of those projections' FLOPs per device).
    stale_kv_dtype: how those tokens are stored and exchanged: None (the compute dtype),
      "bfloat16", or "float8_e4m3fn" / "int8" (1 byte each, plus a float32 scale per token and head:
      symmetric absmax quantisation before the all_gather, dequantised where read). Synchronous
      (warmup) steps still attend to the exact tokens; only what is kept for the next step is
      encoded. A device's own band is always fresh and exact.
    One device means the plain single-device loop, whatever the other fields say.
    Constructing it has no side effects: no devices are touched until `resolve_devices()`.
    """

    height: int = 1024
    width: int = 1024
    devices: Any = None
    do_classifier_free_guidance: bool = True
    split_batch: bool = True
    warmup_steps: int = 4
    mode: str = "corrected_async_gn"
    parallelism: str = "patch"
    split_scheme: str = "row"
    stale_kv: str = "kv"
    stale_kv_dtype: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.stale_kv_dtype, (str, type(None))):
            raise ConfigError(
                f"stale_kv_dtype={self.stale_kv_dtype!r} must be given by name: one of "
                f"{fmt_allowed(STALE_KV_DTYPES)}"
            )
        for name, value, allowed in (
            ("mode", self.mode, MODES),
            ("parallelism", self.parallelism, PARALLELISMS),
            ("split_scheme", self.split_scheme, SPLIT_SCHEMES),
            ("stale_kv", self.stale_kv, STALE_KV),
            ("stale_kv_dtype", self.stale_kv_dtype, STALE_KV_DTYPES),
        ):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}: use one of {fmt_allowed(allowed)}")
        for name in ("height", "width"):
            v = _as_int(getattr(self, name))
            if v is None or v <= 0 or v % 8:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} must be a positive multiple of 8 (the VAE's "
                    f"downsampling){', given as an int' if v is None else ''}"
                )
            object.__setattr__(self, name, v)
        warmup = _as_int(self.warmup_steps)
        if warmup is None or warmup < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps!r} must be an int >= 0")
        object.__setattr__(self, "warmup_steps", warmup)
        object.__setattr__(self, "devices", _check_devices(self.devices))

    @property
    def latent_height(self) -> int:
        return self.height // 8

    @property
    def latent_width(self) -> int:
        return self.width // 8

    def resolve_devices(self) -> tuple:
        """The devices to run on (checked against what JAX sees)."""
        import jax

        available = jax.devices()
        if self.devices is None:
            return tuple(available)
        if isinstance(self.devices, int):
            if self.devices > len(available):
                raise ConfigError(
                    f"devices={self.devices} but JAX sees {len(available)} "
                    f"({available[0].platform}); on a CPU host set "
                    f"jax.config.update('jax_num_cpu_devices', {self.devices}) before using JAX"
                )
            return tuple(available[: self.devices])
        return tuple(self.devices)

    def layout(self, n_devices: int) -> tuple[int, int]:
        """(cfg axis size, patch axis size) for n devices, with a clear error where n does not fit."""
        if n_devices == 1:
            return 1, 1
        if self.do_classifier_free_guidance and self.split_batch:
            if n_devices % 2:
                raise ConfigError(
                    f"the CFG split needs an even number of devices, got {n_devices}: use an even "
                    "count or split_batch=False"
                )
            return 2, n_devices // 2
        return 1, n_devices

    def check_model(self, unet_config, n_devices: int) -> None:
        """Latent sizes must go down to the lowest level of `unet_config` (a UNetConfig), and split into equal
        bands there when the layout splits the image."""
        _, patches = self.layout(n_devices)
        if self.parallelism == "tensor":  # tensor parallelism does not split the image
            patches = 1
        f = 2**unet_config.num_downsamplers
        cols = self.parallelism == "naive_patch" and self.split_scheme != "row"
        for name, size, parts in (
            ("height", self.latent_height, patches),
            ("width", self.latent_width, patches if cols else 1),
        ):
            if size % (parts * f):
                unit = 8 * parts * f
                lo, hi = (8 * size) // unit * unit, ((8 * size) // unit + 1) * unit
                examples = f"{lo} or {hi}" if lo else f"{hi}"
                if parts == 1:
                    raise ConfigError(
                        f"{name}={8 * size}: the latent {name} {size} must be divisible by "
                        f"2^{unet_config.num_downsamplers} for this UNet; use a multiple of {unit} (e.g. {examples})"
                    )
                raise ConfigError(
                    f"{name}={8 * size} does not split into {parts} patches: the latent {name} {size} must be "
                    f"divisible by {parts} x 2^{unet_config.num_downsamplers}; use a multiple of {unit} "
                    f"(e.g. {examples}) or fewer devices"
                )
