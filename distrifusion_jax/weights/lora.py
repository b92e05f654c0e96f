"""LoRA adapters: kohya or diffusers/peft safetensors files read, mapped onto our Flax parameters, fused and unfused.

A LoRA adds `scale * alpha / rank * (up @ down)` to a linear or conv layer's weight (torch layout: up [out, rank],
down [rank, in], or for convs, kohya's LoCon, up [out, rank, 1, 1] and down [rank, in, kh, kw]). Module names are
diffusers' / transformers' module paths, dotted (diffusers, peft) or with every dot an underscore (kohya, which
names SDXL's UNet in the original sgm layout: `input_blocks_4_1_...`). Each is resolved against the modules our
parameter trees have (`keymap.flax_to_torch` of every kernel), then mapped to its Flax path and layout by the
loaders' own key maps, so a LoRA reaches every linear and conv layer with the transposes the weights get.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from .. import keymap
from ..config import read_json
from ..errors import CheckpointError
from ..models import UNet2DConditionModel
from ..models.clip import CLIPTextConfig, text_encoder_class
from ..models.unet import UNetConfig
from .clip import text_encoder_key_map
from .files import PICKLE_SUFFIXES, param_shapes, read_safetensors
from .original_layout import Table, unet_rules

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
LORA_COMPONENTS = COMPONENTS  # the models a LoRA may adapt
# kohya's prefixes: `lora_te_` is SD 1.x / 2.x's one text encoder
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
KOHYA_LEAVES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# diffusers / peft leaves: peft's lora_A / lora_B (with an optional adapter name), diffusers' older spellings
DIFFUSERS_LEAF = re.compile(
    r"^(?P<module>.+?)(?:\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight"
    r"|(?:\.lora|\.lora_linear_layer|(?<=_lora))\.(?P<du>down|up)\.weight|\.(?P<alpha>alpha))$"
)
# diffusers' older attention-processor LoRAs name the projection after the processor's attribute:
# UNet `attn1.processor.to_q_lora` adapts `attn1.to_q`, text encoder `self_attn.to_q_lora` adapts `self_attn.q_proj`
PROCESSOR_NAMES = (
    (re.compile(r"\.processor\.(to_[qkv])_lora$"), r".\1"),
    (re.compile(r"\.processor\.to_out_lora$"), ".to_out.0"),
    (re.compile(r"\.self_attn\.to_([qkv]|out)_lora$"), r".self_attn.\1_proj"),
)
# what we read but cannot fuse as W + up @ down: a one-line refusal naming it
UNSUPPORTED = {
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "lora_mid": "LoCon's Tucker core (lora_mid)",
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "lora_B.bias": "a LoRA bias (lora_B.bias)",
}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights: each component's peft LoraConfig


class LoraModule(NamedTuple):
    """One adapted layer: the component, the module as the file names it (`dotted`: a diffusers / transformers
    path; else kohya's underscored name), the file's key prefix, the factors (float32) and alpha (None: rank)."""

    component: str
    module: str
    dotted: bool
    key: str
    down: np.ndarray  # [rank, in] or [rank, in, kh, kw]
    up: np.ndarray  # [out, rank] or [out, rank, 1, 1]
    alpha: Optional[float]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def torch_shape(self) -> tuple:
        """The shape of the weight this LoRA adapts, in torch layout: [out, in] or [out, in, kh, kw]."""
        return (int(self.up.shape[0]),) + tuple(int(d) for d in self.down.shape[1:])

    def delta(self, scale: float = 1.0) -> np.ndarray:
        """scale * (alpha / rank) * up @ down in the layer's torch layout ([out, in] or OIHW), float32."""
        out, rank = self.up.shape[:2]
        product = self.up.reshape(out, rank) @ self.down.reshape(rank, -1)
        alpha = self.rank if self.alpha is None else self.alpha
        return (product * np.float32(scale * alpha / self.rank)).reshape(self.torch_shape)


class LoraAdapter(NamedTuple):
    """A parsed LoRA file: its path, format ("kohya", "diffusers" or both) and modules."""

    path: str
    format: str
    modules: tuple


# ---- reading ----
def _fmt(items: list, limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _check_file(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle LoRA files are never unpickled here; use the adapter's .safetensors file "
            "(or re-save it with safetensors)"
        )
    if not path.is_file():
        raise CheckpointError(f"LoRA file {path} does not exist")


def _metadata(path: Path) -> dict:
    """diffusers' per-component LoraConfig fields ({"unet.lora_alpha": 8, ...}), or {}."""
    try:
        with safe_open(str(path), framework="np") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a safetensors file, or truncated ({e}); LoRAs are read from .safetensors files only"
        ) from None
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: unreadable {METADATA_KEY} metadata; re-save the LoRA") from None


def _classify(key: str):
    """(component, module, dotted, role, the key's module prefix) of one file key, role "down", "up" or "alpha";
    None for a key in neither naming."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            name, _, leaf = key.partition(".")
            role = KOHYA_LEAVES.get(leaf)
            return (component, name[len(prefix) :], False, role, name) if role else None
    m = DIFFUSERS_LEAF.match(key)
    if m is None:
        return None
    component, _, module = m["module"].partition(".")
    if component not in COMPONENTS:  # a bare peft state dict of the UNet
        component, module = "unet", m["module"]
    for pattern, name in PROCESSOR_NAMES:
        module = pattern.sub(name, module)
    role = "alpha" if m["alpha"] else m["du"] or {"A": "down", "B": "up"}[m["ab"]]
    return component, module, True, role, m["module"]


def _metadata_alpha(metadata: dict, component: str, module: str) -> Optional[float]:
    """alpha from diffusers' saved LoraConfig (alpha_pattern by module-name suffix, else lora_alpha)."""
    for name, value in (metadata.get(f"{component}.alpha_pattern") or {}).items():
        name = name.lstrip("^")
        if module == name or module.endswith("." + name):
            return float(value)
    alpha = metadata.get(f"{component}.lora_alpha")
    return None if alpha is None else float(alpha)


def read_lora(path) -> LoraAdapter:
    """Read a LoRA safetensors file (kohya's `lora_unet_*` / `lora_te1_*` / `lora_te2_*` keys, or diffusers' /
    peft's `unet.` / `text_encoder.` / `text_encoder_2.` keys with lora_A/B or lora.down/up) into a LoraAdapter.

    Pickles are refused; DoRA, LoHa, LoKr and Tucker (lora_mid) adapters, unknown keys and modules missing a
    factor are one-line CheckpointErrors. Module names are resolved against a model only by `fuse_lora`.
    """
    path = Path(os.fspath(path)).expanduser()
    _check_file(path)
    metadata = _metadata(path)
    groups, unknown, kinds = {}, [], set()
    for key, array in read_safetensors([path]):
        refused = [name for part, name in UNSUPPORTED.items() if part in key]
        if refused:
            raise CheckpointError(
                f"{path}: {refused[0]} is not supported ({key}); use a plain LoRA (or LoCon) adapter"
            )
        found = _classify(key)
        if found is None:
            unknown.append(key)
            continue
        component, module, dotted, role, prefix = found
        kinds.add("diffusers" if dotted else "kohya")
        group = groups.setdefault((component, module, dotted), {"key": prefix})
        group[role] = float(np.reshape(array, -1)[0]) if role == "alpha" else np.asarray(array, np.float32)
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} key(s) are not LoRA weights in kohya's or diffusers' naming "
            f"[{_fmt(sorted(unknown))}]; pass a LoRA .safetensors file for SDXL"
        )
    if not groups:
        raise CheckpointError(f"{path}: no LoRA weights in this file")
    incomplete = sorted(g["key"] for g in groups.values() if "down" not in g or "up" not in g)
    if incomplete:
        raise CheckpointError(
            f"{path}: module(s) without both a down and an up factor [{_fmt(incomplete)}]; the file is incomplete"
        )
    modules = []
    for (component, module, dotted), g in sorted(groups.items()):
        alpha = g.get("alpha")
        if alpha is None and dotted:
            alpha = _metadata_alpha(metadata, component, module)
        if alpha is not None and metadata.get(f"{component}.use_rslora"):
            alpha *= float(np.sqrt(g["down"].shape[0]))  # rsLoRA scales by alpha / sqrt(rank)
        modules.append(LoraModule(component, module, dotted, g["key"], g["down"], g["up"], alpha))
    return LoraAdapter(str(path), "+".join(sorted(kinds)), tuple(modules))


