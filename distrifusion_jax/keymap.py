"""Declarative map between diffusers/PyTorch checkpoint keys and our Flax parameter paths.

A diffusers key such as `down_blocks.1.attentions.0.proj_in.weight` names the Flax parameter
`down_blocks_1/attentions_0/proj_in/kernel`: list containers join their index with "_" (our
submodules are named after the checkpoint paths), and the leaf follows one rule of `LEAF_RULES`,
chosen by the leaf name and the tensor's rank (and, for embedding tables, the parent's name).
transformers' CLIP text encoders follow the same rules (`encoder.layers.N` is a list container).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

import numpy as np

# nn.ModuleList / nn.Sequential attributes of diffusers / transformers models: `name.N` <-> `name_N`.
LIST_CONTAINERS = (
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "transformer_blocks",
    "downsamplers",
    "upsamplers",
    "to_out",
    "net",
    "layers",
)
# Non-parameter buffers some checkpoints carry (transformers < 4.31 saved CLIP's position_ids): not loaded.
IGNORED_LEAVES = ("position_ids",)


class LeafRule(NamedTuple):
    torch_leaf: str  # last component of the checkpoint key
    rank: int  # rank of the checkpoint tensor
    flax_leaf: str  # last component of the Flax path
    perm: Optional[tuple]  # axes permutation torch -> Flax (None: unchanged)
    parent_suffix: Optional[str] = None  # the rule applies only where the parent's name ends with this


LEAF_RULES = (
    # nn.Embedding tables are [num, dim] in both layouts: listed before the linear rule, which would transpose
    LeafRule("weight", 2, "embedding", None, "_embedding"),
    LeafRule("weight", 4, "kernel", (2, 3, 1, 0)),  # conv: OIHW -> HWIO
    LeafRule("weight", 2, "kernel", (1, 0)),  # linear: [out, in] -> [in, out]
    LeafRule("weight", 1, "scale", None),  # GroupNorm / LayerNorm
    LeafRule("bias", 1, "bias", None),
)

_TO_FLAX = re.compile(r"\b(" + "|".join(LIST_CONTAINERS) + r")\.(\d+)\b")
_TO_TORCH = re.compile(r"\b(" + "|".join(LIST_CONTAINERS) + r")_(\d+)\b")


def _inverse(perm):
    return None if perm is None else tuple(int(i) for i in np.argsort(perm))


def _parent_ok(rule: LeafRule, prefix: str) -> bool:
    return rule.parent_suffix is None or prefix.endswith(rule.parent_suffix)


def is_ignored(key: str) -> bool:
    """True for checkpoint entries that are buffers, not parameters (see IGNORED_LEAVES)."""
    return key.rpartition(".")[2] in IGNORED_LEAVES


def torch_to_flax(key: str, shape: tuple) -> tuple[str, tuple, Optional[tuple]]:
    """(checkpoint key, its shape) -> (Flax path "a/b/c", Flax shape, permutation to apply)."""
    prefix, _, leaf = key.rpartition(".")
    for rule in LEAF_RULES:
        if rule.torch_leaf == leaf and rule.rank == len(shape) and _parent_ok(rule, prefix):
            path = _TO_FLAX.sub(r"\1_\2", prefix).replace(".", "/") + "/" + rule.flax_leaf
            new_shape = tuple(shape[i] for i in rule.perm) if rule.perm else tuple(shape)
            return path, new_shape, rule.perm
    return "<unmapped>/" + key, tuple(shape), None


def flax_to_torch(path: str, shape: tuple) -> tuple[str, tuple, Optional[tuple]]:
    """(Flax path, its shape) -> (checkpoint key, checkpoint shape, permutation to apply)."""
    prefix, _, leaf = path.rpartition("/")
    for rule in LEAF_RULES:
        if rule.flax_leaf == leaf and rule.rank == len(shape) and _parent_ok(rule, prefix):
            key = _TO_TORCH.sub(r"\1.\2", prefix.replace("/", ".")) + "." + rule.torch_leaf
            inv = _inverse(rule.perm)
            return key, (tuple(shape[i] for i in inv) if inv else tuple(shape)), inv
    raise KeyError(f"no rule maps Flax parameter {path} of shape {shape}")


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dict -> {"a/b/c": leaf}."""
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(flatten(v, p))
        else:
            out[p] = v
    return out


def unflatten(flat: dict) -> dict:
    """{"a/b/c": leaf} -> nested dict."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree
