"""Every collective helper against a plain full-array computation, on fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from distrifusion_jax.nn.norm import group_stats
from distrifusion_jax.parallel import CFG, PATCH, make_mesh
from distrifusion_jax.parallel import collectives as C


def mesh(n, cfg=1):
    return make_mesh(jax.devices()[:n], cfg)


def bands(fn, m, x, in_spec=P(None, PATCH), out_spec=P(None, PATCH)):
    return jax.jit(jax.shard_map(fn, mesh=m, in_specs=in_spec, out_specs=out_spec))(x)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_halo_rows_equal_zero_padded_neighbours(n):
    x = np.random.default_rng(0).standard_normal((2, 4 * n, 5, 3)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0)))  # the full image with its zero border
    out = bands(
        lambda b: jnp.concatenate([*C.halo_rows(b, 1, 1, PATCH)[:1], b, C.halo_rows(b, 1, 1, PATCH)[1]], 1),
        mesh(n),
        x,
    )
    # each band of height 4 came back as 6 rows: the padded image's rows around it
    expected = np.concatenate([padded[:, 4 * i : 4 * i + 6] for i in range(n)], axis=1)
    np.testing.assert_array_equal(np.asarray(out), expected)


@pytest.mark.parametrize("n", [2, 4])
def test_gather_tokens_is_the_whole_image_in_row_major_order(n):
    x = np.random.default_rng(1).standard_normal((2, 4 * n, 3, 2, 5)).astype(np.float32)  # [B, H, W, N, Hd]
    full_tokens = x.reshape(2, -1, 2, 5)
    out = bands(
        lambda b: C.gather_tokens(b.reshape(2, -1, 2, 5), PATCH)[:, None], mesh(n), x, out_spec=P(None, PATCH)
    )
    for i in range(n):
        np.testing.assert_array_equal(np.asarray(out)[:, i], full_tokens)


def test_replace_own_tokens():
    n = 4
    stale = np.zeros((1, 8 * n, 2), np.float32)
    fresh = np.arange(8 * n * 2, dtype=np.float32).reshape(1, 8 * n, 2)

    def f(b):
        return C.replace_own_tokens(jnp.asarray(stale), b, PATCH)[:, None]

    out = np.asarray(bands(f, mesh(n), fresh))
    for i in range(n):
        expected = stale.copy()
        expected[:, 8 * i : 8 * (i + 1)] = fresh[:, 8 * i : 8 * (i + 1)]
        np.testing.assert_array_equal(out[:, i], expected)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_combined_stats_equal_whole_image_groupnorm_stats(n):
    rng = np.random.default_rng(2)
    x = (3.0 + rng.standard_normal((2, 2 * n, 4, 8)) * rng.uniform(0.1, 2, (1, 2 * n, 1, 8))).astype(
        np.float32
    )
    mean, var = group_stats(jnp.asarray(x), 4)

    def f(b):
        m, v = group_stats(b, 4)
        return C.combine_stats(C.gather_stats(jnp.stack([m, v], -1), PATCH))[None]

    out = np.asarray(bands(f, mesh(n), x, out_spec=P(PATCH)))
    for i in range(n):  # every device gets the whole image's statistics
        np.testing.assert_allclose(out[i, ..., 0], mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out[i, ..., 1], var, rtol=1e-5, atol=1e-6)


def _stale_and_fresh(n, seed=3, negative=False):
    rng = np.random.default_rng(seed)
    stale = np.stack([rng.standard_normal((n, 2, 4)), rng.uniform(0.5, 2, (n, 2, 4))], -1).astype(np.float32)
    fresh = np.stack([rng.standard_normal((n, 2, 4)), rng.uniform(0.5, 2, (n, 2, 4))], -1).astype(np.float32)
    if negative:  # band 0's variance collapsed since the last step: its corrected variance goes negative
        stale[..., 0] = fresh[..., 0] = 0.0
        stale[..., 1] = 0.1
        stale[0, ..., 1] = 50.0
        fresh[0, ..., 1] = 0.01
    return stale, fresh


def _run_combine(fn, stale, fresh, n):
    def f(s, fr):
        return fn(s[0], fr[0], PATCH)[None]

    m = mesh(n)
    sharded = jax.jit(jax.shard_map(f, mesh=m, in_specs=(P(PATCH), P(PATCH)), out_specs=P(PATCH)))
    return np.asarray(sharded(np.broadcast_to(stale, (n,) + stale.shape), fresh))


@pytest.mark.parametrize("n", [2, 4])
def test_corrected_stats_formula(n):
    stale, fresh = _stale_and_fresh(n)
    out = _run_combine(C.corrected_stats, stale, fresh, n)
    q = lambda s: s[..., 1] + s[..., 0] ** 2  # E[x^2] per band
    for i in range(n):  # the reference's formula: [M, Q] = mean_j B_j + (S_i - B_i), var = Q - M^2
        M = stale[..., 0].mean(0) + fresh[i, ..., 0] - stale[i, ..., 0]
        Q = q(stale).mean(0) + q(fresh[i]) - q(stale[i])
        var = Q - M**2
        within = (stale[..., 1].sum(0) - stale[i, ..., 1] + fresh[i, ..., 1]) / n  # mean band variance
        var = np.maximum(var, C.VARIANCE_FLOOR * within)
        np.testing.assert_allclose(out[i, ..., 0], M, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[i, ..., 1], var, rtol=1e-4, atol=1e-5)


def test_corrected_stats_fixed_point_and_variance_floor():
    n = 4
    stale, _ = _stale_and_fresh(n)
    out = _run_combine(C.corrected_stats, stale, stale, n)  # nothing changed since the last step
    exact = np.asarray(C.combine_stats(jnp.asarray(stale)))
    for i in range(n):
        np.testing.assert_allclose(out[i], exact, rtol=1e-6, atol=1e-7)
    stale, fresh = _stale_and_fresh(n, negative=True)
    out = _run_combine(C.corrected_stats, stale, fresh, n)
    assert np.isfinite(out).all() and (out[..., 1] >= 0).all()
    raw = stale[..., 1].mean(0) + fresh[0, ..., 1] - stale[0, ..., 1]  # Q - M^2 for band 0 (means all 0)
    assert (raw < -30).all()
    # clamped to the mean of the band variances (band 0's fresh one, the others' stale ones)
    floor = (stale[1:, ..., 1].sum(0) + fresh[0, ..., 1]) / n
    np.testing.assert_allclose(out[0, ..., 1], C.VARIANCE_FLOOR * floor, rtol=1e-6)
    assert (C.VARIANCE_FLOOR * floor > 0.03).all()  # well above the reference's fallback fresh[0] = 0.01
    np.testing.assert_allclose(
        out[1:, ..., 1],
        np.broadcast_to(stale[..., 1].mean(0), out[1:, ..., 1].shape) + fresh[1:, ..., 1] - stale[1:, ..., 1],
        rtol=1e-5,
    )


@pytest.mark.parametrize("negative", [False, True])
def test_stale_stats_is_exact_combination_with_own_slot_fresh(negative):
    n = 4
    stale, fresh = _stale_and_fresh(n, negative=negative)
    out = _run_combine(C.stale_stats, stale, fresh, n)
    for i in range(n):
        mixed = stale.copy()
        mixed[i] = fresh[i]
        m, v = mixed[..., 0], mixed[..., 1]
        M = m.mean(0)  # (sum_{j != i} B_j + S_i) / N
        var = (v + m**2).mean(0) - M**2
        np.testing.assert_allclose(out[i, ..., 0], M, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[i, ..., 1], var, rtol=1e-4, atol=1e-5)
    assert (out[..., 1] >= 0).all()


def test_cfg_exchange_gives_both_branches_everywhere():
    m = mesh(8, cfg=2)
    x = np.random.default_rng(4).standard_normal((2, 16, 3, 4)).astype(np.float32)  # [2 branches, h, w, c]

    def f(b):  # b: [1, 16 / 4, 3, 4], this device's branch and band
        return C.cfg_exchange(b, CFG)[:, 0]  # [2, h/4, 3, 4]

    out = jax.jit(jax.shard_map(f, mesh=m, in_specs=P(CFG, PATCH), out_specs=P(None, PATCH)))(x)
    np.testing.assert_array_equal(np.asarray(out), x)


@pytest.mark.parametrize("n", [2, 4])
def test_rows_to_cols_round_trip(n):
    x = np.random.default_rng(5).standard_normal((1, 4 * n, 4 * n, 2)).astype(np.float32)
    cols = bands(lambda b: C.rows_to_cols(b, PATCH), mesh(n), x, out_spec=P(None, None, PATCH))
    np.testing.assert_array_equal(np.asarray(cols), x)  # as a global array: the same image, column-sharded
    back = bands(lambda b: C.cols_to_rows(C.rows_to_cols(b, PATCH), PATCH), mesh(n), x)
    np.testing.assert_array_equal(np.asarray(back), x)


@pytest.mark.parametrize("n", [1, 4])
def test_sample_std_is_the_whole_image_unbiased_std(n):
    x = (2.0 + np.random.default_rng(6).standard_normal((2, 8, 6, 4)) * 3).astype(np.float32)
    expected = x.reshape(2, -1).std(axis=1, ddof=1)
    if n == 1:
        out = np.asarray(C.sample_std(jnp.asarray(x)))
    else:
        out = np.asarray(
            bands(lambda b: C.sample_std(b, PATCH)[:, :, None], mesh(n), x, out_spec=P(None, None, PATCH))
        )[:, 0, 0, 0]
    np.testing.assert_allclose(out.reshape(-1), expected, rtol=1e-5)
