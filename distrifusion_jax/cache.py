"""JAX's persistent compilation cache, on by default for the pipeline and the CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from .errors import ConfigError

ENV = "DISTRIFUSION_JAX_CACHE"  # a directory, or "off"
DEFAULT_DIR = Path("~/.cache/distrifusion-jax/xla")
_FIX = f"pass a writable folder or 'off' (--compile-cache, compilation_cache= or ${ENV})"


def cache_dir(setting: Union[str, os.PathLike, None] = None) -> Optional[Path]:
    """The cache directory for a setting: None -> $DISTRIFUSION_JAX_CACHE or the default; "off" -> None."""
    value = os.fspath(setting) if setting is not None else os.environ.get(ENV, str(DEFAULT_DIR))
    if value.strip().lower() in ("off", "none", "0", "false", ""):
        return None
    return Path(value).expanduser()


def check_cache_dir(setting: Union[str, os.PathLike, None] = None) -> Optional[Path]:
    """`cache_dir(setting)` if it is, or can be created as, a writable folder (nothing is created); else ConfigError."""
    path = cache_dir(setting)
    if path is None:
        return None
    if path.exists() and not path.is_dir():
        raise ConfigError(f"compilation cache {path} is a file, not a folder; {_FIX}")
    existing = next(p for p in (path, *path.parents) if p.exists())  # the folder the cache will be made in
    if not existing.is_dir():
        raise ConfigError(f"compilation cache {path}: {existing} is a file, not a folder; {_FIX}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"compilation cache {path}: {existing} is not writable; {_FIX}")
    return path


def enable_compilation_cache(setting: Union[str, os.PathLike, None] = None) -> Optional[Path]:
    """Point JAX's persistent compilation cache at `setting` (see `cache_dir`); returns the directory used.

    Compiled programs are then written to disk and a later process with the same program, shapes,
    devices and JAX version loads them instead of compiling (SDXL's denoising loop: tens of seconds
    on a GPU, minutes on a CPU). Programs that compile in under a second are not cached.
    """
    import jax

    path = check_cache_dir(setting)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a race with check_cache_dir, or a file system that refuses
        raise ConfigError(f"compilation cache {path}: cannot create it ({e.strerror}); {_FIX}") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
