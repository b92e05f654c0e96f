"""Single-file SD / SDXL checkpoints (original layout, safetensors only): checked keys -> our converted folders."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .. import keymap
from ..cache import DEFAULT_DIR, cache_dir
from ..errors import CheckpointError, ConfigError
from ..models.clip import CLIPTextConfig, text_encoder_class
from ..models.presets import PRESETS, preset_dict
from ..models.unet import UNet2DConditionModel, UNetConfig, to_diffusers_dict
from ..models.vae import AutoencoderKL, VAEConfig
from .clip import text_encoder_key_map
from .files import CONVERTED_WEIGHTS, PICKLE_SUFFIXES, check_keys, param_shapes, resolve_dtype
from .original_layout import (
    CLIP_RULES,
    DEFAULT_CONFIGS,
    IGNORED,
    LAYOUTS,
    OPENCLIP_RULES,
    Table,
    take,
    target_shape,
    unet_rules,
    vae_rules,
)
from .vae import vae_key_map

# ---- our converted format (written by `convert` and by the single-file cache) ----
FORMAT_VERSION = 1
NOTE_KEY = "_distrifusion_jax"  # added to every config we write; diffusers ignores "_"-prefixed keys


def summary(flat: dict, src, dst, dtype_names: str, start: float, what: str = "") -> str:
    """The closing line of a conversion: tensors, parameters, dtype(s), where from and to, time taken."""
    n = sum(v.size for v in flat.values())
    return (
        f"converted {what}{len(flat)} tensors ({n:,} parameters, {dtype_names}) from {src} to {dst} "
        f"in {time.perf_counter() - start:.1f} s"
    )


def write_converted(
    dst, flat: dict, config_dict: dict, src, dtype, start: Optional[float] = None, progress: bool = True
) -> Path:
    """Write one converted model folder: `flat` ({Flax path: numpy array}, already in `dtype`) as
    `dst/flax_params.safetensors` and `config_dict` plus a `_distrifusion_jax` note (format version,
    dtype, source) as `dst/config.json`.

    With `progress`, prints the summary line (timed from `start`, a `time.perf_counter()` value) to stderr.
    """
    dt = resolve_dtype(dtype)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(dst / CONVERTED_WEIGHTS), metadata={"format": "distrifusion-jax", "dtype": dt.name})
    meta = dict(config_dict)
    meta[NOTE_KEY] = {"format_version": FORMAT_VERSION, "dtype": dt.name, "source": str(src)}
    (dst / "config.json").write_text(json.dumps(meta, indent=2))
    if progress:
        print(
            summary(flat, src, dst, dt.name, time.perf_counter() if start is None else start), file=sys.stderr
        )
    return dst


# ---- what a layout converts ----
SDXL_MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")
# Our pipeline is SDXL's: of an SD 1.x / 2.x file only the UNet is converted (a UNet folder, `load_unet`).
CONVERTED = {"sdxl": SDXL_MODELS, "sd1": ("unet",), "sd2": ("unet",)}
LAYOUT_NAMES = {"sdxl": "SDXL", "sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x"}
SDXL_FILES = "sdxl-base-1.0"  # tokenizers' pad tokens, scheduler and model_index.json of an SDXL folder
SAFETENSORS_FIX = "re-save it as .safetensors (safetensors.torch.save_file) where torch is installed"
_FILE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Component:
    """One model of a single file: its config (as written to config.json) and where each parameter comes from."""

    name: str
    prefix: str
    config: dict
    plan: dict  # {Flax path: (original key, Target, permutation or None, Flax shape)}
    file_dtype: str  # the dtype most of its tensors are stored in


@dataclasses.dataclass(frozen=True)
class SingleFile:
    """A single-file checkpoint whose keys and shapes were checked against a bundled config."""

    path: Path
    layout: str
    config_name: str
    components: tuple

    @property
    def is_sdxl(self) -> bool:
        return self.layout == "sdxl"

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)


# ---- the file ----
def is_single_file(path) -> bool:
    """Whether `path` names a checkpoint file (safetensors or a refused pickle) rather than a folder or hub id."""
    p = Path(os.fspath(path)).expanduser()
    return p.suffix in (".safetensors",) + PICKLE_SUFFIXES and not p.is_dir()


def check_file(path) -> Path:
    """`path` as an existing safetensors file; one-line errors for pickles, folders and missing files."""
    p = Path(os.fspath(path)).expanduser()
    if p.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{p}: pickle checkpoints are never unpickled here (they can run code); {SAFETENSORS_FIX}"
        )
    if not p.is_file():
        raise CheckpointError(f"checkpoint file {p} does not exist")
    with open(p, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a zip (torch.save) or a raw pickle under another name
        raise CheckpointError(
            f"{p}: a pickle checkpoint, not safetensors, whatever its name; {SAFETENSORS_FIX}"
        )
    return p


def read_header(path: Path) -> dict:
    """{key: (shape, dtype name)} from the safetensors header alone; one-line error for truncated files."""
    try:
        with safe_open(str(path), framework="np") as f:
            header = {k: f.get_slice(k) for k in f.keys()}
            header = {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in header.items()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path}: truncated or corrupt safetensors file ({e}); download it again"
        ) from None
    if not header:
        raise CheckpointError(f"{path}: holds no tensors; download it again")
    return header


def detect_layout(path: Path, keys) -> str:
    """The layout ("sdxl", "sd1" or "sd2") from the text encoders' prefixes; a one-line error for anything else."""

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if not has(LAYOUTS["sdxl"]["unet"]):
        what = (
            "a LoRA (not supported)"
            if any("lora" in k for k in keys)
            else "a diffusers-layout model file (pass its folder, with config.json)"
            if has("down_blocks.") or has("text_model.")
            else "not an SD / SDXL checkpoint"
        )
        raise CheckpointError(
            f"{path}: no model.diffusion_model.* keys: {what}; pass an original-layout SD / SDXL file"
        )
    if has("conditioner.embedders.0.model."):
        raise CheckpointError(
            f"{path}: an SDXL refiner checkpoint (one OpenCLIP encoder): not supported; pass an SDXL base file"
        )
    for layout in ("sdxl", "sd1", "sd2"):
        if all(has(p) for p in LAYOUTS[layout].values()):
            return layout
    raise CheckpointError(
        f"{path}: the text encoder keys of neither SDXL (conditioner.embedders.*) nor SD 1.x / 2.x "
        "(cond_stage_model.*) are all there; download the complete checkpoint"
    )


