"""VAE decode and encode, row-sharded over the devices with exact (synchronous) halo, GroupNorm and K/V
exchange, or on one device (the decode whole or in overlapping row tiles)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .cache import compile_program
from .distributed import local_copy, local_device, to_host
from .errors import ConfigError, show
from .parallel import PATCH, STALE, PatchPlan, make_mesh

# The smallest tile and overlap (latent rows) that keep a tiled decode close to the whole one. The error
# falls steadily with the tile (each tile's GroupNorm statistics and attention see only the tile), with
# no threshold in the receptive field: the floor is where it stops being gross. Mean |tiled - whole| in
# 8-bit levels (random weights, 64 latent rows, white-noise latents, overlap a quarter of the tile):
# SDXL's decoder layer counts: 1 row 51, 4 rows 27, 8 rows 15, 16 rows 7, 32 rows 3 (at 128 rows:
# 8 -> 16, 16 -> 8, 64 -> 3); the tiny test VAE: 1 row 66, 8 rows 22, 16 rows 11, 32 rows 6. At 16
# rows, no overlap gives 10 and seams up to 220 levels, 2 rows 8, 4 rows 7. Tile sizes need no
# alignment (decoding only upsamples; 15, 16 and 17 rows measure alike).
MIN_TILE_ROWS = 16
MIN_TILE_OVERLAP = 4


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_tiles(tile_rows, tile_overlap=None, name: str = "tile_rows") -> tuple:
    """(tile_rows, tile_overlap) as ints, the overlap defaulting to a quarter of the tile; (None, None) untiled.

    ConfigError below MIN_TILE_ROWS rows or MIN_TILE_OVERLAP shared rows, where tiling visibly changes
    the image (each tile's GroupNorm statistics and mid-block attention see only the tile).
    """
    if tile_rows is None:
        return None, None
    if not _is_int(tile_rows) or tile_rows < MIN_TILE_ROWS:
        raise ConfigError(
            f"{show(name, tile_rows)}: tiles need at least {MIN_TILE_ROWS} latent rows "
            f"({8 * MIN_TILE_ROWS} pixels), below that the tiled decode visibly differs from the "
            f"whole one; use {MIN_TILE_ROWS} or more (e.g. 64), or leave it unset to decode whole"
        )
    tile_overlap = int(tile_rows) // 4 if tile_overlap is None else tile_overlap
    if not _is_int(tile_overlap) or not MIN_TILE_OVERLAP <= tile_overlap < tile_rows:
        raise ConfigError(
            f"tiled decode: tile_overlap={tile_overlap!r} with {show(name, tile_rows)}: use an int "
            f"with {MIN_TILE_OVERLAP} <= tile_overlap < tile_rows (default tile_rows // 4), so "
            "neighbouring tiles blend without visible seams"
        )
    return int(tile_rows), int(tile_overlap)


def row_sharded(n_devices: int, latent_height: int) -> bool:
    """Whether a Decoder over `n_devices` decodes this latent height row-sharded (else on one device)."""
    return n_devices > 1 and latent_height % n_devices == 0


def check_tiles_apply(tile_rows, n_devices: int, latent_height: int, name: str = "decode_tile_rows") -> None:
    """ConfigError where tiles are asked for but the decode is row-sharded (they would silently not apply)."""
    if tile_rows is None or not row_sharded(n_devices, latent_height):
        return
    fix = (
        "drop --decode-tile-rows (or pass --devices 1)"
        if name.startswith("--")
        else f"drop {name}, or pass parallel_decode=False to decode on one device in tiles"
    )
    raise ConfigError(
        f"{show(name, tile_rows)} would be ignored: the VAE decode is row-sharded over {n_devices} "
        f"devices (exact, about 1/{n_devices} of the activation memory on each) and tiles apply only "
        f"to a one-device decode; {fix}"
    )


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
            w[i, rows - shared :] = np.minimum(
                w[i, rows - shared :], (shared - np.arange(shared) - 0.5) / shared
            )
    total = np.zeros(scale * height)
    for i, s in enumerate(starts):
        total[scale * s : scale * s + rows] += w[i]
    for i, s in enumerate(starts):
        w[i] /= total[scale * s : scale * s + rows]
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
        out = out.at[:, scale * s : scale * (s + tile)].add(
            images[i].astype(jnp.float32) * weights[i][:, None, None]
        )
    return out.astype(images.dtype)


class RowShardedVAE:
    """One VAE method as cached programs: row-sharded over the devices, or on one device.

    With several devices and a latent height they divide, each device runs the method on its band of
    rows under a synchronous `PatchPlan`: convs exchange their halo rows, GroupNorms gather their
    statistics, the mid-block attention gathers K/V, each used at once, so the result equals one
    device's. Otherwise it runs on the first device (each process's own in a multi-process run).
    Subclasses name the programs (`name`), give the method (`method(vae, *inputs)`) and the one-device
    function (`_single_fn(params, *inputs)`); every input is NHWC and split by rows.
    """

    name = ""

    def __init__(self, vae, devices, n_inputs: int):
        self.vae = vae
        self.devices = tuple(devices or jax.devices())
        self._single = jax.jit(self._single_fn)  # for abstract lowering (tools/memory.py)
        self._banded, self._mesh = None, None
        if len(self.devices) > 1:
            banded = vae.clone(parallel=PatchPlan("sync", "full_sync"))

            def run_band(p, *xs):
                return banded.apply({"params": p}, *xs, method=type(self).method, mutable=[STALE])[0]

            self._mesh = make_mesh(self.devices, 1)
            self._banded_fn = jax.shard_map(
                run_band,
                mesh=self._mesh,
                in_specs=(P(),) + (P(None, PATCH),) * n_inputs,
                out_specs=P(None, PATCH),
            )
            self._banded = jax.jit(self._banded_fn)
        self._compiled: dict = {}  # (program, argument shapes and placements) -> compiled program

    @staticmethod
    def method(vae, *xs):
        raise NotImplementedError

    def latent_rows(self, x) -> int:
        """The latent height of the first input (its rows, or its pixel rows over the downsampling factor)."""
        return x.shape[1]

    def parallel_for(self, x) -> bool:
        """Whether an input of this shape (the method's first) is processed row-sharded."""
        return self._banded is not None and row_sharded(len(self.devices), self.latent_rows(x))

    def _identity(self) -> tuple:
        return (self.vae, len(self.devices))

    def _run(self, params, *xs):
        if self.parallel_for(xs[0]):
            if jax.process_count() == 1:  # the denoiser's (cfg, patch) mesh may differ from ours
                xs = jax.device_put(xs, NamedSharding(self._mesh, P(None, PATCH)))
            return self._program(f"{self.name}-banded", params, *xs)(params, *xs)
        if jax.process_count() > 1:  # several processes: each runs the whole image on a device of its own
            device = local_device(self.devices)
            params, xs = local_copy(params, device), jax.device_put(tuple(to_host(x) for x in xs), device)
            return self._program(self.name, params, *xs)(params, *xs)
        # one device: weights loaded replicated for the banded run are used from their copy there
        params, xs = jax.device_put((params, xs), self.devices[0])
        return self._program(self.name, params, *xs)(params, *xs)

    def _program(self, name: str, params, *xs):
        """The program compiled for these shapes and placements, or read from the persistent caches."""
        key = (
            name,
            jax.tree_util.tree_structure(params),
            tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in xs),
        )
        if key not in self._compiled:
            identity = repr(self._identity())
            if name == self.name:
                program = compile_program(name, self._single_fn, (params, *xs), identity)
            else:  # several processes: the inputs keep their placement and the program reshards
                shardings = None
                if jax.process_count() == 1:
                    band = NamedSharding(self._mesh, P(None, PATCH))
                    shardings = (NamedSharding(self._mesh, P()),) + (band,) * len(xs)
                program = compile_program(
                    name, self._banded_fn, (params, *xs), identity, self._mesh, shardings
                )
            self._compiled[key] = program
        return self._compiled[key]


