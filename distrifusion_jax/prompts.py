"""SDXL prompt encoding with two CLIP text encoders, as diffusers' StableDiffusionXLPipeline does it."""

from __future__ import annotations

import reprlib
import warnings
from typing import Optional, Sequence, Union

import jax.numpy as jnp

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
    """Both text encoders, jitted; returns (prompt_embeds [B, 77, 2048], pooled [B, 1280]) like diffusers."""

    def __init__(self, tokenizers, encoders, params):
        self.tokenizers, self.encoders, self.params = tokenizers, encoders, params
        self._compiled: dict = {}  # (encoder, ids shape) -> compiled program

    def _encoder(self, k: int, ids):
        """Encoder k compiled for token ids of this shape: (penultimate hidden states, projected pooled or None),
        what SDXL uses; read from the persistent caches when they hold it (`compile_program`)."""
        key = (k, ids.shape)
        if key not in self._compiled:
            model = self.encoders[k]

            def encode(params, ids):
                out = model.apply({"params": params}, ids)
                return out.hidden_states[-2], out.text_embeds

            self._compiled[key] = compile_program(
                f"text-encoder-{k}", encode, (self.params[k], ids), repr(model)
            )
        return self._compiled[key]

    def encode(self, prompts: list, prompts_2: list):
        hidden, pooled, cut = [], None, {}
        for k, (tok, params, texts) in enumerate(zip(self.tokenizers, self.params, (prompts, prompts_2))):
            ids, cut_here = tokenize(tok, texts)
            cut.update(cut_here)  # keyed by prompt: both encoders cut the same prompt once
            ids = jnp.asarray(ids)
            states, projected = self._encoder(k, ids)(params, ids)
            hidden.append(states)  # SDXL uses the penultimate layer of both
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
    ):
        """[uncond; cond] embeddings (or cond only without guidance), each prompt repeated per image."""
        prompts = as_list(prompt, batch)
        embeds, pooled = self.encode(prompts, as_list(prompt_2, batch) if prompt_2 is not None else prompts)
        if do_cfg:
            if negative is None and force_zeros_for_empty_prompt:
                neg_embeds, neg_pooled = jnp.zeros_like(embeds), jnp.zeros_like(pooled)
            else:
                negs = as_list(negative or "", batch)
                negs_2 = as_list(negative_2, batch) if negative_2 is not None else negs
                neg_embeds, neg_pooled = self.encode(negs, negs_2)
            embeds, pooled = jnp.concatenate([neg_embeds, embeds]), jnp.concatenate([neg_pooled, pooled])
        if num_images_per_prompt > 1:
            embeds = jnp.repeat(embeds, num_images_per_prompt, axis=0)
            pooled = jnp.repeat(pooled, num_images_per_prompt, axis=0)
        return embeds, pooled