def candidate_configs(layout: str) -> list:
    """The bundled configs a file of this layout may have been trained with: the published one first, then every
    other bundled config with all the components the layout converts (the tiny test configs among them)."""

    def complete(name):
        try:
            for component in CONVERTED[layout]:
                preset_dict(name, component)
        except ConfigError:
            return False
        return True

    default = DEFAULT_CONFIGS[layout]
    return [default] + [n for n in PRESETS if n != default and complete(n)]


# ---- one component's plan ----
def _model(name: str, raw: dict):
    """(Flax model, its key map, config dict to write) of a bundled component config."""
    if name == "unet":
        config = UNetConfig.from_dict(raw)
        carried = {k: raw[k] for k in ("sample_size",) if k in raw}
        return UNet2DConditionModel(config), keymap.torch_to_flax, dict(to_diffusers_dict(config), **carried)
    if name == "vae":
        config = VAEConfig.from_dict(raw)
        return AutoencoderKL(config), vae_key_map, config.to_dict()
    cls, config = text_encoder_class(raw), CLIPTextConfig.from_dict(raw)
    return cls(config), text_encoder_key_map, dict(config.to_dict(), architectures=[cls.__name__])


def _table(name: str, layout: str, raw: dict) -> Table:
    if name == "unet":
        return Table(unet_rules(UNetConfig.from_dict(raw)))
    if name == "vae":
        return Table(vae_rules(VAEConfig.from_dict(raw)))
    return Table(OPENCLIP_RULES if LAYOUTS[layout][name].endswith(".model.") else CLIP_RULES)


def _plan(name: str, layout: str, config_name: str, header: dict, unmatched: list):
    """(the component, {Flax path: shape found}, {Flax path: shape expected}); keys that no rule maps, or that map
    to no parameter of the config, are added to `unmatched`."""
    raw = preset_dict(config_name, name)
    model, key_map, config_dict = _model(name, raw)
    table, prefix = _table(name, layout, raw), LAYOUTS[layout][name]
    expected = param_shapes(model)
    plan, found, sizes = {}, {}, {}
    for key, (shape, dtype) in header.items():
        if not key.startswith(prefix) or IGNORED.match(key):
            continue
        sizes[dtype] = sizes.get(dtype, 0) + int(np.prod(shape))
        targets = table.to_diffusers(key[len(prefix) :]) or ()
        mapped = [(t, key_map(t.key, target_shape(shape, t))) for t in targets]
        if not targets or any(m is None or m[0] not in expected for _, m in mapped):
            unmatched.append(key)
            continue
        for target, (path, flax_shape, perm) in mapped:
            plan[path] = (key, target, perm, expected[path])
            found[path] = flax_shape
    file_dtype = _FILE_DTYPES.get(max(sizes, key=sizes.get) if sizes else "F32", "float32")
    return Component(name, prefix, config_dict, plan, file_dtype), found, expected


