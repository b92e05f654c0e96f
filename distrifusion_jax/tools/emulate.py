"""One band of a displaced step on one device, without a mesh: what each device computes, to time and count.

`BandPlan` is a PatchPlan whose layers leave every exchange out: conv_in's synchronous halo rows are
zeros (the first band has none above; the row below costs nothing to compute), the other layers read
the stale state (halo rows, the whole image's K/V or tokens, every band's GroupNorm statistics) as a
device's displaced step does and leave it as it is. Given band 0's state, its prediction is band 0's
prediction in a real displaced step (tests/test_tools.py checks it against a shard_map'd one).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..config import MODES
from ..errors import ConfigError
from ..parallel import STALE, PatchPlan, compress
from ..parallel import collectives as C
from ..parallel.plan import DISPLACED_BEHAVIOUR

# modes whose displaced steps exchange nothing synchronously (their exchanges only feed the next step's state)
EMULATED_MODES = tuple(m for m in MODES if "sync" not in DISPLACED_BEHAVIOUR[m])


@dataclasses.dataclass(frozen=True)
class BandPlan(PatchPlan):
    """The displaced-step plan of band 0 of `n_bands`, on one device: every collective left out."""

    phase: str = "displaced"
    n_bands: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.phase != "displaced" or self.mode not in EMULATED_MODES:
            raise ConfigError(
                f"mode {self.mode!r} ({self.phase} step): one band is emulated only in displaced steps "
                f"that exchange nothing synchronously: use one of {', '.join(EMULATED_MODES)}"
            )
        if isinstance(self.n_bands, bool) or not isinstance(self.n_bands, int) or self.n_bands < 2:
            raise ConfigError(f"n_bands={self.n_bands!r}: one band of at least 2 is emulated")

    def bands(self) -> int:
        return self.n_bands

    def pad_rows(self, module, x, top, bottom):
        if getattr(module, "exact_halo", False):  # conv_in: this step's rows from the neighbours, none here
            rows = [jnp.zeros(x.shape[:1] + (n,) + x.shape[2:], x.dtype) for n in (top, bottom)]
        else:
            state = module.variable(
                STALE, "halo", jnp.zeros, x.shape[:1] + (top + bottom,) + x.shape[2:], x.dtype
            )
            rows = state.value[:, :top], state.value[:, top:]
        return jnp.concatenate([rows[0], x, rows[1]], axis=1)

    def whole_image_tokens(self, module, name, local):
        # the state as PatchPlan declares it (encoded values, and scales for float8 / int8)
        whole = jax.ShapeDtypeStruct(
            (local.shape[0], self.n_bands * local.shape[1]) + local.shape[2:], local.dtype
        )
        encoded = jax.eval_shape(lambda a: compress.encode(a, self.stale_kv_dtype), whole)
        values, scale = (
            None if s is None else module.variable(STALE, name + suffix, jnp.zeros, s.shape, s.dtype)
            for s, suffix in zip(encoded, ("", "_scale"))
        )
        stale = compress.decode(values.value, None if scale is None else scale.value, local.dtype)
        return C.replace_own_tokens(stale, local, self.axis, 0)

    def group_norm_stats(self, module, mean, var):
        if not self.keeps("norm"):  # separate statistics: nothing exchanged anyway
            return super().group_norm_stats(module, mean, var)
        fresh = jnp.stack([mean, var], axis=-1).astype(jnp.float32)
        state = module.variable(STALE, "stats", jnp.zeros, (self.n_bands,) + fresh.shape, jnp.float32)
        combine = C.corrected_stats if self.norm == "corrected" else C.stale_stats
        out = combine(state.value, fresh, self.axis, 0)
        return out[..., 0], out[..., 1]


def band_step(
    unet, n_bands: int, mode: str = "corrected_async_gn", stale_kv: str = "kv", stale_kv_dtype=None
):
    """(apply(params, state, x, t, ehs, added) -> band 0's prediction, state_shapes(params, x, t, ehs, added))
    of one band of `n_bands` in a displaced step; the state's shapes come from a first call without one."""
    band = unet.clone(
        parallel=BandPlan(mode=mode, n_bands=n_bands, stale_kv=stale_kv, stale_kv_dtype=stale_kv_dtype)
    )

    def apply(params, state, x, t, ehs, added):
        return band.apply({"params": params, **state}, x, t, ehs, added, mutable=[STALE])[0]

    def state_shapes(params, x, t, ehs, added):
        return jax.eval_shape(
            lambda p, *a: band.apply({"params": p}, *a, mutable=[STALE])[1], params, x, t, ehs, added
        )

    return apply, state_shapes
