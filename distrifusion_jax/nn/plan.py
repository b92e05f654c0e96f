"""What a leaf layer asks of the parallel plan it is handed (distrifusion_jax.parallel.PatchPlan is one)."""

from __future__ import annotations

from typing import Callable, Protocol

import jax


class LayerPlan(Protocol):
    """The three hooks through which patch parallelism reaches the model; a layer holds None on one device."""

    def pad_rows(self, module, x: jax.Array, top: int, bottom: int) -> jax.Array:
        """x [B, h, W, C] -> [B, top + h + bottom, W, C] with the neighbours' rows (a 3x3 conv's halo)."""

    def group_norm_stats(self, module, mean: jax.Array, var: jax.Array) -> tuple[jax.Array, jax.Array]:
        """This band's float32 GroupNorm (mean, var) per group -> the statistics to normalise with."""

    def self_attention_kv(
        self, module, x: jax.Array, project: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
    ) -> tuple[jax.Array, jax.Array]:
        """This band's input tokens and the layer's K/V projection -> K and V over the keys to attend to."""
