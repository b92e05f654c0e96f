"""Conversion of diffusers checkpoints into our format: Flax-path-keyed safetensors plus config.json."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from safetensors.numpy import save_file
from tqdm.auto import tqdm

from .config import to_diffusers_dict
from .weights import CONVERTED_WEIGHTS, read_unet_params, resolve_dtype

FORMAT_VERSION = 1


def convert_unet(src, dst, dtype="float32", variant: Optional[str] = None, progress: bool = True) -> Path:
    """Convert a diffusers UNet folder `src` into `dst` (config.json + flax_params.safetensors).

    `load_unet(dst)` then gives exactly the parameters `load_unet(src)` gives (cast to `dtype`).
    """
    dt = resolve_dtype(dtype)
    start = time.perf_counter()
    bar = (lambda it, total: tqdm(it, total=total, desc="converting unet", unit="tensor", file=sys.stderr)) \
        if progress else None
    config, flat = read_unet_params(src, dt, variant, progress=bar)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(dst / CONVERTED_WEIGHTS), metadata={"format": "distrifusion-jax", "dtype": dt.name})
    meta = to_diffusers_dict(config)
    meta["_distrifusion_jax"] = {"format_version": FORMAT_VERSION, "dtype": dt.name, "source": str(src)}
    (dst / "config.json").write_text(json.dumps(meta, indent=2))
    if progress:
        n = sum(v.size for v in flat.values())
        print(f"converted {len(flat)} tensors ({n:,} parameters, {dt.name}) from {src} to {dst} "
              f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return dst