def plan_single_file(path, config: Optional[str] = None) -> SingleFile:
    """Check a single-file checkpoint from its header alone: pickle refused, layout detected, every key mapped
    to a parameter of `config` (a bundled config's name; default: the first of `candidate_configs` that fits,
    the published one where it does) with its shape. One-line CheckpointError / ConfigError otherwise, listing
    the keys no rule maps."""
    path = check_file(path)
    return plan_header(read_header(path), path, config)


def plan_header(header: dict, path: Path, config: Optional[str] = None) -> SingleFile:
    """`plan_single_file` for a header {key: (shape, safetensors dtype name)} already read from `path`."""
    layout = detect_layout(path, header)
    if config is not None and config not in PRESETS:
        raise ConfigError(f"config={config!r} is not a bundled config: use one of {', '.join(PRESETS)}")
    first_error = None
    names = [config] if config else candidate_configs(layout)
    for name in names[:1] + [n for n in names[1:] if _may_fit(header, layout, n)]:
        try:
            return _plan_file(header, path, layout, name)
        except CheckpointError as e:  # the published config's error is the one to report
            first_error = first_error or e
    raise first_error


def _may_fit(header: dict, layout: str, name: str) -> bool:
    """A glance before the full plan (which traces the models): the UNet's conv_in and its number of input blocks."""
    config = UNetConfig.from_dict(preset_dict(name, "unet"))
    prefix = LAYOUTS[layout]["unet"] + "input_blocks."
    conv_in = header.get(prefix + "0.0.weight", ((),))[0]
    blocks = {k[len(prefix) :].partition(".")[0] for k in header if k.startswith(prefix)}
    return tuple(conv_in) == (config.block_out_channels[0], config.in_channels, 3, 3) and len(blocks) == (
        sum(config.layers_per_block) + config.num_levels
    )


def _plan_file(header: dict, path: Path, layout: str, config_name: str) -> SingleFile:
    unmatched = []
    plans = [_plan(name, layout, config_name, header, unmatched) for name in CONVERTED[layout]]
    prefixes = tuple(LAYOUTS[layout].values())
    unmatched += [k for k in header if not k.startswith(prefixes) and not IGNORED.match(k)]
    if unmatched:
        keys = sorted(set(unmatched))
        shown = "; ".join(keys[:10]) + (f"; ... ({len(keys) - 10} more)" if len(keys) > 10 else "")
        raise CheckpointError(
            f"{path}: {len(keys)} key(s) match no parameter of the {LAYOUT_NAMES[layout]} layout with config "
            f"{config_name} [{shown}]: another architecture (inpainting, refiner, LoRA) or config; pass "
            "--config / config= naming the bundled config it was trained with"
        )
    for component, found, expected in plans:
        check_keys(expected, found, f"{path} ({component.prefix}*, config {config_name})")
    return SingleFile(path, layout, config_name, tuple(c for c, _, _ in plans))


# ---- reading and writing ----
def read_component(sf: SingleFile, name: str, dtype, progress=None) -> dict:
    """Flat {Flax path: numpy array in `dtype`} of one component of a planned single file."""
    dt, component = resolve_dtype(dtype), sf.component(name)
    by_key: dict = {}
    for path, (key, target, perm, shape) in component.plan.items():
        by_key.setdefault(key, []).append((path, target, perm, shape))
    keys = sorted(by_key)
    flat = {}
    with safe_open(str(sf.path), framework="np") as f:
        for key in progress(keys, total=len(keys)) if progress else keys:
            try:
                array = f.get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{sf.path}: truncated or corrupt at {key} ({e}); download it again"
                ) from None
            for path, target, perm, shape in by_key[key]:
                part = take(array, target)
                part = part.transpose(perm) if perm else part
                flat[path] = np.ascontiguousarray(part.astype(dt).reshape(shape))
    return flat


