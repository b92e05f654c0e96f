"""VAE decode, row-sharded over the devices with exact (synchronous) halo, GroupNorm and K/V exchange,
or on one device, whole or in overlapping row tiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from .distributed import local_copy, local_device, to_host
from .errors import ConfigError
from .parallel import PATCH, STALE, PatchPlan, make_mesh


def tile_starts(height: int, tile: int, overlap: int) -> list[int]:
    """First latent row of each tile: tiles of `tile` rows, neighbours sharing at least `overlap` rows,
    the last one flush with the bottom (so every tile has the same shape and one program decodes all)."""
    if tile >= height:
        return [0]
    stride = tile - overlap
    return list(range(0, height - tile, stride)) + [height - tile]


def blend_weights(starts: list[int], tile: int, height: int, scale: int) -> np.ndarray:
    """Per-tile row weights [n, scale * tile], summing to 1 over the tiles covering each image row.

    Each tile's weight ramps linearly up across the rows it shares with the tile above and down
    across those it shares with the tile below (image borders are not ramped), so seams fade.
    """
    n, rows = len(starts), scale * tile
    w = np.ones((n, rows), np.float64)
    for i in range(n):
        if i > 0:  # shared with the tile above: rows [starts[i], starts[i-1] + tile)
            shared = scale * (starts[i - 1] + tile - starts[i])
            w[i, :shared] = np.minimum(w[i, :shared], (np.arange(shared) + 0.5) / shared)
        if i < n - 1:
            shared = scale * (starts[i] + tile - starts[i + 1])
            w[i, rows - shared:] = np.minimum(w[i, rows - shared:], (shared - np.arange(shared) - 0.5) / shared)
    total = np.zeros(scale * height)
    for i, s in enumerate(starts):
        total[scale * s: scale * s + rows] += w[i]
    for i, s in enumerate(starts):
        w[i] /= total[scale * s: scale * s + rows]
    return w.astype(np.float32)


def tiled(decode, z, tile: int, overlap: int, scale: int):
    """Decode z [B, h, w, C] in overlapping full-width row tiles, one after another (`lax.map`), and blend.

    Peak activation memory is that of one tile. Each tile is decoded on its own (its GroupNorm
    statistics and mid-block attention see only the tile), so the result approximates the whole-image
    decode; the linear blend hides the seams (diffusers' VAE tiling makes the same trade).
    """
    h = z.shape[1]
    tile = min(tile, h)
    starts = tile_starts(h, tile, overlap)
    if len(starts) == 1:
        return decode(z)
    tiles = jnp.stack([lax.dynamic_slice_in_dim(z, s, tile, axis=1) for s in starts])
    images = lax.map(decode, tiles)  # [n, B, scale tile, scale w, 3], decoded one tile at a time
    weights = jnp.asarray(blend_weights(starts, tile, h, scale))
    out = jnp.zeros(images.shape[1:2] + (scale * h,) + images.shape[3:], jnp.float32)
    for i, s in enumerate(starts):  # static offsets
        out = out.at[:, scale * s: scale * (s + tile)].add(images[i].astype(jnp.float32) * weights[i][:, None, None])
    return out.astype(images.dtype)


class Decoder:
    """`decoder(params, z) -> image`: z [B, h, w, C] already divided by the scaling factor (NHWC).

    With several devices and a latent height they divide, each device decodes its band of rows
    (the decoder only upsamples, so bands stay aligned) and exchanges exactly what the single-device
    decode would read across band edges: the result equals one device's, and per-device activation
    memory falls roughly as 1/N (the mid-block attention's gathered K/V, at latent resolution, is
    the part that does not). Otherwise the whole image is decoded on the first device, or, with
    `tile_rows` set, in overlapping row tiles of that many latent rows (`tile_overlap` shared rows)
    one after another: memory of one tile, an approximation of the whole decode (see `tiled`).
    """

    def __init__(self, vae, devices=None, tile_rows=None, tile_overlap=None):
        self.vae = vae
        self.devices = tuple(devices or jax.devices())
        if tile_overlap is None and isinstance(tile_rows, int):
            tile_overlap = tile_rows // 4  # a quarter of each tile shared with its neighbour (16 of 64 rows)
        if tile_rows is not None and not (isinstance(tile_rows, int) and 0 <= tile_overlap < tile_rows):
            raise ConfigError(f"tiled decode: tile_rows={tile_rows!r}, tile_overlap={tile_overlap!r}; use "
                              "integers with tile_rows >= 1 and 0 <= tile_overlap < tile_rows (e.g. 64 and 16)")
        self.tile_rows, self.tile_overlap = tile_rows, tile_overlap
        whole = lambda p, z: vae.apply({"params": p}, z, method=vae.decode)
        scale = vae.config.downsample_factor
        if tile_rows:
            self._single = jax.jit(lambda p, z: tiled(lambda t: whole(p, t), z, tile_rows, tile_overlap, scale))
        else:
            self._single = jax.jit(whole)
        self._banded = None
        if len(self.devices) > 1:
            banded = vae.clone(parallel=PatchPlan("sync", "full_sync"))
            body = lambda p, z: banded.apply({"params": p}, z, method=banded.decode, mutable=[STALE])[0]
            mesh = make_mesh(self.devices, 1)
            self._banded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(None, PATCH)),
                                                 out_specs=P(None, PATCH)))

    def parallel_for(self, z) -> bool:
        """Whether a latent of this shape is decoded row-sharded."""
        return self._banded is not None and z.shape[1] % len(self.devices) == 0

    def __call__(self, params, z):
        z = jnp.asarray(z, self.vae.dtype) if not isinstance(z, jax.Array) else z.astype(self.vae.dtype)
        if self.parallel_for(z):
            return self._banded(params, z)
        if jax.process_count() > 1:  # several processes: each decodes the whole image on a device of its own
            device = local_device(self.devices)
            return self._single(local_copy(params, device), jax.device_put(to_host(z), device))
        return self._single(params, jax.device_put(z, self.devices[0]))