def _as(x, dtype):
    return jnp.asarray(x, dtype) if not isinstance(x, jax.Array) else x.astype(dtype)


class Decoder(RowShardedVAE):
    """`decoder(params, z) -> image`: z [B, h, w, C] already divided by the scaling factor (NHWC).

    With several devices and a latent height they divide, each device decodes its band of rows
    (the decoder only upsamples, so bands stay aligned) and exchanges exactly what the single-device
    decode would read across band edges: the result equals one device's, and per-device activation
    memory falls roughly as 1/N (the mid-block attention's gathered K/V, at latent resolution, is
    the part that does not). Otherwise the whole image is decoded on the first device, or, with
    `tile_rows` set (at least MIN_TILE_ROWS), in overlapping row tiles of that many latent rows
    (`tile_overlap` shared rows, at least MIN_TILE_OVERLAP) one after another: memory of one tile,
    an approximation of the whole decode (see `tiled`).
    """

    name = "vae-decode"

    def __init__(self, vae, devices=None, tile_rows=None, tile_overlap=None):
        # a quarter of each tile shared with its neighbour by default (16 of 64 rows)
        tile_rows, tile_overlap = check_tiles(tile_rows, tile_overlap)
        self.tile_rows, self.tile_overlap = tile_rows, tile_overlap
        scale = vae.config.downsample_factor

        def decode(p, z):
            return vae.apply({"params": p}, z, method=vae.decode)

        def decode_tiles(p, z):
            return tiled(lambda t: decode(p, t), z, tile_rows, tile_overlap, scale)

        self._single_fn = decode_tiles if tile_rows else decode
        super().__init__(vae, devices, 1)

    @staticmethod
    def method(vae, z):
        return vae.decode(z)

    def _identity(self) -> tuple:
        return (self.vae, self.tile_rows, self.tile_overlap, len(self.devices))

    def __call__(self, params, z):
        return self._run(params, _as(z, self.vae.dtype))


