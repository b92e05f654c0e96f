"""Flax CLIP text encoders (SDXL's `text_encoder` and `text_encoder_2`), equal to transformers' PyTorch models."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import read_json
from ..errors import ConfigError, DistriFusionError


def quick_gelu(x):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names -> the same functions ("gelu" is the exact erf form there).
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# config.json fields that describe the checkpoint, tokenizer or training, never the inference forward.
_IGNORED_FIELDS = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "bos_token_id",
        "pad_token_id",
        "initializer_range",
        "initializer_factor",
        "dropout",
        "attention_dropout",
        "hidden_dropout",
        # generic PretrainedConfig fields that older transformers versions wrote into every config.json
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "tie_word_embeddings",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "add_cross_attention",
        "tie_encoder_decoder",
        "cross_attention_hidden_size",
        "id2label",
        "label2id",
        "problem_type",
        "finetuning_task",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "sep_token_id",
        "decoder_start_token_id",
    }
)
MODEL_TYPE = "clip_text_model"


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """A CLIP text tower; field names, meanings and defaults are transformers' `CLIPTextConfig`'s.

    `eos_token_id` selects the pooled position: with the value 2 (both SDXL encoders, from configs
    written before transformers fixed the field) the position of the largest input id, otherwise
    the first position holding `eos_token_id`.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: Optional[int] = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            _check_int(name, getattr(self, name), minimum=1)
        if self.projection_dim is not None:
            _check_int("projection_dim", self.projection_dim, minimum=1)
        _check_int("eos_token_id", self.eos_token_id, minimum=0)
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"unsupported CLIP text config value hidden_act={self.hidden_act!r}: supported "
                f"{', '.join(repr(a) for a in ACTIVATIONS)}"
            )
        if (
            isinstance(self.layer_norm_eps, bool)
            or not isinstance(self.layer_norm_eps, (int, float))
            or self.layer_norm_eps <= 0
        ):
            raise ConfigError(
                f"unsupported CLIP text config value layer_norm_eps={self.layer_norm_eps!r}: "
                "expected a positive number"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"CLIP text config: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "CLIPTextConfig":
        """Validate a transformers text-encoder `config.json` dict; reject unknown fields and unsupported values."""
        model_type = raw.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ConfigError(
                f"unsupported CLIP text config value model_type={model_type!r}: supported "
                f"{MODEL_TYPE!r} (the config.json of a text encoder folder, e.g. "
                "<pipeline>/text_encoder)"
            )
        pruned = raw.get("pruned_heads") or {}
        if pruned:  # pruning changes the attention shapes per layer: not supported
            raise ConfigError(f"unsupported CLIP text config value pruned_heads={pruned!r}: supported {{}}")
        d = {
            k: v
            for k, v in raw.items()
            if not k.startswith("_") and k not in _IGNORED_FIELDS and k != "pruned_heads"
        }
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(
                f"unknown CLIP text config field(s) {', '.join(unknown)}: not part of transformers' "
                "CLIPTextConfig; remove them or check the file"
            )
        if d.get("layer_norm_eps", 1e-5) is None:  # transformers allows None in the type, meaning the default
            d.pop("layer_norm_eps")
        return cls(**d)

    @classmethod
    def from_json(cls, path) -> "CLIPTextConfig":
        """`from_dict` of a config.json file, with a clear error for invalid JSON."""
        return cls.from_dict(read_json(path))

    def to_dict(self) -> dict:
        """The fields as a transformers `config.json` dict (without `architectures`)."""
        return dict(dataclasses.asdict(self), model_type=MODEL_TYPE)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"unsupported CLIP text config value {name}={value!r}: expected an int >= {minimum}"
        )