# ---- resolving module names against a model ----
class _Levels(NamedTuple):
    """The fields of a UNetConfig that `unet_rules` reads, read off a UNet's parameter tree."""

    down_block_types: tuple
    up_block_types: tuple
    layers_per_block: tuple

    @property
    def num_levels(self) -> int:
        return len(self.down_block_types)


def _count(flat: dict, prefix: str) -> int:
    found = [re.match(re.escape(prefix) + r"(\d+)/", p) for p in flat]
    return 1 + max((int(m[1]) for m in found if m), default=-1)


def _levels(flat: dict) -> _Levels:
    def kind(block, name):
        return ("CrossAttn" if any(p.startswith(block + "/attentions_") for p in flat) else "") + name

    down = [f"down_blocks_{i}" for i in range(_count(flat, "down_blocks_"))]
    up = [f"up_blocks_{i}" for i in range(_count(flat, "up_blocks_"))]
    return _Levels(
        tuple(kind(b, "DownBlock2D") for b in down),
        tuple(kind(b, "UpBlock2D") for b in up),
        tuple(_count(flat, b + "/resnets_") for b in down),
    )


def _layers(flat: dict) -> dict:
    """{torch module path: torch weight shape} of every linear and conv layer of a flat Flax tree."""
    layers = {}
    for path, leaf in flat.items():
        if path.endswith("/kernel"):
            key, shape, _ = keymap.flax_to_torch(path, tuple(leaf.shape))
            layers[key.removesuffix(".weight")] = shape
    return layers


