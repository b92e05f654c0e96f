"""NHWC 2-D convolution whose parameters are named like diffusers' `nn.Conv2d` (kernel in HWIO)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from .plan import LayerPlan


class Conv2d(nn.Module):
    """Square convolution with "same" padding (kernel_size // 2), stride 1 or 2.

    A 3x3 conv needs one row above and below its input: on a single device these are the zeros of
    the image border. Row padding is done here explicitly (not by the conv) so that a row-sharded
    input can take its neighbours' rows instead.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    parallel: Optional[LayerPlan] = None  # the patch-parallel plan; None: a single device
    # exchange halo rows synchronously in every step and keep no state (the UNet's conv_in: its input
    # is this step's latent, and its 4-channel rows are tiny)
    exact_halo: bool = False

    @nn.compact
    def __call__(self, x):  # x: [B, H, W, Cin] -> [B, H/stride, W/stride, features]
        k = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        pad = k // 2
        if pad:
            x = self.pad_rows(x, pad)
        y = lax.conv_general_dilated(
            x,
            kernel,
            (self.stride, self.stride),
            ((0, 0), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias

    def pad_rows(self, x, pad):
        """x with `pad` rows above and below: zeros at the image border, the neighbours' rows in a band.

        In a band (whose height the stride divides) a stride-2 conv reads no row below it, so the
        plan is asked for `kernel_size - stride - pad` rows there.
        """
        if self.parallel is not None:
            return self.parallel.pad_rows(self, x, pad, max(0, self.kernel_size - self.stride - pad))
        zeros = jnp.zeros(x.shape[:1] + (pad,) + x.shape[2:], x.dtype)
        return jnp.concatenate([zeros, x, zeros], axis=1)
