"""Conversion of diffusers checkpoints and single-file SD / SDXL checkpoints into our format: Flax-path-keyed
safetensors plus config.json."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from . import keymap
from .config import read_json
from .errors import CheckpointError, ConfigError, show
from .models.clip import CLIPTextConfig
from .models.unet import to_diffusers_dict
from .tokenizer import load_tokenizer
from .weights import check_folder, read_unet_params, resolve_dtype
from .weights.clip import read_text_encoder_params
from .weights.converted import FORMAT_VERSION, NOTE_KEY, summary, write_converted
from .weights.files import CONVERTED_WEIGHTS
from .weights.lora import LORA_COMPONENTS, abstract_trees, fuse_lora, plan_lora, read_lora
from .weights.pipeline_weights import TOKENIZER_OF, listed, pipeline_components
from .weights.single_file import (
    LAYOUT_NAMES,
    is_single_file,
    plan_single_file,
    sd2_note,
    stored_dtypes,
    write_single_file,
)
from .weights.vae import read_vae_params

# Source config fields our model configs drop (they describe the checkpoint, not the computation)
# but that pipelines read, e.g. the UNet's sample_size gives the default image size.
CARRIED_FIELDS = ("sample_size",)

PIPELINE_MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")
PIPELINE_FILES = ("tokenizer", "tokenizer_2", "scheduler")  # copied: their json and txt files only
PIPELINE_COMPONENTS = PIPELINE_MODELS + PIPELINE_FILES


# ---- writing one converted model ----
def tensor_progress(desc: str, enabled: bool = True, leave: bool = True):
    """A `progress(iterable, total)` for the weight readers: a tqdm bar on stderr, or None when disabled."""
    if not enabled:
        return None
    return lambda it, total: tqdm(it, total=total, desc=desc, unit="tensor", file=sys.stderr, leave=leave)


def _carried(src) -> dict:
    """CARRIED_FIELDS present in the source config.json (the readers have already validated the file)."""
    raw = json.loads((Path(src) / "config.json").read_text())
    return {k: raw[k] for k in CARRIED_FIELDS if k in raw}


# ---- reading one model: (flat params, config dict to write) ----
def _read_unet(src, dt, variant, bar):
    config, flat = read_unet_params(src, dt, variant, progress=bar)
    return flat, dict(to_diffusers_dict(config), **_carried(src))


def _read_vae(src, dt, variant, bar):
    config, flat = read_vae_params(src, dt, variant, progress=bar)
    return flat, config.to_dict()


def _read_text_encoder(src, dt, variant, bar):
    cls, config, flat = read_text_encoder_params(src, dt, variant, progress=bar)
    return flat, dict(config.to_dict(), architectures=[cls.__name__])


READERS = {
    "unet": _read_unet,
    "vae": _read_vae,
    "text_encoder": _read_text_encoder,
    "text_encoder_2": _read_text_encoder,
}


def _convert_model(what: str, reader, src, dst, dtype, variant, progress: bool, overwrite: bool) -> Path:
    """One model folder `src` -> `dst` (config.json + flax_params.safetensors), written whole or not at all."""
    dt = resolve_dtype(dtype)
    src, dst = check_folder(src, what), _path(dst)
    check_destination(src, dst, overwrite)
    start = time.perf_counter()
    with staged(dst) as tmp:
        flat, config_dict = reader(src, dt, variant, tensor_progress(f"converting {what}", progress))
        write_converted(tmp, flat, config_dict, src, dt, progress=False)
    if progress:
        print(summary(flat, src, dst, dt.name, start), file=sys.stderr)
    return dst


def convert_unet(
    src, dst, dtype="float32", variant: Optional[str] = None, progress: bool = True, overwrite: bool = False
) -> Path:
    """Convert a diffusers UNet folder `src` into `dst` (config.json + flax_params.safetensors).

    `load_unet(dst)` then gives exactly the parameters `load_unet(src)` gives (cast to `dtype`). `dst`
    is written as a whole or not at all (see `staged`); a non-empty `dst` is replaced only with `overwrite`.
    """
    return _convert_model("UNet", _read_unet, src, dst, dtype, variant, progress, overwrite)


def convert_vae(
    src, dst, dtype="float32", variant: Optional[str] = None, progress: bool = True, overwrite: bool = False
) -> Path:
    """Convert a diffusers VAE folder as `convert_unet` does: `load_vae(dst)` gives `load_vae(src)`'s parameters."""
    return _convert_model("VAE", _read_vae, src, dst, dtype, variant, progress, overwrite)


