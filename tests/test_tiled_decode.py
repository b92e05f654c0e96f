"""Tiled single-device VAE decode: the tile stitching is exact for a local decoder, and approximates the
whole-image decode of a real VAE."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distrifusion_jax as dj
from distrifusion_jax.decode import (
    MIN_TILE_ROWS,
    Decoder,
    blend_weights,
    check_tiles_apply,
    tile_starts,
    tiled,
)
from distrifusion_jax.keymap import unflatten
from distrifusion_jax.models.presets import vae_preset
from distrifusion_jax.models.vae import AutoencoderKL
from distrifusion_jax.tools.random_pipeline import random_params_of


@pytest.mark.parametrize(
    "height,tile,overlap", [(40, 16, 4), (37, 16, 5), (64, 64, 16), (20, 64, 16), (33, 8, 0)]
)
def test_tiles_cover_every_row_and_weights_sum_to_one(height, tile, overlap):
    tile = min(tile, height)
    starts = tile_starts(height, tile, overlap)
    assert starts[0] == 0 and starts[-1] == height - tile
    assert all(
        b - a <= tile - overlap for a, b in zip(starts, starts[1:])
    )  # neighbours share >= overlap rows
    w = blend_weights(starts, tile, height, 8)
    total = np.zeros(8 * height)
    for i, s in enumerate(starts):
        total[8 * s : 8 * s + 8 * tile] += w[i]
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)
    assert (w >= 0).all()


def test_stitching_is_exact_for_a_pixelwise_decoder():
    """A decoder with no spatial context (per-pixel map + nearest upsampling) must come back unchanged."""
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((2, 37, 11, 4)), jnp.float32)
    mix = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    local = lambda t: jnp.repeat(jnp.repeat(jnp.tanh(t @ mix), 8, axis=1), 8, axis=2)
    out = jax.jit(lambda z: tiled(local, z, 16, 5, 8))(z)
    np.testing.assert_allclose(np.asarray(out), np.asarray(local(z)), rtol=0, atol=1e-6)


def tiny_vae():
    vae = AutoencoderKL(vae_preset("tiny-sdxl"))
    return vae, unflatten(random_params_of("tiny-sdxl", "vae", seed=1))


def psnr(out, whole) -> float:
    to01 = lambda a: np.clip(a / 2 + 0.5, 0, 1)
    return float(10 * np.log10(1 / np.mean((to01(out) - to01(whole)) ** 2)))


def test_tiled_decode_approximates_whole_decode():
    """The smallest tile accepted (16 rows, overlap 4) stays close; 4-row tiles, now refused, were not
    (measured at 64 latent rows: 23.9 and 13.7 dB; see decode.MIN_TILE_ROWS)."""
    vae, params = tiny_vae()
    z = jnp.asarray(np.random.default_rng(1).standard_normal((1, 48, 16, 4)), jnp.float32)
    whole = np.asarray(Decoder(vae, jax.devices()[:1])(params, z))
    one_tile = np.asarray(Decoder(vae, jax.devices()[:1], tile_rows=64)(params, z))
    np.testing.assert_array_equal(one_tile, whole)  # a tile covering the latent is the whole decode
    out = np.asarray(Decoder(vae, jax.devices()[:1], tile_rows=MIN_TILE_ROWS)(params, z))
    assert out.shape == whole.shape and np.isfinite(out).all()
    decode = lambda t: vae.apply({"params": params}, t, method=vae.decode)
    small = np.asarray(jax.jit(lambda z: tiled(decode, z, 4, 1, 8))(z))
    print(
        f"tiled decode vs whole decode: PSNR {psnr(out, whole):.1f} dB with tiles of {MIN_TILE_ROWS} latent rows "
        f"(overlap {MIN_TILE_ROWS // 4}), {psnr(small, whole):.1f} dB with 4 (overlap 1)"
    )
    assert psnr(out, whole) > 20.0 and psnr(small, whole) < 16.0


@pytest.mark.parametrize(
    "rows, overlap, message",
    [
        (1, None, "tile_rows=1: tiles need at least 16 latent rows (128 pixels)"),
        (3, None, "tile_rows=3: tiles need at least 16"),
        (15, None, "tile_rows=15: tiles need at least 16"),
        (16.0, None, "tile_rows=16.0: tiles need at least 16"),
        (True, None, "tile_rows=True: tiles need at least 16"),
        (16, 3, "tile_overlap=3 with tile_rows=16: use an int with 4 <= tile_overlap < tile_rows"),
        (16, 16, "4 <= tile_overlap < tile_rows"),
    ],
)
def test_bad_tile_arguments(rows, overlap, message):
    vae = AutoencoderKL(vae_preset("tiny-sdxl"))
    with pytest.raises(dj.ConfigError, match=re.escape(message)):
        Decoder(vae, jax.devices()[:1], tile_rows=rows, tile_overlap=overlap)


def test_tiles_apply_only_to_a_one_device_decode():
    check_tiles_apply(16, 1, 128)
    check_tiles_apply(16, 2, 9)  # a latent height the devices do not divide is decoded on one device
    check_tiles_apply(None, 4, 128)
    with pytest.raises(
        dj.ConfigError,
        match=r"decode_tile_rows=16 would be ignored: the VAE decode is row-sharded "
        r"over 2 devices .* or pass parallel_decode=False",
    ):
        check_tiles_apply(16, 2, 128)
    with pytest.raises(dj.ConfigError, match=r"drop --decode-tile-rows \(or pass --devices 1\)"):
        check_tiles_apply(64, 4, 128, "--decode-tile-rows")
