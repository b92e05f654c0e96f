"""Timing and random weights made on the devices: what the benchmarks share."""

from __future__ import annotations

import contextlib
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn, repeats: int, warmup: int = 3) -> dict:
    """Median / min / max seconds of fn() (fn must block until the device is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": repeats,
    }


def first_call(fn) -> tuple:
    """(fn()'s result, seconds it took): a first call, compiling."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


@contextlib.contextmanager
def cold_compiles():
    """Compile times measured without JAX's persistent compilation cache (restored afterwards)."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


def _draw_impl(seed, index, scale, offset, shape, dtype):
    # the leaf's key is derived inside the program: no per-leaf key slicing dispatched from the host
    key = jax.random.fold_in(jax.random.key(seed), index)
    return (offset + scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@functools.lru_cache(maxsize=None)
def _drawer(sharding):
    # one jitted drawer per output placement: with a replicated sharding every device draws the same
    # values itself, so no copy of the weights passes through the first device
    return jax.jit(_draw_impl, static_argnums=(4, 5), out_shardings=sharding)


def random_params(model, dtype, seed: int = 0, sharding=None):
    """Random parameters of a UNet or VAE generated on the device (kernels ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.02), others N(0, 0.02)), placed with `sharding` (default: the default device).

    One small compiled program per distinct shape: a single program drawing all 1,680 SDXL tensors
    takes minutes to compile.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(model.abstract_params())
    draw = _drawer(sharding)
    out = []
    for i, (path, a) in enumerate(leaves):
        name = path[-1].key
        scale, offset = (
            (1 / np.sqrt(np.prod(a.shape[:-1])), 0.0)
            if name == "kernel"
            else (0.02, 1.0)
            if name == "scale"
            else (0.02, 0.0)
        )
        out.append(
            draw(
                np.uint32(seed),
                np.uint32(i),
                np.float32(scale),
                np.float32(offset),
                tuple(a.shape),
                jnp.dtype(dtype),
            )
        )
    return jax.tree_util.tree_unflatten(treedef, out)
