"""Tiled single-device VAE decode: the tile stitching is exact for a local decoder, and approximates the
whole-image decode of a real VAE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distrifusion_jax as dj
from distrifusion_jax.decode import Decoder, blend_weights, tile_starts, tiled
from distrifusion_jax.models.vae import AutoencoderKL, VAEConfig
from distrifusion_jax.tiny import VAE, tiny_params
from distrifusion_jax.keymap import unflatten


@pytest.mark.parametrize("height,tile,overlap", [(40, 16, 4), (37, 16, 5), (64, 64, 16), (20, 64, 16), (33, 8, 0)])
def test_tiles_cover_every_row_and_weights_sum_to_one(height, tile, overlap):
    tile = min(tile, height)
    starts = tile_starts(height, tile, overlap)
    assert starts[0] == 0 and starts[-1] == height - tile
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap rows
    w = blend_weights(starts, tile, height, 8)
    total = np.zeros(8 * height)
    for i, s in enumerate(starts):
        total[8 * s: 8 * s + 8 * tile] += w[i]
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
    vae = AutoencoderKL(VAEConfig.from_dict(VAE))
    return vae, unflatten(tiny_params("vae", seed=1))


def test_tiled_decode_approximates_whole_decode():
    vae, params = tiny_vae()
    z = jnp.asarray(np.random.default_rng(1).standard_normal((1, 48, 16, 4)), jnp.float32)
    whole = np.asarray(Decoder(vae, jax.devices()[:1])(params, z))
    one_tile = np.asarray(Decoder(vae, jax.devices()[:1], tile_rows=64)(params, z))
    np.testing.assert_array_equal(one_tile, whole)  # a tile covering the latent is the whole decode
    out = np.asarray(Decoder(vae, jax.devices()[:1], tile_rows=16, tile_overlap=8)(params, z))
    assert out.shape == whole.shape and np.isfinite(out).all()
    to01 = lambda a: np.clip(a / 2 + 0.5, 0, 1)
    mse = float(np.mean((to01(out) - to01(whole)) ** 2))
    psnr = 10 * np.log10(1 / mse)
    print(f"tiled decode (3 tiles of 16 latent rows, overlap 8) vs whole decode: PSNR {psnr:.1f} dB")
    assert psnr > 20.0


def test_bad_tile_arguments():
    vae, _ = tiny_vae()
    with pytest.raises(dj.DistriFusionError, match="tile_overlap < tile_rows"):
        Decoder(vae, jax.devices()[:1], tile_rows=16, tile_overlap=16)
