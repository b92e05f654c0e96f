"""Our converted format: model folders (config.json + flax_params.safetensors) and the pipeline files around them."""

from __future__ import annotations

import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional

from safetensors.numpy import save_file

from .files import CONVERTED_WEIGHTS, resolve_dtype

# ---- one model (written by `convert`, the single-file cache and the tools) ----
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


# ---- the pipeline files around the models ----
# OpenAI CLIP's tokenizer pads with <|endoftext|>, OpenCLIP's (SDXL's tokenizer_2, SD 2.x's tokenizer) with "!"
CLIP_PAD, OPENCLIP_PAD = "<|endoftext|>", "!"
SDXL_TOKENIZERS = {"tokenizer": CLIP_PAD, "tokenizer_2": OPENCLIP_PAD}


def package_file(*parts: str):
    """A file shipped inside the package (a bundled config, the CLIP vocabulary)."""
    return resources.files("distrifusion_jax").joinpath(*parts)


def write_tokenizers(folder: Path, pads: Optional[dict] = None) -> None:
    """Tokenizer folders from the bundled CLIP vocabulary, {folder name: pad token} (default: SDXL's tokenizer/,
    padding with <|endoftext|>, and tokenizer_2/, padding with "!" (id 0))."""
    assets = package_file("assets", "clip-tokenizer")
    base = json.loads(assets.joinpath("tokenizer_config.json").read_text())
    for name, pad in (SDXL_TOKENIZERS if pads is None else pads).items():
        out = folder / name
        out.mkdir(parents=True, exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            (out / f).write_bytes(assets.joinpath(f).read_bytes())
        (out / "tokenizer_config.json").write_text(json.dumps(dict(base, pad_token=pad), indent=2))
        special = {k: base[k] for k in ("bos_token", "eos_token", "unk_token")}
        (out / "special_tokens_map.json").write_text(json.dumps(dict(special, pad_token=pad), indent=2))


def write_pipeline_files(folder: Path, config_name: str, pads: dict, note: Optional[dict] = None) -> None:
    """The tokenizers (`write_tokenizers(folder, pads)`), scheduler/ and model_index.json of the bundled config
    `config_name` into a pipeline folder, model_index.json with `note` under NOTE_KEY (our format's)."""
    write_tokenizers(folder, pads)
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = package_file("configs", config_name, "scheduler", "scheduler_config.json").read_text()
    (folder / "scheduler" / "scheduler_config.json").write_text(scheduler)
    index = json.loads(package_file("configs", config_name, "model_index.json").read_text())
    if note is not None:
        index[NOTE_KEY] = note
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
