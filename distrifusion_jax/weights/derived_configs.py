"""Configs of a single file's models that its bundled config leaves out, derived from the file's tensor shapes."""

from __future__ import annotations

import re

from ..errors import CheckpointError

# A bundled config that names only a UNet (a test's, or one written for a fine-tune) still converts a whole file:
# its VAE and text encoder take the layout's published config as a template, with every size the tensors show
# put in. What no shape shows stays the template's: the activation, the VAE's GroupNorm groups and scaling
# factor; the head count follows from the width, CLIP ViT-L/14, OpenCLIP ViT-H/14 and bigG all using 64-wide heads.
HEAD_WIDTH = 64
WITH_PROJECTION = ["CLIPTextModelWithProjection"]


def _indices(shapes: dict, pattern: str) -> list:
    """The sorted distinct integers `pattern`'s one group matches at the start of the keys of `shapes`."""
    found = (re.match(pattern, k) for k in shapes)
    return sorted({int(m[1]) for m in found if m})


def text_encoder_config(template: dict, shapes: dict, dropped: int, where: str) -> dict:
    """`template` with the sizes of the text encoder whose {transformers key: shape} are `shapes`: vocabulary and
    width (token embedding), positions, depth (its layers less the `dropped` ones the model skips), MLP width,
    heads (width / 64) and, for a model with a projection, its width."""
    out = dict(template)
    token = shapes.get("text_model.embeddings.token_embedding.weight")
    if token:
        out["vocab_size"], out["hidden_size"] = token
        if token[1] % HEAD_WIDTH:
            raise CheckpointError(
                f"{where}: a text encoder {token[1]} wide, so its head count cannot be derived ({HEAD_WIDTH}-wide "
                "heads); pass --config / config= naming a bundled config with its text encoder"
            )
        out["num_attention_heads"] = token[1] // HEAD_WIDTH
    positions = shapes.get("text_model.embeddings.position_embedding.weight")
    if positions:
        out["max_position_embeddings"] = positions[0]
    layers = _indices(shapes, r"text_model\.encoder\.layers\.(\d+)\.")
    if len(layers) > dropped:
        out["num_hidden_layers"] = max(layers) + 1 - dropped
    fc1 = shapes.get("text_model.encoder.layers.0.mlp.fc1.weight")
    if fc1:
        out["intermediate_size"] = fc1[0]
    projection = shapes.get("text_projection.weight")
    if projection and template.get("architectures") == WITH_PROJECTION:
        out["projection_dim"] = projection[0]
    return out


def vae_config(template: dict, shapes: dict) -> dict:
    """`template` with the sizes of the VAE whose {diffusers key: shape} are `shapes`: levels and their channels
    (the encoder's resnets), resnets per level, image and latent channels."""
    out = dict(template)
    levels = _indices(shapes, r"encoder\.down_blocks\.(\d+)\.")
    channels = [shapes.get(f"encoder.down_blocks.{i}.resnets.0.conv2.weight") for i in levels]
    if levels and all(channels):
        out["block_out_channels"] = [c[0] for c in channels]
        out["down_block_types"] = template["down_block_types"][:1] * len(levels)
        out["up_block_types"] = template["up_block_types"][:1] * len(levels)
    resnets = _indices(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    if resnets:
        out["layers_per_block"] = len(resnets)
    for field, key, axis in (
        ("in_channels", "encoder.conv_in.weight", 1),
        ("out_channels", "decoder.conv_out.weight", 0),
        ("latent_channels", "post_quant_conv.weight", 0),
    ):
        if key in shapes:
            out[field] = shapes[key][axis]
    return out


def derive_config(name: str, template: dict, shapes: dict, dropped: int, where: str) -> dict:
    """The config of the model `name` ("vae" or a text encoder) from its published `template` and the shapes of
    its tensors in diffusers' / transformers' naming; `where` names it in errors."""
    if name == "vae":
        return vae_config(template, shapes)
    return text_encoder_config(template, shapes, dropped, where)