@flax.struct.dataclass
class CLIPTextOutput:
    """What transformers returns with `output_hidden_states=True` (SDXL uses `hidden_states[-2]`).

    last_hidden_state [B, S, D] after final_layer_norm; pooler_output [B, D], its row at the EOS position;
    hidden_states: the embeddings' output then every layer's output (before final_layer_norm);
    text_embeds [B, projection_dim]: the projected pooler_output (CLIPTextModelWithProjection only).
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple
    text_embeds: Optional[jax.Array] = None


# ---- layers, named after transformers' modules so that checkpoint keys are their paths ----
def _layer_norm(cfg, mdl, name):
    # two-pass variance in float32: E[x^2] - E[x]^2 cancels on the large residual stream of deep towers
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        use_fast_variance=False,
        dtype=mdl.dtype,
        param_dtype=mdl.param_dtype,
        name=name,
    )


def _dense(mdl, features, name, bias=True):
    return nn.Dense(features, use_bias=bias, dtype=mdl.dtype, param_dtype=mdl.param_dtype, name=name)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention (q/k/v/out projections with bias), softmax in float32."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: Optional[str] = None

    @nn.compact
    def __call__(self, x, key_mask=None):  # x: [B, S, D]; key_mask: [B, 1, 1, S] bool or None
        cfg = self.config
        b, s, d = x.shape
        split = lambda a: a.reshape(b, s, cfg.num_attention_heads, cfg.head_dim)
        q, k, v = (split(_dense(self, d, n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
        dtype = q.dtype
        if dtype == jnp.float16 and jax.default_backend() == "cpu":
            # XLA:CPU has no float16 dot with float32 accumulation (which JAX asks for): use float32.
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        out = jax.nn.dot_product_attention(
            q, k, v, mask=key_mask, is_causal=True, implementation=self.implementation
        )
        return _dense(self, d, "out_proj")(out.astype(dtype).reshape(b, s, d))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = ACTIVATIONS[cfg.hidden_act](_dense(self, cfg.intermediate_size, "fc1")(x))
        return _dense(self, cfg.hidden_size, "fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: Optional[str] = None

    @nn.compact
    def __call__(self, x, key_mask=None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = CLIPAttention(cfg, implementation=self.implementation, name="self_attn", **kw)
        x = x + attn(_layer_norm(cfg, self, "layer_norm1")(x), key_mask)
        return x + CLIPMLP(cfg, name="mlp", **kw)(_layer_norm(cfg, self, "layer_norm2")(x))


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        embed = lambda n, name: nn.Embed(
            n, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        positions = jnp.arange(input_ids.shape[1])[None, :]
        return embed(cfg.vocab_size, "token_embedding")(input_ids) + embed(
            cfg.max_position_embeddings, "position_embedding"
        )(positions)


class CLIPEncoder(nn.Module):
    """The stack of `layers_N`; returns every hidden state, the embeddings' output first."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: Optional[str] = None

    @nn.compact
    def __call__(self, x, key_mask=None):
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(
                self.config, self.dtype, self.param_dtype, self.implementation, name=f"layers_{i}"
            )(x, key_mask)
            states.append(x)
        return tuple(states)


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder, final LayerNorm and EOS pooling (transformers' `text_model`)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: Optional[str] = None

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # padding mask on the keys, on top of the causal mask (as transformers' create_causal_mask does)
        key_mask = None if attention_mask is None else (attention_mask != 0)[:, None, None, :]
        h = CLIPTextEmbeddings(cfg, name="embeddings", **kw)(input_ids)
        states = CLIPEncoder(cfg, implementation=self.implementation, name="encoder", **kw)(h, key_mask)
        last = _layer_norm(cfg, self, "final_layer_norm")(states[-1])
        if cfg.eos_token_id == 2:
            # configs written before transformers fixed eos_token_id: EOS is the largest id in the vocabulary
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(
                input_ids == cfg.eos_token_id, axis=-1
            )  # first occurrence (padding may repeat it)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        return last, pooled, states


class _CLIPTextBase(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None  # jax.nn.dot_product_attention implementation; None lets JAX choose

    def _text_model(self, input_ids, attention_mask):
        cfg = self.config
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise DistriFusionError(
                f"input_ids must be integer token ids [batch, sequence], got "
                f"{input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise DistriFusionError(
                f"input_ids has {input_ids.shape[1]} tokens but the text encoder has "
                f"{cfg.max_position_embeddings} positions; truncate the prompt tokens"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise DistriFusionError(
                f"attention_mask {tuple(attention_mask.shape)} must have the shape of "
                f"input_ids {tuple(input_ids.shape)}"
            )
        return CLIPTextTransformer(cfg, self.dtype, self.param_dtype, self.attention_impl, name="text_model")(
            input_ids, attention_mask
        )

    def abstract_params(self, seq_len: int = 1):
        """The parameter tree as ShapeDtypeStructs, by abstract evaluation (no memory used)."""
        ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
        return jax.eval_shape(lambda i: self.init(jax.random.key(0), i), ids)["params"]


class CLIPTextModel(_CLIPTextBase):
    """CLIP text tower (SDXL's `text_encoder`, CLIP ViT-L/14).

    `model.apply({"params": params}, input_ids, attention_mask=None)`: input_ids int [B, S] with
    S <= max_position_embeddings (77); attention_mask [B, S] of 1 (token) / 0 (padding) or None, masks
    keys on top of the causal mask. Returns a `CLIPTextOutput` in `dtype`; LayerNorm statistics and
    softmax are float32 whatever `dtype` is.
    """

    @nn.compact
    def __call__(self, input_ids, attention_mask=None) -> CLIPTextOutput:
        last, pooled, states = self._text_model(input_ids, attention_mask)
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=states)


class CLIPTextModelWithProjection(_CLIPTextBase):
    """CLIP text tower with a bias-free projection of the pooled state (SDXL's `text_encoder_2`, OpenCLIP bigG).

    Called as `CLIPTextModel`; the output also has `text_embeds` [B, projection_dim].
    """

    @nn.compact
    def __call__(self, input_ids, attention_mask=None) -> CLIPTextOutput:
        if self.config.projection_dim is None:
            raise ConfigError("CLIPTextModelWithProjection needs projection_dim in its config")
        last, pooled, states = self._text_model(input_ids, attention_mask)
        embeds = _dense(self, self.config.projection_dim, "text_projection", bias=False)(pooled)
        return CLIPTextOutput(
            last_hidden_state=last, pooler_output=pooled, hidden_states=states, text_embeds=embeds
        )


TEXT_ENCODER_CLASSES = {
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
}


def text_encoder_class(raw: dict):
    """The Flax class named by a config.json dict's `architectures`; ConfigError for anything else."""
    archs = raw.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in TEXT_ENCODER_CLASSES:
        raise ConfigError(
            f"unsupported text encoder architectures={archs!r}: supported "
            f"{' or '.join(repr([a]) for a in TEXT_ENCODER_CLASSES)}"
        )
    return TEXT_ENCODER_CLASSES[archs[0]]
