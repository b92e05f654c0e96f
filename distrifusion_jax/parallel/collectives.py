"""Every collective of patch parallelism: small functions of local arrays and a mesh axis name.

Shapes in comments are per device; P is the size of the axis, B the local batch. Called only inside
`jax.shard_map`. GroupNorm statistics are float32 (mean, biased variance) pairs [..., 2].
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def halo_rows(x, top: int, bottom: int, axis: str):
    """The `top` rows above and the `bottom` rows below this device's band, from its neighbours on `axis`.

    x: [B, h, W, C] -> (above [B, top, W, C], below [B, bottom, W, C]).
    Non-cyclic ppermutes: each device sends its last `top` rows down and its first `bottom` rows up;
    the first and last bands receive nothing, i.e. zeros, which is exactly the conv's zero padding at
    the image border. A count of 0 moves nothing (a stride-2 conv reads no row below its band).
    Bytes sent per device: at most B * (top + bottom) * W * C * itemsize (only to the two neighbours;
    the reference all-gathers the rows to every device).
    """
    p = lax.axis_size(axis)

    def shift(rows, perm):
        return lax.ppermute(rows, axis, perm=perm) if rows.shape[1] else rows

    above = shift(x[:, x.shape[1] - top :], [(i, i + 1) for i in range(p - 1)])
    below = shift(x[:, :bottom], [(i + 1, i) for i in range(p - 1)])
    return above, below


def gather_tokens(x, axis: str):
    """All bands' tokens in image order: x [B, T, ...] -> [B, P * T, ...] (an all_gather).

    Band i holds rows i*h .. (i+1)*h - 1, whose row-major tokens are contiguous, so concatenating
    the bands along tokens gives the whole image's row-major token order. x is K or V [B, T, N, Hd],
    attention input tokens [B, T, C] (stale_kv="hidden"), or their encoded values and float32 scales
    [B, T, ..., 1] (stale_kv_dtype, parallel/compress.py).
    Bytes received per device: (P - 1) * x.size * itemsize (K/V: (P - 1) * B * T * N * Hd * itemsize;
    int8 or float8 with scales: (P - 1) * B * T * N * (Hd + 4)).
    """
    return lax.all_gather(x, axis, axis=1, tiled=True)


def _index(axis, index):
    return lax.axis_index(axis) if index is None else index


def replace_own_tokens(full, local, axis: str, index=None):
    """full [B, P * T, ...] with this device's slice [B, T, ...] replaced by `local` (no communication).

    `index` overrides this device's band index (None: its position on `axis`).
    """
    start = _index(axis, index) * local.shape[1]
    return lax.dynamic_update_slice_in_dim(full, local.astype(full.dtype), start, axis=1)


def gather_stats(stats, axis: str):
    """Every band's GroupNorm statistics: stats [B, G, 2] -> [P, B, G, 2] (an all_gather, float32).

    Bytes received per device: (P - 1) * B * G * 2 * 4.
    """
    return lax.all_gather(stats.astype(jnp.float32), axis)


def combine_stats(gathered):
    """Exact whole-image (mean, var) [B, G, 2] from equal bands' (mean, biased var) [P, B, G, 2].

    var = mean_j v_j + mean_j (m_j - M)^2 (the parallel-variance formula), which is the biased
    variance of the whole image, never negative, without E[x^2] - E[x]^2 cancellation.
    """
    m, v = gathered[..., 0], gathered[..., 1]
    mean = m.mean(axis=0)
    var = v.mean(axis=0) + jnp.square(m - mean).mean(axis=0)
    return jnp.stack([mean, var], axis=-1)


def stale_stats(stale, fresh, axis: str, index=None):
    """`stale_gn`: the previous step's statistics of the other bands with this band's fresh ones.

    stale [P, B, G, 2], fresh [B, G, 2] -> [B, G, 2]; var >= 0 by construction.
    """
    return combine_stats(_own_fresh(stale, fresh, _index(axis, index)))


def _own_fresh(stale, fresh, i):
    """Every band's statistics [P, B, G, 2]: the stale ones with band i's replaced by its fresh ones."""
    return lax.dynamic_update_index_in_dim(stale, fresh.astype(stale.dtype), i, axis=0)


VARIANCE_FLOOR = 0.5  # corrected_stats: var >= this x the mean band variance


def corrected_stats(stale, fresh, axis: str, index=None):
    """`corrected_async_gn` (paper section 4.2): stale global statistics plus this band's change.

    In the reference's terms, with S_i = [m_i, E_i[x^2]] and B_j the stale S_j:
    [M, Q] = mean_j B_j + (S_i - B_i), var = Q - M^2. Expanded around the stale mean mu this is
      var = mean_j v~_j + mean_j (m~_j - mu)^2 + (v_i - v~_i) + 2 (m_i - m~_i)(m~_i - mu),
    the same value without cancellation. The whole image's variance is never below the mean of its
    bands' variances (law of total variance); estimated with this band's fresh v_i and the other
    bands' stale ones, that mean runs high when the image's variance falls between steps, so var is
    clamped from below by VARIANCE_FLOOR times it: a guard against collapse, not a correction. The
    reference only replaces a negative var by v_i. Thin bands (8 bands of 4 latent rows, 1 row at
    the UNet's deepest level) change so much between steps that the estimate falls towards 0 without
    going negative, and dividing by its square root streaked the demo model's images at the band
    seams: 8 held-out prompts at 8 bands, 25.4 dB mean / 15.7 dB worst vs one device with the
    reference's rule, 32.0 / 27.0 dB with the floor; 2 and 4 bands unchanged (39.7 / 35.6 dB; the
    whole floor cost them 2 dB). stale [P, B, G, 2], fresh [B, G, 2] -> [B, G, 2].
    """
    i = _index(axis, index)
    own = lax.dynamic_index_in_dim(stale, i, axis=0, keepdims=False)
    base = combine_stats(stale)
    mu = base[..., 0]
    dm = fresh[..., 0] - own[..., 0]
    mean = mu + dm
    var = base[..., 1] + (fresh[..., 1] - own[..., 1]) + 2.0 * dm * (own[..., 0] - mu)
    within = _own_fresh(stale, fresh, i)[..., 1].mean(axis=0)  # the mean band variance
    return jnp.stack([mean, jnp.maximum(var, VARIANCE_FLOOR * within)], axis=-1)


def cfg_exchange(eps, axis: str):
    """Both guidance branches' predictions on every device: eps [B, h, W, C] -> [2, B, h, W, C].

    The result is the same on both halves of the `cfg` axis (typed invariant), so the guided latents
    stay replicated over it. Bytes received per device: B * h * W * C * itemsize.
    """
    return lax.all_gather(eps, axis, axis=0, to="invarying")


def sample_std(x, axis=None):
    """Per-sample unbiased standard deviation over all but the batch axis, of the whole image.

    x: [B, h, W, C] (a band when `axis` is the patch axis) -> [B, 1, 1, 1], float32. One psum of
    two numbers per sample (8 B * 2 bytes) over the bands; None: x is the whole image.
    """
    x = x.astype(jnp.float32)
    reduce = tuple(range(1, x.ndim))
    moments = jnp.stack([x.sum(reduce), jnp.square(x).sum(reduce)], axis=-1)  # [B, 2]
    n = x[0].size
    if axis is not None:
        moments, n = lax.psum(moments, axis), n * lax.axis_size(axis)
    mean = moments[:, 0] / n
    var = jnp.maximum(moments[:, 1] - n * jnp.square(mean), 0.0) / (n - 1)
    return jnp.sqrt(var).reshape((-1,) + (1,) * (x.ndim - 1))


def rows_to_cols(x, axis: str):
    """Row band [B, h/P, W, C] -> column strip [B, h, W/P, C] (an all_to_all, for naive col patches)."""
    return lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)


def cols_to_rows(x, axis: str):
    """Column strip [B, h, W/P, C] -> row band [B, h/P, W, C] (the inverse of `rows_to_cols`)."""
    return lax.all_to_all(x, axis, split_axis=1, concat_axis=2, tiled=True)
