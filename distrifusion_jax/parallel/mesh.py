"""Mesh axis names (the only place they are spelled) and the (cfg, patch) mesh of a DistriConfig."""

from __future__ import annotations

import jax
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

CFG = "cfg"  # classifier-free guidance halves: size 2 with the CFG split, else 1
PATCH = "patch"  # row bands of the latent image
TENSOR = "tensor"  # heads and channels, for the tensor-parallel baseline (tensor_parallel.py)


def make_mesh(devices, cfg_size: int) -> Mesh:
    """Devices laid out as [cfg_size, len(devices) // cfg_size] with axes (CFG, PATCH)."""
    devices = np.asarray(devices, dtype=object)
    return Mesh(devices.reshape(cfg_size, devices.size // cfg_size), (CFG, PATCH))


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Latents [B, h, w, C]: rows split over PATCH, replicated over CFG."""
    return NamedSharding(mesh, PartitionSpec(None, PATCH))


def vary(tree, axes=(CFG, PATCH)):
    """Type every leaf as varying over `axes` (no data moves; inside shard_map only).

    Per-device state (the stale buffers) must keep one type across lax.scan iterations, whereas a
    layer's value is typed invariant over an axis when it happens to depend only on replicated data
    (early layers do not depend on the guidance branch, for instance).
    """

    def cast(x):
        missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)