def _kohya_names(component: str, layers: dict, flat: dict) -> dict:
    """kohya's underscored module names -> torch module paths: the diffusers / transformers paths, and for the
    UNet also the original sgm layout's (SDXL kohya LoRAs), through the single-file rule table."""
    names = {}
    for module in layers:
        names[module.replace(".", "_")] = module
        if component != "unet":  # text encoders saved without transformers' `text_model.` wrapper
            names.setdefault(module.removeprefix("text_model.").replace(".", "_"), module)
    if component == "unet":
        table = Table(unet_rules(_levels(flat)))
        for module in layers:
            found = table.to_original(module + ".weight")
            if found is not None:
                names.setdefault(found[0].removesuffix(".weight").replace(".", "_"), module)
    return names


def _module_path(component: str, lora: LoraModule, kohya: dict) -> Optional[str]:
    if not lora.dotted:
        return kohya.get(lora.module)
    if component != "unet" and not lora.module.startswith(("text_model.", "text_projection")):
        return "text_model." + lora.module  # as the text encoders' loader reads transformers 5 checkpoints
    return lora.module


def _flax_target(component: str, module: str, torch_shape: tuple):
    """(Flax path, Flax shape, permutation torch -> Flax) of a module's weight, by the loaders' key maps."""
    key_map = keymap.torch_to_flax if component == "unet" else text_encoder_key_map
    return key_map(module + ".weight", torch_shape)


def plan_lora(params_by_component: dict, adapter: LoraAdapter) -> dict:
    """{component: [(Flax kernel path, permutation, LoraModule)]}: where each module of `adapter` goes in
    `params_by_component` ({"unet": tree, "text_encoder": tree, ...}). Modules that fit no layer, rank
    mismatches and shapes the layer does not have are listed together in one CheckpointError."""
    missing = sorted({m.component for m in adapter.modules} - set(params_by_component))
    if missing:
        raise CheckpointError(
            f"{adapter.path}: the LoRA adapts {', '.join(missing)}, which this model does not have (or was "
            "not given): use a LoRA made for this model"
        )
    plan, unmatched, mismatched = {}, [], []
    for component in sorted({m.component for m in adapter.modules}):
        flat = keymap.flatten(params_by_component[component])
        layers = _layers(flat)
        kohya = _kohya_names(component, layers, flat)
        for lora in (m for m in adapter.modules if m.component == component):
            module = _module_path(component, lora, kohya)
            if module not in layers:
                unmatched.append(lora.key)
                continue
            problem = _shape_problem(lora, layers[module])
            if problem:
                mismatched.append(f"{lora.key}: {problem}")
                continue
            path, _, perm = _flax_target(component, module, lora.torch_shape)
            plan.setdefault(component, []).append((path, perm, lora))
    if unmatched or mismatched:
        parts = [f"{len(unmatched)} module(s) match no layer [{_fmt(unmatched)}]"] if unmatched else []
        parts += [f"{len(mismatched)} shape mismatch(es) [{_fmt(mismatched, 4)}]"] if mismatched else []
        raise CheckpointError(
            f"{adapter.path} does not fit this model: {'; '.join(parts)}; the LoRA is for another base model "
            "(e.g. SD 1.5 vs SDXL) or damaged: use one trained for this model"
        )
    return plan


