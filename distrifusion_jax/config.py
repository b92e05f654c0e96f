"""Frozen model configurations read from diffusers `config.json` files, with named presets."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from typing import Any, Optional

import numpy as np

from .errors import ConfigError

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
ACTIVATIONS = ("silu", "swish", "gelu", "mish")

# diffusers fields we accept only at one value (the one SDXL and SD 1.x / 2.x use). Anything else
# would silently change the computation, so it is rejected with the field's name.
_FIXED_FIELDS: dict[str, tuple] = {
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "dual_cross_attention": (False,),
    "attention_type": ("default",),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "downsample_padding": (1,),
    "reverse_transformer_layers_per_block": (None,),
}
# Fields that do not affect inference (dropout) or only describe the checkpoint.
_IGNORED_FIELDS = ("dropout", "sample_size", "addition_embed_type_num_heads")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Configuration of a `UNet2DConditionModel`, per-level fields normalised to tuples.

    Field names and meanings are diffusers'. In particular the number of attention heads of a level
    is `num_attention_heads[i]` when given, else `attention_head_dim[i]` (diffusers' historical
    naming: in SD and SDXL configs `attention_head_dim` holds head counts).
    """

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: tuple = (2, 2, 2, 2)
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: tuple = (1280, 1280, 1280, 1280)
    transformer_layers_per_block: tuple = (1, 1, 1, 1)
    attention_head_dim: tuple = (8, 8, 8, 8)
    num_attention_heads: Optional[tuple] = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None

    # ---- derived ----
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def num_downsamplers(self) -> int:
        return self.num_levels - 1

    @property
    def heads(self) -> tuple:
        return self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    # ---- construction ----
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "UNetConfig":
        """Validate a diffusers UNet `config.json` dict; reject unknown fields and unsupported values."""
        d = {k: v for k, v in raw.items() if not k.startswith("_")}
        cls_name = raw.get("_class_name", "UNet2DConditionModel")
        if cls_name != "UNet2DConditionModel":
            raise ConfigError(f"unsupported UNet class _class_name={cls_name!r}: only UNet2DConditionModel is supported")
        for key, allowed in _FIXED_FIELDS.items():
            if key in d:
                value = d.pop(key)
                if value not in allowed:
                    raise ConfigError(
                        f"unsupported UNet config value {key}={value!r}: supported {_fmt_allowed(allowed)}")
        for key in _IGNORED_FIELDS:
            d.pop(key, None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown UNet config field(s) {', '.join(unknown)}: not part of the supported "
                              "UNet2DConditionModel configuration; remove them or check the file")
        levels = len(d.get("block_out_channels", cls.block_out_channels))

        def per_level(key, default):
            value = d.get(key, default)
            if isinstance(value, (list, tuple)):
                if len(value) != levels:
                    raise ConfigError(f"UNet config {key}={list(value)!r} has {len(value)} entries but the model "
                                      f"has {levels} levels (len(block_out_channels))")
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                    raise ConfigError(f"unsupported UNet config value {key}={value!r}: expected an int or a list "
                                      "of ints, one per level")
                return tuple(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"unsupported UNet config value {key}={value!r}: expected an int or a list of ints")
            return (value,) * levels

        out = dict(d)
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in out:
                out[key] = tuple(out[key])
        out["layers_per_block"] = per_level("layers_per_block", 2)
        out["cross_attention_dim"] = per_level("cross_attention_dim", 1280)
        out["transformer_layers_per_block"] = per_level("transformer_layers_per_block", 1)
        out["attention_head_dim"] = per_level("attention_head_dim", 8)
        if d.get("num_attention_heads") is not None:
            out["num_attention_heads"] = per_level("num_attention_heads", None)
        oca = d.get("only_cross_attention", False)
        if (isinstance(oca, (list, tuple)) and any(oca)) or (not isinstance(oca, (list, tuple)) and oca):
            raise ConfigError(f"unsupported UNet config value only_cross_attention={oca!r}: supported false")
        out["only_cross_attention"] = False
        config = cls(**out)
        config.validate()
        return config

    @classmethod
    def from_json(cls, path) -> "UNetConfig":
        return cls.from_dict(read_json(path))

    def validate(self) -> None:
        n = self.num_levels
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(f"UNet config: down_block_types ({len(self.down_block_types)}) and up_block_types "
                              f"({len(self.up_block_types)}) must both have len(block_out_channels)={n} entries")
        for key, allowed, values in (("down_block_types", DOWN_BLOCK_TYPES, self.down_block_types),
                                     ("up_block_types", UP_BLOCK_TYPES, self.up_block_types)):
            for v in values:
                if v not in allowed:
                    raise ConfigError(f"unsupported UNet config value {key} entry {v!r}: supported {_fmt_allowed(allowed)}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ConfigError(f"unsupported UNet config value mid_block_type={self.mid_block_type!r}: "
                              f"supported {_fmt_allowed(MID_BLOCK_TYPES)}")
        if self.act_fn not in ACTIVATIONS:
            raise ConfigError(f"unsupported UNet config value act_fn={self.act_fn!r}: supported {_fmt_allowed(ACTIVATIONS)}")
        if self.addition_embed_type not in (None, "text_time"):
            raise ConfigError(f"unsupported UNet config value addition_embed_type={self.addition_embed_type!r}: "
                              "supported None, 'text_time'")
        if self.addition_embed_type == "text_time" and (
                self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None):
            raise ConfigError("UNet config: addition_embed_type='text_time' needs addition_time_embed_dim and "
                              "projection_class_embeddings_input_dim")
        for i, (c, h) in enumerate(zip(self.block_out_channels, self.heads)):
            if c % self.norm_num_groups:
                raise ConfigError(f"UNet config: block_out_channels[{i}]={c} is not divisible by "
                                  f"norm_num_groups={self.norm_num_groups}")
            has_attn = self.down_block_types[i] == "CrossAttnDownBlock2D" or (
                self.up_block_types[n - 1 - i] == "CrossAttnUpBlock2D") or i == n - 1
            if has_attn and c % h:
                raise ConfigError(f"UNet config: block_out_channels[{i}]={c} is not divisible by its "
                                  f"{h} attention heads")


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


