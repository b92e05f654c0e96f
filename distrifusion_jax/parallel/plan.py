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

Two options shrink the self-attention state (and its exchange), the largest part by far:
`stale_kv="hidden"` keeps the attention's input tokens `hidden` [B, P T, C] instead of K and V
(half the bytes) and projects the whole image's K/V from them with the layer's own to_k / to_v
every step (the stale tokens give exactly the stale K/V: the weights do not change); and
`stale_kv_dtype` stores them narrower (`compress`: bfloat16, or float8 / int8 with a float32
`<name>_scale` [B, P T, ..., 1] per token and head), encoded before the all_gather. A synchronous
step still attends to the exact exchanged tokens and only stores them encoded; a displaced step
reads the decoded state with this band's own tokens exact (fresh).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from ..config import MODES, STALE_KV, STALE_KV_DTYPES
from . import collectives as C
from . import compress
from .mesh import PATCH

STALE = "stale"  # the Flax variable collection of the stale state
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
    """Static description of one step: phase ("sync" | "displaced"), DistriConfig mode and stale K/V options.

    A conv marked `exact_halo` (the UNet's conv_in, whose input is the latent itself: the reference
    replicates the latent; we shard it) always exchanges its halo synchronously and keeps no state,
    wherever the model sits in a module tree. State is kept only where a displaced step of the mode
    reads it (`keeps`): `full_sync` keeps none, `sync_gn` / `separate_gn` / `no_sync` no GroupNorm
    statistics.
    """

    phase: str
    mode: str = "corrected_async_gn"
    axis: str = PATCH
    stale_kv: str = "kv"  # "kv" | "hidden": see the module docstring
    stale_kv_dtype: Optional[str] = None  # None (the compute dtype) | "bfloat16" | "float8_e4m3fn" | "int8"

    def __post_init__(self):
        if self.phase not in PHASES or self.mode not in MODES:
            raise ValueError(
                f"PatchPlan: phase {self.phase!r} / mode {self.mode!r} not in {PHASES} / {MODES}"
            )
        if self.stale_kv not in STALE_KV or self.stale_kv_dtype not in STALE_KV_DTYPES:
            raise ValueError(
                f"PatchPlan: stale_kv {self.stale_kv!r} / stale_kv_dtype {self.stale_kv_dtype!r} "
                f"not in {STALE_KV} / {STALE_KV_DTYPES}"
            )

    def bands(self) -> int:
        return lax.axis_size(self.axis)

    @property
    def spatial(self) -> str:
        return "sync" if self.phase == "sync" else DISPLACED_BEHAVIOUR[self.mode][0]

    @property
    def norm(self) -> str:
        return "sync" if self.phase == "sync" else DISPLACED_BEHAVIOUR[self.mode][1]

    def keeps(self, kind: str) -> bool:
        """Whether displaced steps of this mode read stale state of a kind: "spatial" (conv halos and
        attention tokens) or "norm" (GroupNorm statistics). What nothing reads is neither stored nor sent."""
        spatial, norm = DISPLACED_BEHAVIOUR[self.mode]
        return spatial in ("displaced", "frozen") if kind == "spatial" else norm in ("corrected", "stale")

    # ---- 3x3 convolutions ----
    def pad_rows(self, module, x, top, bottom):
        """x [B, h, W, C] -> [B, top + h + bottom, W, C] with the neighbours' rows (zeros at the image border)."""
        if getattr(module, "exact_halo", False) or not self.keeps("spatial"):  # this step's rows, no state
            rows = C.halo_rows(x, top, bottom, self.axis)
            return jnp.concatenate([rows[0], x, rows[1]], axis=1)
        state = module.variable(
            STALE, "halo", jnp.zeros, x.shape[:1] + (top + bottom,) + x.shape[2:], x.dtype
        )
        if self.spatial == "sync":
            rows = C.halo_rows(x, top, bottom, self.axis)
            state.value = jnp.concatenate(rows, axis=1)
        else:
            rows = state.value[:, :top], state.value[:, top:]
            if self.spatial == "displaced":
                state.value = jnp.concatenate(C.halo_rows(x, top, bottom, self.axis), axis=1)
        return jnp.concatenate([rows[0], x, rows[1]], axis=1)

    # ---- self-attention ----
    def self_attention_kv(self, module, x, project):
        """This band's input tokens x [B, T, D] -> the whole image's k, v [B, P T, N, Hd].

        `project(tokens [B, S, D]) -> (k, v) [B, S, N, Hd]` is the layer's to_k / to_v. "kv" projects
        this band and exchanges K and V; "hidden" exchanges the input tokens and projects all of them.
        """
        if self.stale_kv == "hidden":
            return project(self.whole_image_tokens(module, "hidden", x))
        k, v = project(x)
        return self.whole_image_tokens(module, "k", k), self.whole_image_tokens(module, "v", v)

    def whole_image_tokens(self, module, name, local):
        """This band's tokens local [B, T, ...] -> the whole image's [B, P T, ...], kept in state `name`.

        sync: this step's all_gather (exact), stored encoded; displaced / frozen: the decoded state
        with this band's slice replaced by `local`, and (displaced) this step's encoded tokens
        all-gathered into the state.
        """
        if not self.keeps("spatial"):  # full_sync: this step's tokens, nothing kept
            return C.gather_tokens(local, self.axis)
        encode = lambda a: compress.encode(a, self.stale_kv_dtype)
        whole = jax.ShapeDtypeStruct(
            (local.shape[0], self.bands() * local.shape[1]) + local.shape[2:], local.dtype
        )
        values, scale = (
            None if s is None else module.variable(STALE, name + suffix, jnp.zeros, s.shape, s.dtype)
            for s, suffix in zip(jax.eval_shape(encode, whole), ("", "_scale"))
        )

        def store(encoded):
            values.value = encoded[0]
            if scale is not None:
                scale.value = encoded[1]

        if self.spatial == "sync":
            full = C.gather_tokens(local, self.axis)
            store(encode(full))  # per-token encoding: the same as gathering the encoded bands
            return full
        stale = compress.decode(values.value, None if scale is None else scale.value, local.dtype)
        full = C.replace_own_tokens(stale, local, self.axis)
        if self.spatial == "displaced":
            store(jax.tree.map(lambda a: C.gather_tokens(a, self.axis), encode(local)))
        return full

    # ---- GroupNorm ----
    def group_norm_stats(self, module, mean, var):
        """This band's (mean, var) [B, G] -> statistics to normalise with, float32."""
        fresh = jnp.stack([mean, var], axis=-1).astype(jnp.float32)
        if self.norm == "separate":
            return mean.astype(jnp.float32), var.astype(jnp.float32)
        if not self.keeps("norm"):  # sync_gn, full_sync, or the warmup of separate_gn / no_sync: nothing kept
            out = C.combine_stats(C.gather_stats(fresh, self.axis))
            return out[..., 0], out[..., 1]
        state = module.variable(STALE, "stats", jnp.zeros, (self.bands(),) + fresh.shape, jnp.float32)
        if self.norm == "sync":
            state.value = C.gather_stats(fresh, self.axis)
            out = C.combine_stats(state.value)
        else:
            combine = C.corrected_stats if self.norm == "corrected" else C.stale_stats
            out = combine(state.value, fresh, self.axis)
            state.value = C.gather_stats(fresh, self.axis)
        return out[..., 0], out[..., 1]