def convert_text_encoder(
    src, dst, dtype="float32", variant: Optional[str] = None, progress: bool = True, overwrite: bool = False
) -> Path:
    """Convert a transformers CLIP text encoder folder as `convert_unet` does (`load_text_encoder(dst)`)."""
    return _convert_model("text encoder", _read_text_encoder, src, dst, dtype, variant, progress, overwrite)


# ---- the destination: checked first, written whole or not at all ----
def _path(path) -> Path:
    return Path(os.fspath(path)).expanduser()


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse a `dst` that is `src`, inside it or holds it, that is a file, or that has contents (unless
    `overwrite`): a conversion never writes into its source and never mixes with an older output."""
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise CheckpointError(f"{dst}: the output folder must differ from the folder it converts")
    if s in d.parents or d in s.parents:
        inner, outer = (dst, src) if s in d.parents else (src, dst)
        raise CheckpointError(
            f"{inner} is inside {outer}: the output and source folders must not overlap; "
            "pick an output folder elsewhere"
        )
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} exists and is not a folder; pass a folder path for the output")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{dst} exists and is not empty; pass --overwrite (overwrite=True) to replace it, "
            "or choose a new folder"
        )


@contextlib.contextmanager
def staged(dst: Path):
    """A fresh hidden sibling folder of `dst` to write into, renamed to `dst` when the block succeeds and
    removed when it raises (Ctrl-C too), so `dst` never holds a partial or mixed conversion. An existing
    `dst` is moved aside, replaced, then deleted (restored if the rename fails)."""
    dst = dst.resolve()  # a name to put the sibling next to, even for "." or a symlink
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(new: Path, dst: Path) -> None:
    if not dst.exists():
        new.rename(dst)
        return
    old = dst.with_name(f".{dst.name}.old-{secrets.token_hex(4)}")
    dst.rename(old)
    try:
        new.rename(dst)
    except BaseException:
        old.rename(dst)
        raise
    shutil.rmtree(old)


# ---- whole pipelines ----
def is_pipeline_folder(path) -> bool:
    """True for a diffusers pipeline folder (it has model_index.json), False for a single model's folder."""
    return (Path(os.fspath(path)).expanduser() / "model_index.json").is_file()


def vae_dtype(vae_config: dict, dtype) -> str:
    """The dtype the VAE is stored in: float32 where its config says `force_upcast` (SDXL's VAE
    overflows in float16 and diffusers decodes it in float32), else `dtype`."""
    return "float32" if vae_config.get("force_upcast", True) else resolve_dtype(dtype).name


