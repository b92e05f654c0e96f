"""Tensor parallelism (the reference's baseline): heads and channels sharded over a mesh axis, under GSPMD.

Megatron style: each pair of layers below splits its inner dimension across the TENSOR axis, and
XLA inserts one all-reduce after the second layer of the pair (from the parameter shardings):

  attn1, attn2: to_q, to_k, to_v split by output features, to_out_0 by input  (whole heads)
  ff:           net_0.proj split by output (hidden and gate alike), net_2 by input  (hidden units)
  resnets:      conv1, time_emb_proj and norm2 split by channel, conv2 by input channel  (whole groups)

Resnet channels are split in whole GroupNorm groups, so norm2's statistics stay local. A module whose
unit count does not divide by the TENSOR axis size keeps its parameters replicated (the reference
splits heads unevenly instead). Everything else (embeddings, conv_in/out, norms, projections,
guidance, the scheduler, the latents) is replicated.

With guidance and `split_batch` (an even device count) the mesh is [2, n/2] over (CFG, TENSOR): each
half runs one guidance branch with tensor parallelism over its n/2 devices, as the reference does
with its `n_device_per_batch`; otherwise the mesh is [1, n] and the guidance batch runs on all.

"""

from __future__ import annotations

import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .errors import ConfigError
from .keymap import flatten, unflatten
from .models.blocks import GEGLU
from .models.unet import UNetConfig
from .parallel.mesh import CFG, TENSOR

# module path -> (role, unit). Roles: "column" splits output features (kernel's last axis and the
# bias), so the output is sharded on its last axis; "row" splits input features (kernel's axis -2,
# bias replicated), so its outputs are partial sums that XLA all-reduces; "geglu" is GEGLU's proj
# held as [D, 2, I] so that each device has the hidden and gate columns that multiply each other;
# "channels" is a per-channel affine (GroupNorm) on sharded channels.
RULES = (
    (r"/attn[12]/to_[qkv]$", "column", "heads"),
    (r"/attn[12]/to_out_0$", "row", "heads"),
    (r"/ff/net_0(/proj)?$", "geglu", "ff"),
    (r"/ff/net_2$", "row", "ff"),
    (r"(^|/)resnets_\d+/(conv1|time_emb_proj)$", "column", "groups"),
    (r"(^|/)resnets_\d+/norm2$", "channels", "groups"),
    (r"(^|/)resnets_\d+/conv2$", "row", "groups"),
)
# role -> {parameter leaf: axis split}; leaves not listed stay replicated (a row layer's bias)
SPLIT_AXIS = {
    "column": {"kernel": -1, "bias": -1},
    "row": {"kernel": -2},
    "geglu": {"kernel": -1, "bias": -1},
    "channels": {"scale": -1, "bias": -1},
}
GEGLU_PROJ = re.compile(r"/ff/net_0/proj/(kernel|bias)$")


