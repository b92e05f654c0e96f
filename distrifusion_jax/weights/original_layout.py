"""Rule tables between the original single-file layout of SD / SDXL checkpoints and diffusers' key names.

A single file (`sd_xl_base_1.0.safetensors`, `v1-5-pruned-emaonly.safetensors`, a fine-tune of either)
holds every model under a prefix (`model.diffusion_model.` the UNet, `first_stage_model.` the VAE, ...),
in the module naming of the original code (Stability AI's `sgm`, CompVis' `ldm`, OpenCLIP). Each
component's table is data: `Module` rules rename a module prefix (and named submodules inside it),
`Tensor` rules rename one whole key (splitting a fused tensor into parts, or transposing it), `Skip` rules
name what the diffusers model does not hold (SD 2.x's last OpenCLIP layer and projection). The tables are
generated from the component's config (`component_rules`), since block indices follow from the number of
levels, the layers per level and which levels have attention, and an OpenCLIP tower's skipped layer from
its depth. The result is diffusers' (UNet, VAE) or transformers' (CLIP) key naming, which `keymap` then
maps to our Flax paths.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import NamedTuple, Optional

import numpy as np

from ..models.clip import CLIPTextConfig, CLIPTextModelWithProjection, text_encoder_class
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig

_NONE = MappingProxyType({})


class Module(NamedTuple):
    """Keys under `original.` are those under `diffusers.`, with the submodules in `inner` renamed."""

    original: str
    diffusers: str
    inner: MappingProxyType = _NONE


class Tensor(NamedTuple):
    """The key `original` is `diffusers` (one key), or a tensor fused along axis 0 from several (in order)."""

    original: str
    diffusers: tuple
    transpose: bool = False


class Skip(NamedTuple):
    """The key `original`, or every key under the module `original.`, is in the file but not in the model."""

    original: str


class Target(NamedTuple):
    """Where one original tensor goes: `key`, from part `part` of `parts` along axis 0, transposed or not."""

    key: str
    part: int = 0
    parts: int = 1
    transpose: bool = False


# ---- which component lives under which prefix, per layout ----
# sgm (SDXL) and ldm (SD 1.x / 2.x) single files; `detect_layout` tells them apart by these prefixes.
LAYOUTS = {
    "sdxl": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
    "sd1": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.transformer.",
    },
    "sd2": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.model.",
    },
}
# The published config each layout defaults to (bundled under distrifusion_jax/configs/). SD 2.x's base
# (512, epsilon) and 768 (v-prediction) models have the same keys and shapes: like diffusers, a 2.x file is
# taken for the 768 v-prediction model unless told otherwise (config "sd-2.1-base").
DEFAULT_CONFIGS = {"sdxl": "sdxl-base-1.0", "sd1": "sd-1.5", "sd2": "sd-2.1"}
# SD 2.x conditions on the penultimate layer of OpenCLIP ViT-H: diffusers' text encoder keeps 23 of the 24
# layers, so the file's layers after the config's depth (this many) are skipped.
DROPPED_LAYERS = {("sd2", "text_encoder"): 1}
# Entries that are not model parameters, skipped wherever they appear: the DDPM schedule buffers, the EMA
# copy of the UNet (the trained weights are read, as diffusers does by default), CLIP's position ids and
# OpenCLIP's contrastive temperature, the VAE's training loss (LPIPS, discriminator).
IGNORED = re.compile(
    r"^(?:betas|alphas_cumprod(?:_prev)?|sqrt_(?:one_minus_|recip_|recipm1_)?alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|posterior_(?:variance|log_variance_clipped|mean_coef[12])|logvar"
    r"|model_ema\..*|first_stage_model\.loss\..*|.*\.position_ids|.*logit_scale)$"
)

# ---- submodule renames inside one block ----
UNET_RESNET = MappingProxyType(
    {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut",
    }
)
VAE_RESNET = MappingProxyType({"nin_shortcut": "conv_shortcut"})
# q/k/v/proj_out are 1x1 convs here; the VAE's key map reads them as linear weights
VAE_ATTENTION = MappingProxyType(
    {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
)
OPENCLIP_LAYER = MappingProxyType(
    {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
)

# ---- the component tables ----
UNET_FIXED = (
    Module("time_embed.0", "time_embedding.linear_1"),
    Module("time_embed.2", "time_embedding.linear_2"),
    Module("label_emb.0.0", "add_embedding.linear_1"),  # SDXL's text_time micro-conditioning
    Module("label_emb.0.2", "add_embedding.linear_2"),
    Module("input_blocks.0.0", "conv_in"),
    Module("middle_block.0", "mid_block.resnets.0", UNET_RESNET),
    Module("middle_block.1", "mid_block.attentions.0"),
    Module("middle_block.2", "mid_block.resnets.1", UNET_RESNET),
    Module("out.0", "conv_norm_out"),
    Module("out.2", "conv_out"),
)
# transformers' CLIP naming already, after the prefix
CLIP_RULES = (Module("text_model", "text_model"),)
# OpenCLIP's text tower: fused q/k/v projections, the projection stored as [width, dim] (x @ P)
OPENCLIP_LAYERS = "text_model.encoder.layers.{i}"
OPENCLIP_PROJECTION = Tensor("text_projection", ("text_projection.weight",), transpose=True)
OPENCLIP_TOWER = (
    Tensor("positional_embedding", ("text_model.embeddings.position_embedding.weight",)),
    Tensor("token_embedding.weight", ("text_model.embeddings.token_embedding.weight",)),
    Tensor(
        "transformer.resblocks.{i}.attn.in_proj_{leaf}",
        tuple(f"{OPENCLIP_LAYERS}.self_attn.{p}_proj.{{leaf}}" for p in "qkv"),
    ),
    Module("transformer.resblocks.{i}", OPENCLIP_LAYERS, OPENCLIP_LAYER),
    Module("ln_final", "text_model.final_layer_norm"),
)


def openclip_rules(layers: Optional[int] = None, projection: bool = True, dropped: int = 0) -> tuple:
    """OpenCLIP's text tower: with its projection (CLIPTextModelWithProjection: SDXL's bigG) or skipping it
    (CLIPTextModel: SD 2.x's ViT-H), and skipping the `dropped` layers after the first `layers`."""
    last = () if layers is None else range(layers, layers + dropped)
    skips = tuple(Skip(f"transformer.resblocks.{i}") for i in last)
    return skips + (OPENCLIP_PROJECTION if projection else Skip("text_projection"),) + OPENCLIP_TOWER


OPENCLIP_RULES = openclip_rules()  # SDXL's text_encoder_2


def has_attention(block_type: str) -> bool:
    return block_type.startswith("CrossAttn")


def unet_rules(config: UNetConfig) -> tuple:
    """The UNet's table: `input_blocks.N.M` / `output_blocks.N.M` numbered as the original UNet builds them
    (per level: its resnets, each followed by its attention, then the level's down/upsampler)."""
    rules, n = list(UNET_FIXED), 1
    for i, (kind, layers) in enumerate(zip(config.down_block_types, config.layers_per_block)):
        for j in range(layers):
            rules.append(Module(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", UNET_RESNET))
            if has_attention(kind):
                rules.append(Module(f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}"))
            n += 1
        if i < config.num_levels - 1:
            rules.append(Module(f"input_blocks.{n}.0.op", f"down_blocks.{i}.downsamplers.0.conv"))
            n += 1
    n = 0
    up_layers = tuple(reversed(config.layers_per_block))
    for u, (kind, layers) in enumerate(zip(config.up_block_types, up_layers)):
        for j in range(layers + 1):
            rules.append(Module(f"output_blocks.{n}.0", f"up_blocks.{u}.resnets.{j}", UNET_RESNET))
            if has_attention(kind):
                rules.append(Module(f"output_blocks.{n}.1", f"up_blocks.{u}.attentions.{j}"))
            if j == layers and u < config.num_levels - 1:
                at = 2 if has_attention(kind) else 1
                rules.append(Module(f"output_blocks.{n}.{at}.conv", f"up_blocks.{u}.upsamplers.0.conv"))
            n += 1
    return tuple(rules)


def vae_rules(config: VAEConfig) -> tuple:
    """The VAE's table: the decoder's `up.B` counts from the lowest resolution's opposite end (up_blocks.L-1-B)."""
    rules = [Module(name, name) for name in ("quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rules += [
            Module(f"{part}.conv_in", f"{part}.conv_in"),
            Module(f"{part}.conv_out", f"{part}.conv_out"),
            Module(f"{part}.norm_out", f"{part}.conv_norm_out"),
            Module(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET),
            Module(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET),
            Module(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION),
        ]
    levels = config.num_levels
    rules += [
        Module("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET),
        Module("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv"),
    ]
    for b in range(levels):
        u = levels - 1 - b
        rules += [
            Module(f"decoder.up.{b}.block.{{j}}", f"decoder.up_blocks.{u}.resnets.{{j}}", VAE_RESNET),
            Module(f"decoder.up.{b}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv"),
        ]
    return tuple(rules)


def component_rules(name: str, layout: str, raw: dict, derive: bool = False) -> tuple:
    """The table of the model `name` of a layout, from its config dict `raw` (a diffusers / transformers
    config.json). With `derive`, a text encoder's table skips no layer, so its depth can be read off the keys."""
    if name == "unet":
        return unet_rules(UNetConfig.from_dict(raw))
    if name == "vae":
        return vae_rules(VAEConfig.from_dict(raw))
    if not LAYOUTS[layout][name].endswith(".model."):
        return CLIP_RULES
    config, projection = CLIPTextConfig.from_dict(raw), text_encoder_class(raw) is CLIPTextModelWithProjection
    dropped = DROPPED_LAYERS.get((layout, name), 0)
    return openclip_rules(None if derive else config.num_hidden_layers, projection or derive, dropped)


# ---- applying a table ----
_FIELDS = {"i": r"\d+", "j": r"\d+", "leaf": r"weight|bias"}


def _pattern(template: str) -> str:
    """A template with `{i}`, `{j}` (indices) and `{leaf}` (weight or bias) fields as a regex."""
    parts = re.split(r"\{(\w+)\}", template)
    return "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})" for k, p in enumerate(parts))


class Table:
    """One component's rules, compiled for both directions: `to_diffusers` (reading a single file) and
    `to_original` (writing one, for tests and round trips)."""

    def __init__(self, rules):
        self.rules = tuple(rules)
        self._skips = [re.compile(_pattern(r.original) + r"(?:\..+)?$") for r in rules if isinstance(r, Skip)]
        self._modules = [
            (re.compile(_pattern(r.original) + r"\."), r) for r in rules if isinstance(r, Module)
        ]
        self._tensors = [(re.compile(_pattern(r.original) + "$"), r) for r in rules if isinstance(r, Tensor)]
        self._modules_back = [
            (re.compile(_pattern(r.diffusers) + r"\."), r) for r in rules if isinstance(r, Module)
        ]
        self._tensors_back = [
            (re.compile(_pattern(t) + "$"), r, k)
            for r in rules
            if isinstance(r, Tensor)
            for k, t in enumerate(r.diffusers)
        ]

    def to_diffusers(self, key: str) -> Optional[list]:
        """The `Target`s of one original key (without its component prefix): none for a skipped key, None
        when no rule matches."""
        if any(p.match(key) for p in self._skips):
            return []
        for pattern, rule in self._tensors:
            m = pattern.match(key)
            if m:
                n = len(rule.diffusers)
                return [
                    Target(t.format(**m.groupdict()), k, n, rule.transpose)
                    for k, t in enumerate(rule.diffusers)
                ]
        found = _longest(self._modules, key)
        if found is None:
            return None
        m, rule = found
        return [Target(rule.diffusers.format(**m.groupdict()) + "." + _rename(key[m.end() :], rule.inner))]

    def to_original(self, key: str) -> Optional[tuple]:
        """(original key, part, parts, transpose) for one diffusers key, or None when no rule matches."""
        for pattern, rule, k in self._tensors_back:
            m = pattern.match(key)
            if m:
                return rule.original.format(**m.groupdict()), k, len(rule.diffusers), rule.transpose
        found = _longest(self._modules_back, key)
        if found is None:
            return None
        m, rule = found
        inner = {v: k for k, v in rule.inner.items()}
        return rule.original.format(**m.groupdict()) + "." + _rename(key[m.end() :], inner), 0, 1, False


def _longest(patterns, key: str):
    """(match, rule) of the module rule matching the longest prefix of `key`, or None."""
    best = None
    for pattern, rule in patterns:
        m = pattern.match(key)
        if m and (best is None or m.end() > best[0].end()):
            best = (m, rule)
    return best


def _rename(rest: str, inner) -> str:
    """`rest` (a key inside a module) with its leading submodule renamed by `inner` (longest name first)."""
    for name in sorted(inner, key=len, reverse=True):
        if rest.startswith(name + "."):
            return inner[name] + rest[len(name) :]
    return rest


def take(array: np.ndarray, target: Target) -> np.ndarray:
    """The part of an original tensor that `target` names, in diffusers' orientation."""
    if target.parts > 1:
        array = np.split(array, target.parts, axis=0)[target.part]
    return array.T if target.transpose else array


def target_shape(shape: tuple, target: Target) -> tuple:
    """The shape `take` gives for an original tensor of `shape` (from the header alone)."""
    shape = (shape[0] // target.parts,) + tuple(shape[1:])
    return tuple(reversed(shape)) if target.transpose else shape


def original_state(table: Table, tensors: dict, prefix: str = "") -> dict:
    """{original key: array} from diffusers-named {key: array} (fused parts concatenated, transposes undone);
    the inverse of reading with `table`. KeyError for a key no rule maps."""
    out, fused = {}, {}
    for key, value in tensors.items():
        found = table.to_original(key)
        if found is None:
            raise KeyError(f"no rule maps {key} to the original layout")
        name, part, parts, transpose = found
        value = np.ascontiguousarray(np.asarray(value).T if transpose else value)  # writers store the buffer
        if parts == 1:
            out[prefix + name] = value
        else:
            fused.setdefault(name, [None] * parts)[part] = value
    for name, values in fused.items():
        out[prefix + name] = np.concatenate(values, axis=0)
    return out