def _check_pipeline(src: Path) -> dict:
    """model_index.json of the pipeline folder `src`, after checking that every component folder it lists is
    there (`pipeline_components`)."""
    if not src.is_dir():
        raise CheckpointError(f"pipeline folder {src} does not exist")
    index_path = src / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(
            f"{src}: no model_index.json; not a diffusers pipeline folder (pass an SDXL pipeline "
            f"folder with {', '.join(PIPELINE_COMPONENTS)}, or a single UNet folder)"
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{index_path}: expected a JSON object")
    missing = [c for c in pipeline_components(index) if not (src / c).is_dir() or not listed(index.get(c))]
    if missing:
        raise CheckpointError(
            f"{src}: pipeline component(s) missing: {', '.join(missing)} (a folder and a "
            f"model_index.json entry each); download the complete pipeline"
        )
    if not (src / "scheduler" / "scheduler_config.json").is_file():
        raise CheckpointError(
            f"{src / 'scheduler'}: no scheduler_config.json; download the complete pipeline"
        )
    return index


def _check_tokenizers(src: Path, components) -> None:
    """Each tokenizer folder parses and its vocabulary fits its text encoder's embedding."""
    for enc, tok in TOKENIZER_OF.items():
        if enc not in components:
            continue
        config = CLIPTextConfig.from_json(check_folder(src / enc, enc) / "config.json")
        load_tokenizer(src / tok, vocab_size=config.vocab_size, what=tok)


def _copy_files(src: Path, dst: Path) -> None:
    """Copy the json and txt files of a tokenizer or scheduler folder (nothing else is needed)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix in (".json", ".txt"):
            shutil.copyfile(f, dst / f.name)


def convert_pipeline(
    src,
    dst,
    dtype="float32",
    variant: Optional[str] = None,
    progress: bool = True,
    overwrite: bool = False,
    loras=(),
) -> Path:
    """Convert a diffusers pipeline folder `src` (SDXL base or refiner, SD 1.x / 2.x: the components its
    model_index.json lists) into `dst`, keeping its layout.

    unet and the text encoders are written in `dtype` (bfloat16 is the usual choice for
    SDXL), the vae in float32 where its config has `force_upcast` (SDXL's does), else in `dtype`; each
    loads with `load_unet` / `load_text_encoder` / `load_vae`. tokenizer, tokenizer_2 and scheduler are
    copied (json and txt files), model_index.json too, with a `_distrifusion_jax` note. The components,
    the tokenizers and `dst` are checked before anything is written (a non-empty `dst` is replaced only
    with `overwrite`), and `dst` is written as a whole or not at all (see `staged`).
    """
    src, dst = _path(src), _path(dst)
    dt = resolve_dtype(dtype)
    index = _check_pipeline(src)
    components = pipeline_components(index)
    check_destination(src, dst, overwrite)
    _check_tokenizers(src, components)
    start = time.perf_counter()
    dtypes = {name: dt.name for name in PIPELINE_MODELS if name in components}
    dtypes["vae"] = vae_dtype(read_json(check_folder(src / "vae", "VAE") / "config.json"), dt)
    with staged(dst) as tmp:
        totals = _write_pipeline(src, tmp, dtypes, variant, progress, components)
        note = {
            "format_version": FORMAT_VERSION,
            "dtype": dt.name,
            "vae_dtype": dtypes["vae"],
            "source": str(src),
        }
        fused = fuse_converted(tmp, loras)
        if fused:
            note["loras"] = fused
        (tmp / "model_index.json").write_text(json.dumps(dict(index, **{NOTE_KEY: note}), indent=2))
    if progress:
        names = dt.name if dtypes["vae"] == dt.name else f"{dt.name}, vae {dtypes['vae']}"
        kind = "SDXL" if "text_encoder_2" in components else "Stable Diffusion"
        print(summary(totals, src, dst, names, start, what=f"{kind} pipeline: "), file=sys.stderr)
    return dst


def _write_pipeline(src: Path, out: Path, dtypes: dict, variant, progress: bool, components) -> dict:
    """Every component of `src` converted or copied into `out`; returns all tensors written, for the summary."""
    totals = {}
    with tqdm(
        components,
        desc="converting pipeline",
        unit="component",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        for name in bar:
            bar.set_postfix_str(name)
            if name in PIPELINE_FILES:
                _copy_files(src / name, out / name)
                continue
            flat, config_dict = READERS[name](
                src / name, dtypes[name], variant, tensor_progress(f"  {name}", progress, leave=False)
            )
            write_converted(out / name, flat, config_dict, src / name, dtypes[name], progress=False)
            totals.update({f"{name}/{k}": v for k, v in flat.items()})
    return totals


def convert_single_file(
    src,
    dst,
    config: Optional[str] = None,
    dtype="float32",
    progress: bool = True,
    overwrite: bool = False,
    loras=(),
) -> Path:
    """Convert a single-file SD / SDXL checkpoint in the original layout (`sd_xl_base_1.0.safetensors`
    and its fine-tunes; never a pickle) into `dst`.

    An SDXL file becomes a pipeline folder as `convert_pipeline` writes one (tokenizers, scheduler and
    model_index.json from the bundled sdxl-base-1.0 files), which `DistriSDXLPipeline.from_pretrained`
    loads; an SD 1.x / 2.x file a Stable Diffusion pipeline folder (unet, vae, text_encoder, tokenizer,
    scheduler, model_index.json from the bundled sd-1.5 / sd-2.1 files) for `DistriSDPipeline`. `config`
    names the bundled config the file was trained with (default: detected from its keys: sdxl-base-1.0,
    sd-1.5 or sd-2.1; an SD 2.x file is taken for the 768 v-prediction model, as diffusers does: name
    "sd-2.1-base" for a 512 epsilon one). Keys, shapes, the config and `dst` are checked before any tensor
    is read; `dst` is written whole or not at all (see `staged`).
    """
    dt = resolve_dtype(dtype)
    sf = plan_single_file(src, config)
    dst = _path(dst)
    check_destination(sf.path, dst, overwrite)
    dtypes = stored_dtypes(sf, dt)
    start = time.perf_counter()
    with staged(dst) as tmp:
        totals = write_single_file(sf, tmp, dtypes, lambda desc: tensor_progress(desc, progress, leave=False))
        fused = fuse_converted(tmp, loras)
        if fused:
            index = json.loads((tmp / "model_index.json").read_text())
            index.setdefault(NOTE_KEY, {})["loras"] = fused
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    if progress:
        names = dt.name if set(dtypes.values()) == {dt.name} else f"{dt.name}, vae {dtypes['vae']}"
        what = f"{LAYOUT_NAMES[sf.layout]} pipeline ({sf.config_name}): "
        print(summary(totals, sf.path, dst, names, start, what=what), file=sys.stderr)
        if sd2_note(sf, config):
            print(f"note: {sd2_note(sf, config)}", file=sys.stderr)
    return dst


def convert(
    src,
    dst,
    dtype="float32",
    variant: Optional[str] = None,
    progress: bool = True,
    overwrite: bool = False,
    config: Optional[str] = None,
    loras=(),
) -> Path:
    """`convert_single_file` for a checkpoint file, `convert_pipeline` for a pipeline folder (with
    model_index.json), else `convert_unet`. `config` applies to single files, `variant` to folders.
    `loras`: [(LoRA safetensors path, scale)] fused into the converted SDXL pipeline's UNet and text
    encoders (`fuse_converted`), each checked against the models' layers before anything is converted."""
    loras = [(str(p), float(scale)) for p, scale in loras]
    if is_single_file(src):
        if variant:
            raise ConfigError(
                f"{show('variant', variant)} applies to diffusers folders, not to the file {src}"
            )
        if loras:
            sf = plan_single_file(src, config)
            check_loras(loras, Path(__file__).parent / "configs" / sf.config_name)  # its bundled configs
        return convert_single_file(src, dst, config, dtype, progress, overwrite, loras)
    if config:
        raise ConfigError(
            f"{show('config', config)} applies to single-file checkpoints; a folder {src} has its own config.json"
        )
    if is_pipeline_folder(src):
        check_loras(loras, src)
        return convert_pipeline(src, dst, dtype, variant, progress, overwrite, loras)
    if loras:
        raise ConfigError(f"--lora applies to pipelines (UNet and text encoders); {src} is a UNet folder")
    return convert_unet(src, dst, dtype, variant, progress, overwrite)


# ---- LoRA adapters fused into a converted pipeline ----
def check_loras(loras, root) -> None:
    """Each LoRA read and matched by shape against the models of the pipeline folder (or bundled config
    folder) `root`: a LoRA for another model is one line before any conversion."""
    if loras:
        trees = abstract_trees(root)
        for path, _ in loras:
            plan_lora(trees, read_lora(path))


def fuse_converted(folder: Path, loras) -> list:
    """Fuse [(LoRA path, scale)] into a converted pipeline folder's UNet and text encoders (float32
    arithmetic, each model rewritten in its own dtype); returns [{"path", "scale"}] for the folder's note."""
    if not loras:
        return []
    files = {name: Path(folder) / name / CONVERTED_WEIGHTS for name in LORA_COMPONENTS}
    files = {name: f for name, f in files.items() if f.is_file()}  # SD 1.x / 2.x, the refiner: one encoder
    params = {name: keymap.unflatten(load_file(str(f))) for name, f in files.items()}
    undo = None
    for path, scale in loras:
        params, undo = fuse_lora(params, read_lora(path), scale, undo)
    for name in undo or {}:
        with safe_open(str(files[name]), "numpy") as f:
            metadata = f.metadata()
        save_file(keymap.flatten(params[name]), str(files[name]), metadata=metadata)
    return [{"path": path, "scale": scale} for path, scale in loras]
