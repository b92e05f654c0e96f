"""What each leaf layer does in a synchronous or displaced step, and its stale state.

A `PatchPlan` is handed (through the model) to every 3x3 conv, GroupNorm and self-attention. It
decides from the step's phase and the DistriConfig mode how the layer gets the other bands' data:

| behaviour  | uses                                     | state written for the next step |
|------------|------------------------------------------|---------------------------------|
| sync       | this step's exchange (blocking)          | this step's exchange            |
| displaced  | the previous step's exchange (the state) | this step's exchange (overlaps) |
| frozen     | the state as left by the last sync step  | nothing                         |
| corrected / stale (GroupNorm) | state + this band's fresh statistics | this step's exchange   |
| separate (GroupNorm) | this band's statistics only    | nothing                         |

State lives in the Flax variable collection "stale": per conv `halo` [B, 2 pad, W, C], per
self-attention `k`, `v` [B, P T, N, Hd], per GroupNorm `stats` [P, B, G, 2] (float32).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from . import collectives as C
from .mesh import PATCH

STALE = "stale"  # the Flax variable collection of the stale state
MODES = ("corrected_async_gn", "stale_gn", "sync_gn", "separate_gn", "full_sync", "no_sync")
PHASES = ("sync", "displaced")

# mode -> (conv and attention behaviour, GroupNorm behaviour) in displaced steps
DISPLACED_BEHAVIOUR = {
    "corrected_async_gn": ("displaced", "corrected"),
    "stale_gn": ("displaced", "stale"),
    "sync_gn": ("displaced", "sync"),
    "separate_gn": ("displaced", "separate"),
    "full_sync": ("sync", "sync"),
    "no_sync": ("frozen", "separate"),
}


@dataclasses.dataclass(frozen=True)
class PatchPlan:
    """Static description of one step: phase ("sync" | "displaced") and DistriConfig mode.

    `exact` holds module paths that always exchange synchronously and keep no state: conv_in, whose
    input is the latent itself (the reference replicates the latent; we shard it, so its one halo
    row per side is exchanged exactly; it is tiny).
    """

    phase: str
    mode: str = "corrected_async_gn"
    axis: str = PATCH
    exact: frozenset = frozenset({("conv_in",)})
    # > 0: compute of one band out of `emulate`, on one device without a mesh: every exchange is left
    # out and the state is only read (benchmarks of a displaced step's compute, not for generation)
    emulate: int = 0

    def __post_init__(self):
        if self.phase not in PHASES or self.mode not in MODES:
            raise ValueError(f"PatchPlan: phase {self.phase!r} / mode {self.mode!r} not in {PHASES} / {MODES}")
        if self.emulate and self.phase != "displaced":
            raise ValueError("PatchPlan: emulate needs the displaced phase (a sync step cannot skip its exchange)")

    def bands(self) -> int:
        return self.emulate or lax.axis_size(self.axis)

    def exchange(self, fn, *args):
        """Run a collective, or (emulating) nothing: the caller then keeps the state as it is."""
        return None if self.emulate else fn(*args)

    @property
    def spatial(self) -> str:
        return "sync" if self.phase == "sync" else DISPLACED_BEHAVIOUR[self.mode][0]

    @property
    def norm(self) -> str:
        return "sync" if self.phase == "sync" else DISPLACED_BEHAVIOUR[self.mode][1]

    # ---- 3x3 convolutions ----
    def pad_rows(self, module, x, pad):
        """x [B, h, W, C] -> [B, h + 2 pad, W, C] with the neighbours' rows (zeros at the image border)."""
        if tuple(module.path) in self.exact:
            rows = self.exchange(C.halo_rows, x, pad, self.axis)
            top, bottom = rows if rows else (jnp.zeros_like(x[:, :pad]),) * 2
            return jnp.concatenate([top, x, bottom], axis=1)
        state = module.variable(STALE, "halo", jnp.zeros, x.shape[:1] + (2 * pad,) + x.shape[2:], x.dtype)
        if self.spatial == "sync":
            top, bottom = C.halo_rows(x, pad, self.axis)
            state.value = jnp.concatenate([top, bottom], axis=1)
        else:
            top, bottom = state.value[:, :pad], state.value[:, pad:]
            rows = self.exchange(C.halo_rows, x, pad, self.axis) if self.spatial == "displaced" else None
            if rows:
                state.value = jnp.concatenate(rows, axis=1)
        return jnp.concatenate([top, x, bottom], axis=1)

    # ---- self-attention ----
    def self_attention_kv(self, module, k, v):
        """Local k, v [B, T, N, Hd] -> the whole image's [B, P T, N, Hd]."""
        shape = (k.shape[0], self.bands() * k.shape[1]) + k.shape[2:]
        k_state = module.variable(STALE, "k", jnp.zeros, shape, k.dtype)
        v_state = module.variable(STALE, "v", jnp.zeros, shape, v.dtype)
        if self.spatial == "sync":
            k_state.value, v_state.value = C.gather_tokens(k, self.axis), C.gather_tokens(v, self.axis)
            return k_state.value, v_state.value
        # displaced and frozen: other bands from the state, this band's fresh K/V in its own slice
        index = 0 if self.emulate else None
        k_full = C.replace_own_tokens(k_state.value, k, self.axis, index)
        v_full = C.replace_own_tokens(v_state.value, v, self.axis, index)
        if self.spatial == "displaced" and not self.emulate:
            k_state.value, v_state.value = C.gather_tokens(k, self.axis), C.gather_tokens(v, self.axis)
        return k_full, v_full

    # ---- GroupNorm ----
    def group_norm_stats(self, module, mean, var):
        """This band's (mean, var) [B, G] -> statistics to normalise with, float32."""
        fresh = jnp.stack([mean, var], axis=-1).astype(jnp.float32)
        state = module.variable(STALE, "stats", jnp.zeros, (self.bands(),) + fresh.shape, jnp.float32)
        if self.norm == "sync":
            state.value = C.gather_stats(fresh, self.axis)
            out = C.combine_stats(state.value)
        elif self.norm == "separate":
            out = fresh
        else:
            combine = C.corrected_stats if self.norm == "corrected" else C.stale_stats
            out = combine(state.value, fresh, self.axis, 0 if self.emulate else None)
            gathered = self.exchange(C.gather_stats, fresh, self.axis)
            if gathered is not None:
                state.value = gathered
        return out[..., 0], out[..., 1]
