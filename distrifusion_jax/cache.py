"""JAX's persistent compilation cache, on by default for the pipeline and the CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

ENV = "DISTRIFUSION_JAX_CACHE"  # a directory, or "off"
DEFAULT_DIR = Path("~/.cache/distrifusion-jax/xla")


def cache_dir(setting: Union[str, os.PathLike, None] = None) -> Optional[Path]:
    """The cache directory for a setting: None -> $DISTRIFUSION_JAX_CACHE or the default; "off" -> None."""
    value = os.fspath(setting) if setting is not None else os.environ.get(ENV, str(DEFAULT_DIR))
    if value.strip().lower() in ("off", "none", "0", "false", ""):
        return None
    return Path(value).expanduser()


def enable_compilation_cache(setting: Union[str, os.PathLike, None] = None) -> Optional[Path]:
    """Point JAX's persistent compilation cache at `setting` (see `cache_dir`); returns the directory used.

    Compiled programs are then written to disk and a later process with the same program, shapes,
    devices and JAX version loads them instead of compiling (SDXL's denoising loop: tens of seconds
    on a GPU, minutes on a CPU). Programs that compile in under a second are not cached.
    """
    import jax

    path = cache_dir(setting)
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
