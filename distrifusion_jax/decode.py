"""VAE decode, row-sharded over the devices with exact (synchronous) halo, GroupNorm and K/V exchange."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .parallel import PATCH, STALE, PatchPlan, make_mesh


class Decoder:
    """`decoder(params, z) -> image`: z [B, h, w, C] already divided by the scaling factor (NHWC).

    With several devices and a latent height they divide, each device decodes its band of rows
    (the decoder only upsamples, so bands stay aligned) and exchanges exactly what the single-device
    decode would read across band edges: the result equals one device's, and per-device activation
    memory falls roughly as 1/N (the mid-block attention's gathered K/V, at latent resolution, is
    the part that does not). Otherwise the whole image is decoded on the first device.
    """

    def __init__(self, vae, devices=None):
        self.vae = vae
        self.devices = tuple(devices or jax.devices())
        self._single = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
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
        return self._single(params, jax.device_put(z, self.devices[0]))