def posterior_latents(vae, image, noise):
    """SD latents of `image` [B, H, W, 3] in [-1, 1]: the VAE posterior sampled with unit noise [B, h, w, C],
    mean + exp(logvar / 2) * noise, times the scaling factor (float32; diffusers' `latent_dist.sample` and
    img2img's scaling). Zero noise gives the posterior's mean (diffusers' sample_mode="argmax")."""
    mean, logvar = (a.astype(jnp.float32) for a in vae.encode(image))
    return (mean + jnp.exp(0.5 * logvar) * noise.astype(jnp.float32)) * vae.config.scaling_factor


class Encoder(RowShardedVAE):
    """`encoder(params, image, noise) -> latents` [B, h, w, C] float32, scaled as the UNet takes them.

    `image` [B, H, W, 3] NHWC in [-1, 1], `noise` [B, H/f, W/f, C] unit Gaussian (zeros: the posterior's
    mean); see `posterior_latents`. Row-sharded exactly like the `Decoder` where the devices divide the
    latent height (the encoder's stride-2 convs keep bands aligned: each band has f times as many pixel
    rows as latent rows), else on one device.
    """

    name = "vae-encode"

    def __init__(self, vae, devices=None):
        def encode(p, image, noise):
            return vae.apply({"params": p}, image, noise, method=posterior_latents)

        self._single_fn = encode
        super().__init__(vae, devices, 2)

    method = staticmethod(posterior_latents)

    def latent_rows(self, x) -> int:
        return x.shape[1] // self.vae.config.downsample_factor

    def __call__(self, params, image, noise):
        return self._run(params, _as(image, self.vae.dtype), _as(noise, jnp.float32))
