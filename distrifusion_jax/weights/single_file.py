"""Single-file SD / SDXL checkpoints (original layout, safetensors only): checked keys -> our converted folders."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors import SafetensorError, safe_open

from .. import keymap
from ..cache import DEFAULT_DIR, cache_dir
from ..errors import CheckpointError, ConfigError
from ..models.clip import CLIPTextConfig, text_encoder_class
from ..models.presets import PRESETS, preset_dict
from ..models.unet import UNet2DConditionModel, UNetConfig, to_diffusers_dict
from ..models.vae import AutoencoderKL, VAEConfig
from .clip import text_encoder_key_map
from .converted import (
    CLIP_PAD,
    FORMAT_VERSION,
    OPENCLIP_PAD,
    SDXL_TOKENIZERS,
    package_file,
    write_converted,
    write_pipeline_files,
)
from .derived_configs import derive_config
from .files import PICKLE_SUFFIXES, check_keys, param_shapes, resolve_dtype
from .original_layout import (
    DEFAULT_CONFIGS,
    DROPPED_LAYERS,
    IGNORED,
    LAYOUTS,
    Table,
    component_rules,
    take,
    target_shape,
)
from .vae import vae_key_map

# ---- what a layout converts ----
SDXL_MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")
SD_MODELS = ("unet", "vae", "text_encoder")
CONVERTED = {"sdxl": SDXL_MODELS, "sd1": SD_MODELS, "sd2": SD_MODELS}  # each into a pipeline folder
LAYOUT_NAMES = {"sdxl": "SDXL", "sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x"}
SDXL_LAYOUTS, SD_LAYOUTS = ("sdxl",), ("sd1", "sd2")
# A pipeline family (ModelFiles.family): its layouts, and the class that runs it
FAMILY_LAYOUTS = {"sdxl": SDXL_LAYOUTS, "sd": SD_LAYOUTS}
PIPELINE_OF = {"sdxl": "DistriSDXLPipeline", "sd": "DistriSDPipeline"}
PIPELINE_CLASSES = {
    layout: PIPELINE_OF[family] for family, layouts in FAMILY_LAYOUTS.items() for layout in layouts
}
# The tokenizer folders of each layout's pipeline (all on the bundled CLIP vocabulary) and their pad tokens
TOKENIZERS = {"sdxl": SDXL_TOKENIZERS, "sd1": {"tokenizer": CLIP_PAD}, "sd2": {"tokenizer": OPENCLIP_PAD}}
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
    derived: bool = False  # config derived from the file's shapes (the bundled config has none for it)


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

    @property
    def files_config(self) -> str:
        """The bundled config whose scheduler and model_index.json the pipeline folder gets: the file's own
        config where it has them, else the layout's published one."""
        if package_file("configs", self.config_name, "model_index.json").is_file():
            return self.config_name
        return DEFAULT_CONFIGS[self.layout]


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
    other bundled config with a UNet (the tiny test configs among them; the models it has no config for are
    derived from the file's shapes, `derived_configs`)."""

    def has_unet(name):
        try:
            preset_dict(name, "unet")
        except ConfigError:
            return False
        return True

    default = DEFAULT_CONFIGS[layout]
    return [default] + [n for n in PRESETS if n != default and has_unet(n)]


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


def derived_config(name: str, layout: str, header: dict, where) -> dict:
    """The config of the model `name` (the VAE or a text encoder) of a file of `layout`, from its header: the
    layout's published config with the sizes the tensors show (`derived_configs`); `where` names it in errors."""
    template = preset_dict(DEFAULT_CONFIGS[layout], name)
    table, prefix = Table(component_rules(name, layout, template, derive=True)), LAYOUTS[layout][name]
    shapes = {}
    for key, (shape, _) in header.items():
        if key.startswith(prefix) and not IGNORED.match(key):
            for target in table.to_diffusers(key[len(prefix) :]) or ():
                shapes[target.key] = target_shape(shape, target)
    return derive_config(
        name, template, shapes, DROPPED_LAYERS.get((layout, name), 0), f"{where} ({prefix}*)"
    )


def _component_config(name: str, layout: str, config_name: str, header: dict, where):
    """(config dict, derived): the bundled config's, else (not for a UNet) `derived_config`."""
    try:
        return preset_dict(config_name, name), False
    except ConfigError:
        if name == "unet":
            raise
    return derived_config(name, layout, header, where), True


def _plan(name: str, layout: str, config_name: str, header: dict, source: Path, unmatched: list):
    """(the component, {Flax path: shape found}, {Flax path: shape expected}); keys that no rule maps, or that map
    to no parameter of the config, are added to `unmatched` (keys a rule skips are left out)."""
    raw, derived = _component_config(name, layout, config_name, header, source)
    model, key_map, config_dict = _model(name, raw)
    table, prefix = Table(component_rules(name, layout, raw)), LAYOUTS[layout][name]
    expected = param_shapes(model)
    plan, found, sizes = {}, {}, {}
    for key, (shape, dtype) in header.items():
        if not key.startswith(prefix) or IGNORED.match(key):
            continue
        targets = table.to_diffusers(key[len(prefix) :])
        if targets == []:  # skipped by rule
            continue
        sizes[dtype] = sizes.get(dtype, 0) + int(np.prod(shape))
        mapped = [(t, key_map(t.key, target_shape(shape, t))) for t in targets or ()]
        if not targets or any(m is None or m[0] not in expected for _, m in mapped):
            unmatched.append(key)
            continue
        for target, (path, flax_shape, perm) in mapped:
            plan[path] = (key, target, perm, expected[path])
            found[path] = flax_shape
    file_dtype = _FILE_DTYPES.get(max(sizes, key=sizes.get) if sizes else "F32", "float32")
    return Component(name, prefix, config_dict, plan, file_dtype, derived), found, expected


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
    if config is not None:
        return _plan_file(header, path, layout, config)
    names, errors = candidate_configs(layout), {}
    fitting = [n for n in names if _may_fit(header, layout, n)]  # a glance first: planning traces the models
    for name in fitting:
        try:
            return _plan_file(header, path, layout, name)
        except CheckpointError as e:
            errors[name] = e
    if names[0] in errors:  # the published config's error is the one to report
        raise errors[names[0]]
    return _plan_file(header, path, layout, names[0])  # raises it


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
    plans = [_plan(name, layout, config_name, header, path, unmatched) for name in CONVERTED[layout]]
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


def write_single_file(sf: SingleFile, out: Path, dtypes: dict, progress=None) -> dict:
    """Write the planned file's conversion into the empty folder `out`: a pipeline folder, SDXL's (the four
    models) or SD 1.x / 2.x's (unet, vae, text_encoder), with the bundled tokenizers, scheduler and
    model_index.json (`SingleFile.files_config`). `progress(desc)` gives a tensor progress wrapper. Returns every
    tensor written (for the summary line)."""
    totals = {}
    for c in sf.components:
        bar = progress(f"  {c.name}") if progress else None
        flat = read_component(sf, c.name, dtypes[c.name], bar)
        source = f"{sf.path} ({c.prefix}*)"
        write_converted(out / c.name, flat, c.config, source, dtypes[c.name], progress=False)
        totals.update({f"{c.name}/{k}": v for k, v in flat.items()})
    note = {
        "format_version": FORMAT_VERSION,
        "dtype": dtypes["unet"],
        "vae_dtype": dtypes["vae"],
        "source": str(sf.path),
        "config": sf.config_name,
    }
    derived = [c.name for c in sf.components if c.derived]
    if derived:  # their configs came from the file's shapes
        note["derived_configs"] = derived
    write_pipeline_files(out, sf.files_config, TOKENIZERS[sf.layout], note)
    return totals


def sd2_note(sf: SingleFile, config: Optional[str]) -> str:
    """For an SD 2.x file whose config was not named: that it was taken for a v-prediction model, and how to
    choose an epsilon one (the keys cannot tell them apart)."""
    if sf.layout != "sd2" or config is not None:
        return ""
    if (
        preset_dict(sf.files_config, "scheduler", "scheduler_config.json")["prediction_type"]
        != "v_prediction"
    ):
        return ""
    return (
        f"an SD 2.x file, taken for a v-prediction model ({sf.config_name}; SD 2.x 768), as diffusers does: its "
        "keys cannot tell; for an epsilon model (SD 2.0 / 2.1 base, 512) convert it with --config / "
        "config='sd-2.1-base'"
    )


# ---- converted once, kept in the cache folder ----
def single_file_cache(setting=None) -> Path:
    """Where single files are converted for `from_pretrained`: `single-file/` in the compilation cache folder
    (`setting`, else $DISTRIFUSION_JAX_CACHE, else ~/.cache/distrifusion-jax/xla; its default with "off")."""
    return (cache_dir(setting) or DEFAULT_DIR.expanduser()) / "single-file"


def check_file_layout(path, layouts=SDXL_LAYOUTS) -> None:
    """A one-line CheckpointError, from the header alone, when a single file is of no layout in `layouts` (those
    the calling pipeline runs: SDXL_LAYOUTS or SD_LAYOUTS), naming the pipeline class that loads it."""
    path = check_file(path)
    layout = detect_layout(path, read_header(path))
    if layout not in layouts:
        runs = " / ".join(LAYOUT_NAMES[x] for x in layouts)
        raise CheckpointError(
            f"{path}: a {LAYOUT_NAMES[layout]} checkpoint, which {PIPELINE_CLASSES[layout]} loads; "
            f"{PIPELINE_CLASSES[layouts[0]]} runs {runs} checkpoints only"
        )


def cached_pipeline(path, config: Optional[str] = None, cache=None, layouts=None) -> Path:
    """The pipeline folder (SDXL's, or SD 1.x / 2.x's) of a single-file checkpoint, converted on first use into
    `single_file_cache` (keyed by the file's name, size and modification time and the config; stored in the
    file's own dtypes, so nothing is lost) and reused afterwards. `layouts`: those the calling pipeline runs
    (DistriSDXLPipeline: SDXL_LAYOUTS, DistriSDPipeline: SD_LAYOUTS; None: any); a file of another is refused in
    one line naming the class that loads it (`check_file_layout`). Every header check runs first."""
    if layouts is not None:
        check_file_layout(path, layouts)
    sf = plan_single_file(path, config)
    stat = sf.path.stat()
    key = repr((str(sf.path.resolve()), stat.st_size, stat.st_mtime_ns, sf.config_name, FORMAT_VERSION))
    folder = single_file_cache(cache) / f"{sf.path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (folder / "model_index.json").is_file():
        return folder
    print(f"converting {sf.path} once into {folder} (reused next time)", file=sys.stderr)
    if sd2_note(sf, config):
        print(f"note: {sd2_note(sf, config)}", file=sys.stderr)
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