def stored_dtypes(sf: SingleFile, dtype=None) -> dict:
    """{component: dtype name} to store: `dtype` (default: the dtype the file stores that component in), the
    VAE in float32 where its config has force_upcast (SDXL's VAE overflows in float16)."""
    out = {}
    for c in sf.components:
        name = resolve_dtype(dtype or c.file_dtype).name
        out[c.name] = "float32" if c.name == "vae" and c.config.get("force_upcast", True) else name
    return out


def _package_file(*parts: str):
    return resources.files("distrifusion_jax").joinpath(*parts)


def write_tokenizers(folder: Path) -> None:
    """tokenizer/ and tokenizer_2/ from the bundled CLIP vocabulary; tokenizer_2 pads with "!" (id 0), as SDXL's."""
    assets = _package_file("assets", "clip-tokenizer")
    base = json.loads(assets.joinpath("tokenizer_config.json").read_text())
    for name, pad in (("tokenizer", base["pad_token"]), ("tokenizer_2", "!")):
        out = folder / name
        out.mkdir(parents=True, exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            (out / f).write_bytes(assets.joinpath(f).read_bytes())
        (out / "tokenizer_config.json").write_text(json.dumps(dict(base, pad_token=pad), indent=2))
        special = {k: base[k] for k in ("bos_token", "eos_token", "unk_token")}
        (out / "special_tokens_map.json").write_text(json.dumps(dict(special, pad_token=pad), indent=2))


def write_single_file(sf: SingleFile, out: Path, dtypes: dict, progress=None) -> dict:
    """Write the planned file's conversion into the empty folder `out`: an SDXL pipeline folder (the four models,
    the bundled tokenizers, scheduler and model_index.json), or for SD 1.x / 2.x the UNet folder. `progress(desc)`
    gives a tensor progress wrapper. Returns every tensor written (for the summary line)."""
    totals = {}
    for c in sf.components:
        bar = progress(f"  {c.name}") if progress else None
        flat = read_component(sf, c.name, dtypes[c.name], bar)
        source = f"{sf.path} ({c.prefix}*)"
        write_converted(
            out / c.name if sf.is_sdxl else out, flat, c.config, source, dtypes[c.name], progress=False
        )
        totals.update({f"{c.name}/{k}": v for k, v in flat.items()})
    if sf.is_sdxl:
        write_tokenizers(out)
        (out / "scheduler").mkdir()
        scheduler = _package_file("configs", SDXL_FILES, "scheduler", "scheduler_config.json").read_text()
        (out / "scheduler" / "scheduler_config.json").write_text(scheduler)
        index = json.loads(_package_file("configs", SDXL_FILES, "model_index.json").read_text())
        index[NOTE_KEY] = {
            "format_version": FORMAT_VERSION,
            "dtype": dtypes["unet"],
            "vae_dtype": dtypes["vae"],
            "source": str(sf.path),
            "config": sf.config_name,
        }
        (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return totals


# ---- converted once, kept in the cache folder ----
def single_file_cache(setting=None) -> Path:
    """Where single files are converted for `from_pretrained`: `single-file/` in the compilation cache folder
    (`setting`, else $DISTRIFUSION_JAX_CACHE, else ~/.cache/distrifusion-jax/xla; its default with "off")."""
    return (cache_dir(setting) or DEFAULT_DIR.expanduser()) / "single-file"


def cached_pipeline(path, config: Optional[str] = None, cache=None) -> Path:
    """The SDXL pipeline folder of a single-file checkpoint, converted on first use into `single_file_cache`
    (keyed by the file's name, size and modification time and the config; stored in the file's own dtypes, so
    nothing is lost) and reused afterwards. Every header check runs first; SD 1.x / 2.x files are refused."""
    sf = plan_single_file(path, config)
    if not sf.is_sdxl:
        raise CheckpointError(
            f"{sf.path}: a {LAYOUT_NAMES[sf.layout]} checkpoint; the pipeline runs SDXL only: convert its UNet "
            "with `distrifusion-jax convert FILE OUT` and load it with load_unet"
        )
    stat = sf.path.stat()
    key = repr((str(sf.path.resolve()), stat.st_size, stat.st_mtime_ns, sf.config_name, FORMAT_VERSION))
    folder = single_file_cache(cache) / f"{sf.path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (folder / "model_index.json").is_file():
        return folder
    print(f"converting {sf.path} once into {folder} (reused next time)", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.partial-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        write_single_file(sf, tmp, stored_dtypes(sf))
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "model_index.json").is_file():  # another process may have won the race
            raise
    return folder
