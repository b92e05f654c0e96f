"""Conversion of diffusers checkpoints into our format: Flax-path-keyed safetensors plus config.json."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from safetensors.numpy import save_file
from tqdm.auto import tqdm

from .config import read_json, to_diffusers_dict
from .errors import CheckpointError
from .weights import CONVERTED_WEIGHTS, check_folder, read_unet_params, resolve_dtype
from .weights.clip import read_text_encoder_params
from .weights.vae import read_vae_params

FORMAT_VERSION = 1
NOTE_KEY = "_distrifusion_jax"  # added to every config we write; diffusers ignores "_"-prefixed keys
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


def summary(flat: dict, src, dst, dtype_names: str, start: float, what: str = "") -> str:
    """The closing line of a conversion: tensors, parameters, dtype(s), where from and to, time taken."""
    n = sum(v.size for v in flat.values())
    return (f"converted {what}{len(flat)} tensors ({n:,} parameters, {dtype_names}) from {src} to {dst} "
            f"in {time.perf_counter() - start:.1f} s")


def write_converted(dst, flat: dict, config_dict: dict, src, dtype, start: Optional[float] = None,
                    progress: bool = True) -> Path:
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
        print(summary(flat, src, dst, dt.name, time.perf_counter() if start is None else start), file=sys.stderr)
    return dst


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


READERS = {"unet": _read_unet, "vae": _read_vae, "text_encoder": _read_text_encoder,
           "text_encoder_2": _read_text_encoder}


def convert_unet(src, dst, dtype="float32", variant: Optional[str] = None, progress: bool = True) -> Path:
    """Convert a diffusers UNet folder `src` into `dst` (config.json + flax_params.safetensors).

    `load_unet(dst)` then gives exactly the parameters `load_unet(src)` gives (cast to `dtype`).
    """
    dt = resolve_dtype(dtype)
    start = time.perf_counter()
    flat, config_dict = _read_unet(src, dt, variant, tensor_progress("converting unet", progress))
    return write_converted(dst, flat, config_dict, src, dt, start, progress)


# ---- whole pipelines ----
def is_pipeline_folder(path) -> bool:
    """True for a diffusers pipeline folder (it has model_index.json), False for a single model's folder."""
    return (Path(os.fspath(path)).expanduser() / "model_index.json").is_file()


def vae_dtype(vae_config: dict, dtype) -> str:
    """The dtype the VAE is stored in: float32 where its config says `force_upcast` (SDXL's VAE
    overflows in float16 and diffusers decodes it in float32), else `dtype`."""
    return "float32" if vae_config.get("force_upcast", True) else resolve_dtype(dtype).name


def _check_pipeline(src: Path) -> dict:
    """model_index.json of the pipeline folder `src`, after checking that every component folder is there."""
    if not src.is_dir():
        raise CheckpointError(f"pipeline folder {src} does not exist")
    index_path = src / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"{src}: no model_index.json; not a diffusers pipeline folder (pass an SDXL pipeline "
                              f"folder with {', '.join(PIPELINE_COMPONENTS)}, or a single UNet folder)")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{index_path}: expected a JSON object")
    missing = [c for c in PIPELINE_COMPONENTS if not (src / c).is_dir() or not _listed(index.get(c))]
    if missing:
        raise CheckpointError(f"{src}: SDXL pipeline component(s) missing: {', '.join(missing)} (a folder and a "
                              f"model_index.json entry each); download the complete pipeline")
    return index


def _listed(entry) -> bool:
    """A model_index.json entry naming a component: [library, class], neither null (null: not part of it)."""
    return isinstance(entry, list) and len(entry) == 2 and None not in entry


def _copy_files(src: Path, dst: Path) -> None:
    """Copy the json and txt files of a tokenizer or scheduler folder (nothing else is needed)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix in (".json", ".txt"):
            shutil.copyfile(f, dst / f.name)


def convert_pipeline(src, dst, dtype="float32", variant: Optional[str] = None, progress: bool = True) -> Path:
    """Convert a diffusers SDXL pipeline folder `src` into `dst`, keeping its layout.

    unet, text_encoder and text_encoder_2 are written in `dtype` (bfloat16 is the usual choice for
    SDXL), the vae in float32 where its config has `force_upcast` (SDXL's does), else in `dtype`; each
    loads with `load_unet` / `load_text_encoder` / `load_vae`. tokenizer, tokenizer_2 and scheduler are
    copied (json and txt files), model_index.json too, with a `_distrifusion_jax` note. All components
    are checked to be present before anything is written.
    """
    src, dst = Path(os.fspath(src)).expanduser(), Path(os.fspath(dst)).expanduser()
    dt = resolve_dtype(dtype)
    index = _check_pipeline(src)
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: the output folder must differ from the pipeline folder it converts")
    start = time.perf_counter()
    dtypes = {name: dt.name for name in PIPELINE_MODELS}
    dtypes["vae"] = vae_dtype(read_json(check_folder(src / "vae", "VAE") / "config.json"), dt)
    totals = {}
    bar = tqdm(PIPELINE_COMPONENTS, desc="converting pipeline", unit="component", file=sys.stderr,
               disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        if name in PIPELINE_FILES:
            _copy_files(src / name, dst / name)
            continue
        flat, config_dict = READERS[name](src / name, dtypes[name], variant,
                                          tensor_progress(f"  {name}", progress, leave=False))
        write_converted(dst / name, flat, config_dict, src / name, dtypes[name], progress=False)
        totals.update({f"{name}/{k}": v for k, v in flat.items()})
    bar.close()
    note = {"format_version": FORMAT_VERSION, "dtype": dt.name, "vae_dtype": dtypes["vae"], "source": str(src)}
    (dst / "model_index.json").write_text(json.dumps(dict(index, **{NOTE_KEY: note}), indent=2))
    if progress:
        names = dt.name if dtypes["vae"] == dt.name else f"{dt.name}, vae {dtypes['vae']}"
        print(summary(totals, src, dst, names, start, what="SDXL pipeline: "), file=sys.stderr)
    return dst


def convert(src, dst, dtype="float32", variant: Optional[str] = None, progress: bool = True) -> Path:
    """`convert_pipeline` for a pipeline folder (with model_index.json), else `convert_unet`."""
    if is_pipeline_folder(src):
        return convert_pipeline(src, dst, dtype, variant, progress)
    return convert_unet(src, dst, dtype, variant, progress)
