"""Prompt encoding as diffusers' pipelines do it: SDXL's two CLIP text encoders (the refiner's one), SD 1.x / 2.x's one;
and the checks of embeddings a caller computed."""

from __future__ import annotations

import reprlib
import warnings
from typing import Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from .cache import compile_program
from .errors import ConfigError

Prompt = Union[str, Sequence[str], None]


def as_list(prompt: Prompt, batch: Optional[int] = None, name: str = "prompt") -> list:
    """A prompt or list of prompts as a list (a single one repeated to `batch`).

    Anything but a str or a non-empty list/tuple of str is a ConfigError naming the argument
    `name`: `list(123)` or `list(b"..")` would otherwise fail deep inside the tokenizer, or not at all.
    """
    if prompt is None:
        return [""] * (batch or 1)
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(
            f"{name}={short_repr(prompt)} is not supported: pass a str or a non-empty list of str"
        )
    prompts = list(prompts)
    if batch is not None and len(prompts) == 1 and batch > 1:
        prompts = prompts * batch
    if batch is not None and len(prompts) != batch:
        raise ConfigError(
            f"{name} has {len(prompts)} entries for a batch of {batch} prompts: pass one {name} "
            "or one per prompt"
        )
    return prompts


def short_repr(value) -> str:
    """repr(value) cut to a readable length, on one line, for an error message (a long prompt list or
    an array passed by mistake stays short)."""
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxtuple = 40, 40, 3, 3
    return r.repr(value).replace("\n", " ")


def tokenize(tokenizer, prompts: list) -> tuple:
    """(int32 ids [B, n], {prompt: (tokens cut, their text)} for over-long prompts): n = model_max_length
    (CLIP sees 77 positions); `tokenizer` is a `tokenizer.ClipTokenizer`."""
    n = tokenizer.model_max_length
    ids = tokenizer.encode(prompts)
    cut = {
        p: (len(seq) - n, tokenizer.decode(seq[n - 1 : -1])) for p, seq in zip(prompts, ids) if len(seq) > n
    }
    return tokenizer.pad(ids), cut


def warn_cut(cut: dict, n: int) -> None:
    """One short warning line per over-long prompt, naming where it was cut."""
    for count, text in cut.values():
        shown = text if len(text) <= 40 else text[:37] + "..."
        warnings.warn(f"CLIP takes at most {n} tokens; {count} cut from the end of the prompt: {shown!r}")


class PromptEncoder:
    """The pipeline's text encoders, jitted; returns (prompt_embeds, pooled) like diffusers.

    SDXL (`layer="penultimate"`): both encoders' penultimate hidden states concatenated [B, 77, 2048] and the
    projected pooled output of the encoder with a projection [B, 1280]; the refiner has only the second
    encoder. SD 1.x / 2.x (`layer="last"`): the one encoder's last hidden state after its final layer norm
    [B, 77, 768 or 1024], and no pooled output (None).
    """

    def __init__(self, tokenizers, encoders, params, layer: str = "penultimate"):
        if layer not in ("penultimate", "last"):
            raise ValueError(f"layer={layer!r}: 'penultimate' (SDXL) or 'last' (SD 1.x / 2.x)")
        self.tokenizers, self.encoders, self.params, self.layer = tokenizers, encoders, params, layer
        self._compiled: dict = {}  # (encoder, ids shape) -> compiled program

    def _encoder(self, k: int, ids):
        """Encoder k compiled for token ids of this shape: (the hidden states the pipeline uses, the projected
        pooled output or None); read from the persistent caches when they hold it (`compile_program`)."""
        key = (k, ids.shape)
        if key not in self._compiled:
            model, last = self.encoders[k], self.layer == "last"

            def encode(params, ids):
                out = model.apply({"params": params}, ids)
                return (out.last_hidden_state if last else out.hidden_states[-2]), out.text_embeds

            name = f"text-encoder-{k}" + ("-last" if last else "")
            self._compiled[key] = compile_program(name, encode, (self.params[k], ids), repr(model))
        return self._compiled[key]

    def encode(self, prompts: list, prompts_2: list):
        """(hidden states [B, 77, D], pooled [B, P] or None) of these prompts: the first encoder reads
        `prompts`, the second `prompts_2` (an encoder list of one reads `prompts`, as diffusers' refiner)."""
        hidden, pooled, cut = [], None, {}
        for k, (tok, params, texts) in enumerate(zip(self.tokenizers, self.params, (prompts, prompts_2))):
            ids, cut_here = tokenize(tok, texts)
            cut.update(cut_here)  # keyed by prompt: both encoders cut the same prompt once
            ids = jnp.asarray(ids)
            states, projected = self._encoder(k, ids)(params, ids)
            hidden.append(states)
            if projected is not None and pooled is None:
                pooled = projected  # the projected pooled output of the encoder with a projection
        warn_cut(cut, self.tokenizers[0].model_max_length)
        return jnp.concatenate(hidden, axis=-1), pooled

    def __call__(
        self,
        prompt: Prompt,
        prompt_2: Prompt,
        negative: Prompt,
        negative_2: Prompt,
        batch: int,
        do_cfg: bool,
        force_zeros_for_empty_prompt: bool,
        num_images_per_prompt: int = 1,
        given: Optional[dict] = None,
    ):
        """[uncond; cond] embeddings (or cond only without guidance), each prompt repeated per image; pooled is
        None for SD 1.x / 2.x. `given` (from `check_given_embeds`): embeddings the caller computed, used in
        place of encoding the prompts they stand for."""
        # in the encoders' dtype, as their own output: the same compiled programs serve both routes
        given = {k: v.astype(self.encoders[0].dtype) for k, v in (given or {}).items()}
        if "embeds" in given:
            embeds, pooled = given["embeds"], given.get("pooled")
        else:
            prompts = as_list(prompt, batch)
            embeds, pooled = self.encode(
                prompts, as_list(prompt_2, batch) if prompt_2 is not None else prompts
            )
        if do_cfg:
            if "negative_embeds" in given:
                neg_embeds, neg_pooled = given["negative_embeds"], given.get("negative_pooled")
            elif negative is None and force_zeros_for_empty_prompt:
                neg_embeds = jnp.zeros_like(embeds)
                neg_pooled = None if pooled is None else jnp.zeros_like(pooled)
            else:
                negs = as_list(negative or "", batch)
                negs_2 = as_list(negative_2, batch) if negative_2 is not None else negs
                neg_embeds, neg_pooled = self.encode(negs, negs_2)
            embeds = jnp.concatenate([neg_embeds, embeds])
            pooled = None if pooled is None else jnp.concatenate([neg_pooled, pooled])
        if num_images_per_prompt > 1:
            embeds = jnp.repeat(embeds, num_images_per_prompt, axis=0)
            pooled = None if pooled is None else jnp.repeat(pooled, num_images_per_prompt, axis=0)
        return embeds, pooled


