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
    on a GPU, minutes on a CPU). Every program is cached, however small: a warm run then compiles nothing.
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
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# ---- how long this process spends preparing programs: tracing, lowering, compiling or loading from the cache ----
_TRACE, _LOWER = "/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"  # one per program: compiled, or loaded from the cache
_HIT = "/jax/compilation_cache/cache_hits"
_log: dict = {"spans": [], "programs": 0, "hits": 0, "listening": False}


def _on_span(event: str, start: float, end: float, **_) -> None:
    if event in (_TRACE, _LOWER, _BACKEND):
        _log["spans"].append((start, end, event))
        _log["programs"] += event == _BACKEND


def _union(spans) -> float:
    """Seconds covered by (start, end, ...) spans, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for a, b, *_ in sorted(spans):
        total += max(0.0, b - max(a, end))
        end = max(end, b)
    return total


def _on_event(event: str, **_) -> None:
    _log["hits"] += event == _HIT


class CompileClock:
    """Time this process spent preparing programs since the clock was made: JAX's tracing, lowering and XLA
    compilation, or loading a compiled program from the persistent cache (overlapping spans, such as a
    jitted function traced inside another, count once); and how many programs were compiled or loaded."""

    def __init__(self):
        if not _log["listening"]:
            from jax import monitoring

            monitoring.register_event_time_span_listener(_on_span)
            monitoring.register_event_listener(_on_event)
            _log["listening"] = True
        self._start = (len(_log["spans"]), _log["programs"], _log["hits"])

    @property
    def seconds(self) -> float:
        return _union(_log["spans"][self._start[0] :])

    def split(self) -> dict:
        """Seconds by kind: "trace" (Python to jaxpr), "lower" (jaxpr to StableHLO), "compile" (XLA, or loading
        from the persistent cache); a jit traced inside another's tracing counts once, in "trace"."""
        spans = _log["spans"][self._start[0] :]
        kinds = {"trace": _TRACE, "lower": _LOWER, "compile": _BACKEND}
        return {k: _union([sp for sp in spans if sp[2] == e]) for k, e in kinds.items()}

    @property
    def loaded(self) -> int:
        """Programs loaded from the persistent compilation cache."""
        return _log["hits"] - self._start[2]

    @property
    def compiled(self) -> int:
        """Programs XLA compiled (not found in the persistent cache, or it is off)."""
        return _log["programs"] - self._start[1] - self.loaded


# ---- traced programs kept on disk, so a warm process neither traces nor compiles ----
# XLA's persistent cache holds compiled programs, but finding one needs the traced program, and tracing a
# UNet's Python code costs seconds. Beside it we keep each traced program (jax.export's serialized
# StableHLO, a flatbuffer: no pickle) under a key that names everything it was traced from.
_PROGRAMS = "programs"
# cuDNN's fused attention kernels (forward only: we never differentiate): jax.export refuses custom calls it
# does not know to be stable across versions, but these files are only read back by the same JAX version
_CUDNN_TARGETS = (
    "__cudnn$fmhaSoftmax",
    "__cudnn$fmhaScaleBiasSoftmax",
    "__cudnn$fmhaSoftmaxDropout",
    "__cudnn$fmhaScaleBiasSoftmaxDropout",
)
_source: dict = {}


def _source_digest() -> str:
    """A digest of this package's Python source: a traced program is only reused by the code that traced it."""
    if "digest" not in _source:
        import hashlib

        h = hashlib.sha256()
        root = Path(__file__).parent
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
        _source["digest"] = h.hexdigest()
    return _source["digest"]


def program_folder() -> Optional[Path]:
    """Where traced programs are kept: `programs/` in JAX's persistent compilation cache folder, if one is set."""
    import jax

    folder = jax.config.jax_compilation_cache_dir
    return Path(folder) / _PROGRAMS if folder else None


def _program_key(name: str, identity: str, args) -> str:
    import hashlib

    import jax
    import jaxlib

    leaves, tree = jax.tree.flatten(args)
    parts = (
        name,
        identity,
        str(tree),
        [(tuple(a.shape), str(a.dtype), repr(getattr(a, "sharding", None))) for a in leaves],
        jax.__version__,
        jaxlib.__version__,
        jax.config.jax_enable_x64,
        jax.config.jax_default_matmul_precision,
        [(d.platform, d.device_kind, d.id) for d in jax.devices()],
        _source_digest(),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:40]


def compile_program(
    name: str, fn, args: tuple, identity: str, mesh=None, in_shardings=None, donate_argnums=()
):
    """`jax.jit(fn, in_shardings, donate_argnums).lower(*args).compile()`, reusing a traced program kept on disk.

    `identity` must describe everything the traced program depends on besides the arguments' structure,
    shapes, dtypes and placements (model configs and options, schedule): with the persistent compilation
    cache on, the program traced for the same key by an earlier process (with this package's source and
    JAX version) is read from `program_folder()` instead of tracing `fn`, and XLA's compiled program then
    comes from the persistent cache. `mesh`: the mesh a multi-device program's shardings refer to.
    Without the cache, across processes, or when a program cannot be exported, it traces as usual.
    """
    import jax

    jitted = jax.jit(fn, in_shardings=in_shardings, donate_argnums=donate_argnums)
    folder = program_folder()
    if folder is None or jax.process_count() > 1:
        return jitted.lower(*args).compile()
    path = folder / f"{name}-{_program_key(name, identity, args)}.jaxexport"
    exported = None
    try:
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
    except FileNotFoundError:
        pass
    except Exception:  # unreadable or cut short: trace it again and rewrite it  # noqa: BLE001
        exported = None
    if exported is None:
        checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in _CUDNN_TARGETS]
        try:
            exported = jax.export.export(jitted, disabled_checks=checks)(*args)
            blob = exported.serialize()
        except Exception:  # a program jax.export cannot hold: compile it the usual way  # noqa: BLE001
            return jitted.lower(*args).compile()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(blob)
            tmp.replace(path)  # whole or not at all
        except OSError:  # a read-only cache still serves what it has
            pass
    shardings = {}
    if exported.nr_devices > 1:
        if mesh is None:
            return jitted.lower(*args).compile()
        shardings = dict(
            in_shardings=jax.tree.unflatten(exported.in_tree, exported.in_shardings_jax(mesh))[0],
            out_shardings=jax.tree.unflatten(exported.out_tree, exported.out_shardings_jax(mesh)),
        )
    call = jax.jit(exported.call, donate_argnums=donate_argnums, **shardings)
    return call.lower(*args).compile()


def cached_json(name: str, identity: str, compute):
    """compute() (a JSON value), kept in `program_folder()` under a key of `name`, `identity` and this package's
    source, so a later process reads it instead of computing it again (for what costs a trace, such as a
    model's parameter shapes by abstract evaluation). Without the persistent cache it is computed each time."""
    import hashlib
    import json

    folder = program_folder()
    if folder is None:
        return compute()
    digest = hashlib.sha256(repr((name, identity, _source_digest())).encode()).hexdigest()[:40]
    path = folder / f"{name}-{digest}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)
    except OSError:
        pass
    return value