def _shape_problem(lora: LoraModule, layer_shape: tuple) -> Optional[str]:
    down, up = lora.down.shape, lora.up.shape
    if len(up) not in (2, 4) or len(down) != len(up) or up[1] != down[0] or up[2:] not in ((), (1, 1)):
        return f"down {list(down)} and up {list(up)} do not compose (rank mismatch)"
    if lora.torch_shape != tuple(layer_shape):
        return f"LoRA {list(lora.torch_shape)} vs layer {list(layer_shape)}"
    return None


# ---- fusing ----
def _host(leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if not leaf.sharding.is_fully_replicated:
            raise CheckpointError(
                "LoRAs are fused into replicated parameters only; fuse before sharding them"
            )
        return np.asarray(leaf.addressable_data(0))  # every process holds the whole replicated array
    return np.asarray(leaf)


def _like(value: np.ndarray, leaf):
    """`value` placed as `leaf` is: a jax array with its sharding, or a host array."""
    return jax.device_put(value, leaf.sharding) if isinstance(leaf, jax.Array) else value


def fuse_lora(
    params_by_component: dict, adapter: LoraAdapter, scale: float = 1.0, undo: Optional[dict] = None
):
    """Fuse a LoRA into parameter trees: W' = W + scale * (alpha / rank) * up @ down, in float32, cast back to
    each parameter's dtype and placed where it was.

    `params_by_component` maps "unet", "text_encoder", "text_encoder_2" to nested parameter dicts (jax or
    numpy leaves). Returns `(params_by_component, undo)`: new trees (untouched components and leaves are the
    same objects) and {component: {Flax path: the leaf before fusing}}, only the leaves changed. Pass the
    `undo` of an earlier fuse to fuse another adapter on top: it keeps each leaf's first original, so one
    `unfuse_lora(params, undo)` gives back the weights before any of them, bit for bit.
    """
    plan = plan_lora(params_by_component, adapter)
    undo = {c: dict(v) for c, v in (undo or {}).items()}
    out = dict(params_by_component)
    for component, targets in plan.items():
        flat = keymap.flatten(params_by_component[component])
        deltas = {}
        for path, perm, lora in targets:
            delta = lora.delta(scale)
            delta = delta.transpose(perm) if perm else delta
            deltas[path] = deltas[path] + delta if path in deltas else delta
        saved = undo.setdefault(component, {})
        for path, delta in deltas.items():
            leaf = flat[path]
            saved.setdefault(path, leaf)
            fused = (_host(leaf).astype(np.float32) + delta).astype(leaf.dtype)
            flat[path] = _like(fused, leaf)
        out[component] = keymap.unflatten(flat)
    return out, undo


def unfuse_lora(params_by_component: dict, undo: dict) -> dict:
    """The trees with the leaves `fuse_lora` changed put back (the original objects: bit for bit)."""
    out = dict(params_by_component)
    for component, saved in undo.items():
        flat = keymap.flatten(params_by_component[component])
        stray = sorted(set(saved) - set(flat))
        if stray:
            raise CheckpointError(
                f"cannot unfuse: {component} has no parameter {_fmt(stray, 3)}; unfuse with the undo of these params"
            )
        flat.update(saved)
        out[component] = keymap.unflatten(flat)
    return out


# ---- before loading: does a LoRA fit a pipeline folder's models? ----
def abstract_trees(root) -> dict:
    """{"unet" | "text_encoder" | "text_encoder_2": parameter tree of ShapeDtypeStructs} of a pipeline folder's
    models, from their configs (shapes cached: `files.param_shapes`), for `plan_lora` before any weight loads."""
    root = Path(root)
    models = {"unet": UNet2DConditionModel(UNetConfig.from_json(root / "unet" / "config.json"))}
    for name in ("text_encoder", "text_encoder_2"):
        if not (root / name / "config.json").is_file():  # SD 1.x / 2.x and the refiner have one encoder
            continue
        raw = read_json(root / name / "config.json")
        models[name] = text_encoder_class(raw)(CLIPTextConfig.from_dict(raw))
    return {
        name: keymap.unflatten({k: jax.ShapeDtypeStruct(s, np.float32) for k, s in param_shapes(m).items()})
        for name, m in models.items()
    }


def parse_lora_arg(value: str) -> tuple:
    """`PATH[:SCALE]` -> (path, scale): a trailing `:number` is the scale (default 1.0); any other colon (a
    Windows drive, a folder name) stays part of the path."""
    path, sep, tail = str(value).rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return str(value), 1.0
