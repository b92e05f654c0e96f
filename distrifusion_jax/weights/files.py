"""Finding, checking and reading safetensors checkpoints without torch; nothing is ever unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from .. import keymap
from ..cache import cached_json
from ..config import DTYPE_NAMES
from ..errors import CheckpointError

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"  # diffusers models; transformers models use "model"
CONVERTED_WEIGHTS = "flax_params.safetensors"  # written by our converter, keyed by Flax paths
VARIANTS = (None, "fp16", "bf16")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def resolve_dtype(dtype) -> np.dtype:
    """'bfloat16' / jnp.bfloat16 / np.float32 ... -> numpy dtype; a clear error for anything else."""
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise CheckpointError(f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
        dtype = jnp.dtype(dtype)
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
        raise CheckpointError(f"unsupported dtype {dt}: use one of {', '.join(DTYPE_NAMES)}")
    return dt


def param_shapes(model) -> dict:
    """{flat Flax path: shape} of a model's parameters. Abstract evaluation traces the model (about a second for
    a UNet on a CPU), so the result is kept beside the persistent compilation cache, keyed by the model."""

    def compute():
        return {k: list(a.shape) for k, a in keymap.flatten(model.abstract_params()).items()}

    return {k: tuple(v) for k, v in cached_json("param-shapes", repr(model), compute).items()}


def to_devices(flat: dict, sharding=None) -> dict:
    """Host arrays straight to where they are used: `sharding` (a jax Sharding, e.g. replicated over a mesh's
    devices) or, with None, the default device."""
    import jax

    # device_put, not jnp.asarray: that stages a small program per dtype (traced and compiled in every process)
    return {k: jax.device_put(v, sharding) for k, v in flat.items()}


# ---- finding and reading files ----
def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle checkpoints found ({', '.join(pickles)}); they are never "
            "unpickled here: re-save the model with safetensors (diffusers: "
            "save_pretrained(..., safe_serialization=True))"
        )


def find_weight_files(
    folder: Path, stem: str = DIFFUSERS_WEIGHTS, variant: Optional[str] = None, what: str = "diffusers UNet"
) -> list[Path]:
    """The safetensors files of a diffusers component folder: single file or shards listed in an index.

    Without `variant`, full precision is preferred, then the fp16 and bf16 variants.
    """
    variants = (variant,) if variant else VARIANTS
    for v in variants:
        name = f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors"
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            shards = [folder / s for s in sorted(set(weight_map.values()))]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(
                    f"{index} lists shard(s) that are not there: {', '.join(missing)}; "
                    "download the complete checkpoint"
                )
            return shards
        if (folder / name).is_file():
            return [folder / name]
    _refuse_pickles(folder)
    wanted = f"{stem}{'.' + variant if variant else ''}.safetensors"
    raise CheckpointError(
        f"{folder}: no {wanted} (or sharded index) found; point to a {what} folder "
        "or one written by `distrifusion-jax convert`"
    )


def read_safetensors(files: list[Path]):
    """Yield (key, numpy array) from each file, with a clear error for truncated or corrupt files."""
    for path in files:
        try:
            with safe_open(str(path), framework="np") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file ({e}); download or convert it again"
            ) from None


def read_shapes(files: list[Path]) -> dict[str, tuple]:
    """Key -> shape from the safetensors headers alone (no tensor data read)."""
    shapes = {}
    for path in files:
        try:
            with safe_open(str(path), framework="np") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file ({e}); download or convert it again"
            ) from None
    return shapes


def check_keys(expected: dict[str, tuple], found: dict[str, tuple], source: str) -> None:
    """Fail with the lists of missing keys, unexpected keys and shape mismatches (Flax paths)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {found[k]} vs model {expected[k]}"
        for k in set(expected) & set(found)
        if tuple(found[k]) != tuple(expected[k])
    )
    if missing or unexpected or mismatched:

        def fmt(name, items):
            head = "; ".join(items[:8]) + (f"; ... ({len(items) - 8} more)" if len(items) > 8 else "")
            return f"{len(items)} {name}" + (f" [{head}]" if items else "")

        raise CheckpointError(
            f"{source} does not match the model config: "
            + ", ".join(
                [fmt("missing", missing), fmt("unexpected", unexpected), fmt("shape mismatches", mismatched)]
            )
        )


def read_params(
    folder: Path,
    expected: dict,
    stem: str,
    dtype,
    variant: Optional[str] = None,
    key_map: Optional[Callable] = None,
    progress=None,
    what: str = "diffusers UNet",
) -> dict:
    """Flat {Flax path: numpy array in dtype} for a model whose abstract parameters are `expected`
    ({path: shape}), from our converted file if present, else the `stem` safetensors of `folder`.

    `key_map(key, shape) -> (path, shape, permutation)` maps checkpoint keys (default: the rule table);
    it returns None for entries that are not parameters (buffers), which are skipped.
    Fails before reading any tensor data if keys or shapes do not match.
    """
    key_map = key_map or keymap.torch_to_flax
    dt = resolve_dtype(dtype)
    converted = (folder / CONVERTED_WEIGHTS).is_file()
    files = [folder / CONVERTED_WEIGHTS] if converted else find_weight_files(folder, stem, variant, what)
    shapes = read_shapes(files)
    plan = (
        {k: (k, s, None) for k, s in shapes.items()}
        if converted
        else {k: key_map(k, s) for k, s in shapes.items()}
    )
    plan = {k: v for k, v in plan.items() if v is not None}
    check_keys(expected, {p: s for p, s, _ in plan.values()}, f"{files[0].parent}")
    flat = {}
    tensors = read_safetensors(files)
    if progress is not None:
        tensors = progress(tensors, total=len(shapes))
    for key, array in tensors:
        if key not in plan:
            continue
        path, _, perm = plan[key]
        if perm:
            array = array.transpose(perm)
        flat[path] = np.ascontiguousarray(array.astype(dt))
    return flat


def check_folder(path, what: str = "UNet") -> Path:
    """The model folder `path` as a Path, with a one-line error if it is missing, a file or has no config."""
    folder = Path(os.fspath(path)).expanduser()
    if folder.is_file():
        if folder.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{folder}: pickle checkpoints are never unpickled here; re-save the model with "
                "safetensors (diffusers: save_pretrained(..., safe_serialization=True))"
            )
        raise CheckpointError(
            f"{folder} is a file; pass the model folder that holds config.json and the safetensors weights"
        )
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        if not any(folder.glob("*.safetensors")):
            _refuse_pickles(folder)
        raise CheckpointError(
            f"{folder}: no config.json; pass a diffusers {what} folder (e.g. "
            f"<pipeline>/{what.lower()}) or one written by `distrifusion-jax convert`"
        )
    return folder