def _fmt_allowed(allowed) -> str:
    return ", ".join(repr(a) for a in allowed)


def _as_int(value) -> Optional[int]:
    """`value` as a Python int if it is an integer (numpy's included), else None.

    bool is refused: `True` would pass for 1 and hide a misplaced argument.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


_DEVICES_FORMS = ("pass None (all of jax.devices()), a positive int (the first N of jax.devices()) or a "
                  "non-empty list of jax devices")


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


def _preset(name: str) -> dict:
    text = resources.files(__package__).joinpath("configs", name, "unet", "config.json").read_text()
    return json.loads(text)


def sdxl_base() -> UNetConfig:
    """stabilityai/stable-diffusion-xl-base-1.0 UNet (2,567,463,684 parameters)."""
    return UNetConfig.from_dict(_preset("sdxl-base-1.0"))


def sd15() -> UNetConfig:
    """Stable Diffusion 1.5 UNet (859,520,964 parameters)."""
    return UNetConfig.from_dict(_preset("sd-1.5"))


def sd21() -> UNetConfig:
    """Stable Diffusion 2.1 (768-v) UNet (865,910,724 parameters)."""
    return UNetConfig.from_dict(_preset("sd-2.1"))


def to_diffusers_dict(config: UNetConfig) -> dict:
    """The config as a diffusers `config.json` dict (diffusers can build the same model from it)."""
    d = dataclasses.asdict(config)
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
    d["_class_name"] = "UNet2DConditionModel"
    if d["num_attention_heads"] is None:
        del d["num_attention_heads"]
    return d


PARALLELISMS = ("patch", "naive_patch", "tensor")
SPLIT_SCHEMES = ("row", "col", "alternate")
MODES = ("corrected_async_gn", "stale_gn", "sync_gn", "separate_gn", "full_sync", "no_sync")
STALE_KV = ("kv", "hidden")
STALE_KV_DTYPES = (None, "bfloat16", "float8_e4m3fn", "int8")


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
      (heads and channels split, the reference's baseline: distrifusion_jax.parallel.tensor), which
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
            raise ConfigError(f"stale_kv_dtype={self.stale_kv_dtype!r} must be given by name: one of "
                              f"{_fmt_allowed(STALE_KV_DTYPES)}")
        for name, value, allowed in (("mode", self.mode, MODES), ("parallelism", self.parallelism, PARALLELISMS),
                                     ("split_scheme", self.split_scheme, SPLIT_SCHEMES),
                                     ("stale_kv", self.stale_kv, STALE_KV),
                                     ("stale_kv_dtype", self.stale_kv_dtype, STALE_KV_DTYPES)):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}: use one of {_fmt_allowed(allowed)}")
        for name in ("height", "width"):
            v = _as_int(getattr(self, name))
            if v is None or v <= 0 or v % 8:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive multiple of 8 (the VAE's "
                                  f"downsampling){', given as an int' if v is None else ''}")
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
                raise ConfigError(f"devices={self.devices} but JAX sees {len(available)} "
                                  f"({available[0].platform}); on a CPU host set "
                                  f"jax.config.update('jax_num_cpu_devices', {self.devices}) before using JAX")
            return tuple(available[: self.devices])
        return tuple(self.devices)

    def layout(self, n_devices: int) -> tuple[int, int]:
        """(cfg axis size, patch axis size) for n devices, with a clear error where n does not fit."""
        if n_devices == 1:
            return 1, 1
        if self.do_classifier_free_guidance and self.split_batch:
            if n_devices % 2:
                raise ConfigError(f"the CFG split needs an even number of devices, got {n_devices}: use an even "
                                  "count or split_batch=False")
            return 2, n_devices // 2
        return 1, n_devices

    def check_model(self, unet_config: UNetConfig, n_devices: int) -> None:
        """Latent sizes must split into equal bands down to the lowest UNet resolution."""
        _, patches = self.layout(n_devices)
        if patches == 1 or self.parallelism == "tensor":  # tensor parallelism does not split the image
            return
        f = 2 ** unet_config.num_downsamplers
        checks = [("height", self.latent_height)]
        if self.parallelism == "naive_patch" and self.split_scheme != "row":
            checks.append(("width", self.latent_width))
        for name, size in checks:
            if size % (patches * f):
                unit = 8 * patches * f
                lo, hi = (8 * size) // unit * unit, ((8 * size) // unit + 1) * unit
                examples = f"{lo} or {hi}" if lo else f"{hi}"
                raise ConfigError(
                    f"{name}={8 * size} does not split into {patches} patches: the latent {name} {size} must be "
                    f"divisible by {patches} x 2^{unet_config.num_downsamplers}; use a multiple of {unit} "
                    f"(e.g. {examples}) or fewer devices")