EMBED_NAMES = {
    "embeds": "prompt_embeds",
    "pooled": "pooled_prompt_embeds",
    "negative_embeds": "negative_prompt_embeds",
    "negative_pooled": "negative_pooled_prompt_embeds",
}


def check_given_embeds(arrays: dict, prompts: dict, width: int, pooled_width: Optional[int]):
    """The caller's own embeddings (diffusers' `prompt_embeds` & co., keyed as EMBED_NAMES) checked, as float32
    jax arrays: (batch, {key: array}); batch is None when prompts are given instead.

    `prompts` holds the text arguments each array replaces ({"prompt": ..., "prompt_2": ..., "negative_prompt":
    ...}); `width`: the UNet's cross-attention width; `pooled_width`: the pooled embedding's (None: the model
    takes none, SD 1.x / 2.x). Every mistake is one ConfigError line: text and embeddings both given, a missing
    pooled partner (SDXL), shapes that disagree, non-finite values.
    """
    given = {k: v for k, v in arrays.items() if v is not None}
    if not given:
        return None, {}
    if "embeds" not in given:
        first = EMBED_NAMES[next(iter(given))]
        raise ConfigError(f"{first} without prompt_embeds: pass prompt_embeds too, or the prompts as text")
    texts = {"embeds": ("prompt", "prompt_2"), "negative_embeds": ("negative_prompt", "negative_prompt_2")}
    for key, names in texts.items():
        clash = [n for n in names if key in given and prompts.get(n) is not None]
        if clash:
            raise ConfigError(
                f"both {clash[0]} and {EMBED_NAMES[key]} given: pass one of them ({EMBED_NAMES[key]} stands "
                "for the encoded text)"
            )
    out = {}
    for key, value in given.items():
        name = EMBED_NAMES[key]
        try:
            arr = np.asarray(value, np.float32)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{name} of type {type(value).__name__} is not supported: pass a float array"
            ) from None
        is_pooled = key.endswith("pooled")
        want = f"[batch, {pooled_width}]" if is_pooled else f"[batch, tokens, {width}]"
        if is_pooled and pooled_width is None:
            raise ConfigError(
                f"{name} given, but this model takes no pooled embedding (SD 1.x / 2.x): leave it out"
            )
        if arr.ndim != (2 if is_pooled else 3) or arr.shape[-1] != (pooled_width if is_pooled else width):
            raise ConfigError(f"{name} has shape {arr.shape}; this model takes {want}")
        if not np.isfinite(arr).all():
            raise ConfigError(f"{name} holds NaN or infinite values: pass finite embeddings")
        out[key] = arr
    if pooled_width is not None:
        for key in ("embeds", "negative_embeds"):
            partner = key.replace("embeds", "pooled")
            if key in out and partner not in out:
                raise ConfigError(
                    f"{EMBED_NAMES[key]} without {EMBED_NAMES[partner]}: SDXL needs both (diffusers' "
                    "encode_prompt returns them together)"
                )
    batch = len(out["embeds"])
    for key, arr in out.items():
        if len(arr) != batch:
            raise ConfigError(
                f"{EMBED_NAMES[key]} has batch {len(arr)} but prompt_embeds has {batch}: make them agree"
            )
    if "negative_embeds" in out and out["negative_embeds"].shape != out["embeds"].shape:
        raise ConfigError(
            f"negative_prompt_embeds has shape {out['negative_embeds'].shape} but prompt_embeds "
            f"{out['embeds'].shape}: make them agree"
        )
    return batch, {k: jnp.asarray(v) for k, v in out.items()}