def make_tensor_mesh(devices, cfg_size: int) -> Mesh:
    """Devices laid out as [cfg_size, len(devices) // cfg_size] with axes (CFG, TENSOR)."""
    devices = np.asarray(devices, dtype=object)
    return Mesh(devices.reshape(cfg_size, devices.size // cfg_size), (CFG, TENSOR))


def level_of(path: str, config: UNetConfig) -> int:
    """The UNet level (index into block_out_channels) of a module path."""
    top = path.split("/", 1)[0]
    if top == "mid_block":
        return config.num_levels - 1
    kind, _, i = top.rpartition("_")
    if kind == "down_blocks":
        return int(i)
    if kind == "up_blocks":
        return config.num_levels - 1 - int(i)
    raise ValueError(f"{path}: not inside a UNet block")


def unit_count(unit: str, path: str, config: UNetConfig) -> int:
    """How many indivisible units the split axis of this module holds."""
    if unit == "groups":
        return config.norm_num_groups
    level = level_of(path, config)
    return config.heads[level] if unit == "heads" else 4 * config.block_out_channels[level]  # ff: GEGLU inner


def attention_levels(config: UNetConfig) -> list:
    """Levels with transformer blocks (the mid block's level always has them)."""
    n = config.num_levels
    return [
        i
        for i in range(n)
        if config.down_block_types[i] == "CrossAttnDownBlock2D"
        or config.up_block_types[n - 1 - i] == "CrossAttnUpBlock2D"
        or i == n - 1
    ]


def rule_for(path: str):
    """(role, unit) of a module path, or None where nothing is split."""
    for pattern, role, unit in RULES:
        if re.search(pattern, path):
            return role, unit
    return None


def to_layout(params):
    """Parameters in the layout the tensor-parallel UNet reads: GEGLU proj kernel [D, 2I] -> [D, 2, I], bias [2, I].

    A reshape (no data moves): it is what lets a contiguous split of the last axis give each device
    the hidden and gate columns that multiply each other. Idempotent.
    """
    flat = flatten(params)
    for path, a in flat.items():
        if GEGLU_PROJ.search(path):
            flat[path] = a.reshape((a.shape[0], 2, -1) if path.endswith("kernel") else (2, -1))
    return unflatten(flat)


class TensorPlan:
    """Which parameters are split on the (CFG, TENSOR) mesh, their placement, and the UNet wrapper."""

    def __init__(self, config: UNetConfig, devices, cfg_size: int):
        self.config = config
        self.cfg_size = cfg_size
        self.size = len(devices) // cfg_size  # devices per guidance branch
        self.mesh = make_tensor_mesh(devices, cfg_size)
        self._placed = None  # (the caller's leaves, placed tree): one-entry cache of `place_params`
        self._roles: dict = {}
        if self.size > 1 and not self.any_split():
            raise ConfigError(
                f"tensor parallelism over {self.size} devices per guidance branch splits nothing in this UNet: "
                f"its GroupNorm groups ({config.norm_num_groups}), attention heads and feed-forward widths "
                f"are all indivisible by {self.size}; use a device count that divides them"
            )

    # ---- what is split ----
    def any_split(self) -> bool:
        """Whether some unit (GroupNorm groups, or heads / feed-forward width of a level with attention) divides."""
        c = self.config
        levels = attention_levels(c)
        counts = (
            [c.norm_num_groups] + [c.heads[i] for i in levels] + [4 * c.block_out_channels[i] for i in levels]
        )
        return any(n % self.size == 0 for n in counts)

    def role(self, module_path: str) -> Optional[str]:
        """The role of a module whose split axis divides evenly; None: replicated."""
        if module_path not in self._roles:
            rule = rule_for(module_path)
            split = (
                rule is not None
                and self.size > 1
                and unit_count(rule[1], module_path, self.config) % self.size == 0
            )
            self._roles[module_path] = rule[0] if split else None
        return self._roles[module_path]

    def param_spec(self, path: str, shape) -> P:
        """PartitionSpec of one parameter (flattened path, shape in the tensor-parallel layout)."""
        module, _, leaf = path.rpartition("/")
        axis = SPLIT_AXIS.get(self.role(module), {}).get(leaf)
        if axis is None:
            return P()
        spec = [None] * len(shape)
        spec[axis] = TENSOR
        return P(*spec)

    def param_shardings(self, params):
        """NamedShardings of a parameter tree already in the tensor-parallel layout (`to_layout`)."""
        flat = {p: NamedSharding(self.mesh, self.param_spec(p, a.shape)) for p, a in flatten(params).items()}
        return unflatten(flat)

    # ---- placement ----
    def place_params(self, params):
        """The parameters in the tensor-parallel layout, split over the mesh (cached for the same leaves)."""
        leaves = jax.tree.leaves(params)
        if (
            self._placed is not None
            and len(leaves) == len(self._placed[0])
            and all(a is b for a, b in zip(leaves, self._placed[0]))
        ):
            return self._placed[1]
        params = to_layout(params)
        placed = jax.device_put(params, self.param_shardings(params))
        self._placed = (leaves, placed)
        return placed

    def place(self, params, *rest):
        """(params, latents, ...) -> params split over the mesh, everything else replicated on it."""
        replicated = NamedSharding(self.mesh, P())
        return (self.place_params(params),) + tuple(jax.device_put(a, replicated) for a in rest)

    # ---- sharding constraints ----
    def constrain(self, x, split_last: bool):
        """Batch over CFG (one guidance branch per half), and the last axis over TENSOR or replicated."""
        spec = (CFG,) + (None,) * (x.ndim - 2) + ((TENSOR,) if split_last else (None,))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec[: x.ndim])))

    def replicated(self, x):
        """x pinned replicated over the whole mesh."""
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P()))

    def intercept(self, next_fun, args, kwargs, context):
        """Flax method interceptor: GEGLU on split halves, and each split layer's output layout.

        Column outputs are pinned split and row outputs replicated, so XLA all-reduces exactly at
        the row layers (to_out_0, net_2, conv2) instead of choosing another layout.
        """
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        role = self.role("/".join(module.path))
        if isinstance(module, GEGLU):
            out = geglu(module, *args)
        else:
            out = next_fun(*args, **kwargs)
        if role in ("column", "geglu"):
            return self.constrain(out, True)
        if role == "row":
            return self.constrain(out, False)
        return out

    def wrap(self, unet) -> "TensorUNet":
        """The UNet (a plain one, parallel=None) run tensor-parallel by this plan."""
        return TensorUNet(unet, self)


def geglu(module: GEGLU, x):
    """GEGLU from its proj in the [D, 2, I] layout: hidden * gelu(gate), each half split alike on I."""
    proj = module.variables["params"]["proj"]
    kernel = proj["kernel"].reshape(proj["kernel"].shape[0], 2, -1).astype(module.dtype)
    bias = proj["bias"].reshape(2, -1).astype(module.dtype)
    y = jnp.einsum("...d,dsi->...si", x.astype(module.dtype), kernel) + bias
    return y[..., 0, :] * nn.gelu(y[..., 1, :], approximate=False)


class TensorUNet:
    """A UNet whose `apply` runs tensor-parallel: inputs batch-split over CFG, parameters pinned to their split.

    Its output is replicated (an all-gather over CFG), so guidance and the scheduler run replicated.
    """

    def __init__(self, unet, plan: TensorPlan):
        self.unet, self.plan = unet, plan

    def apply(self, variables, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None, **kwargs):
        """`unet.apply` with the same arguments (and `mutable`), run under the plan's interceptor."""
        plan = self.plan
        variables = dict(
            variables,
            params=jax.lax.with_sharding_constraint(
                variables["params"], plan.param_shardings(variables["params"])
            ),
        )
        batch = lambda a: plan.constrain(a, False)
        # [x; x] pinned replicated first, so that the CFG split is a local slice (left to itself
        # XLA moved the latents with an all-to-all)
        sample = batch(plan.replicated(sample))
        encoder_hidden_states = batch(encoder_hidden_states)
        added_cond_kwargs = jax.tree.map(batch, added_cond_kwargs)
        with nn.intercept_methods(plan.intercept):
            result = self.unet.apply(
                variables, sample, timesteps, encoder_hidden_states, added_cond_kwargs, **kwargs
            )
        if kwargs.get("mutable"):
            return plan.replicated(result[0]), result[1]
        return plan.replicated(result)
