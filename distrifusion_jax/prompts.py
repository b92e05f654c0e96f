"""SDXL prompt encoding with two CLIP text encoders, as diffusers' StableDiffusionXLPipeline does it."""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

Prompt = Union[str, Sequence[str], None]


def as_list(prompt: Prompt, batch: Optional[int] = None) -> list:
    """A prompt or list of prompts as a list (a single one repeated to `batch`)."""
    if prompt is None:
        return [""] * (batch or 1)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if batch is not None and len(prompts) == 1 and batch > 1:
        prompts = prompts * batch
    if batch is not None and len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for a batch of {batch}: pass one prompt or one per image")
    return prompts


def tokenize(tokenizer, prompts: list) -> np.ndarray:
    """int32 ids [B, max_length], padded; over-long prompts are truncated with a warning (CLIP sees 77)."""
    n = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="np").input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="np")
    lengths = full.attention_mask.sum(axis=1)
    dropped = [tokenizer.decode(full.input_ids[i, n - 1:lengths[i] - 1]) for i in range(len(prompts)) if lengths[i] > n]
    if dropped:
        warnings.warn(f"CLIP takes at most {n} tokens; this part of the prompt was cut off: {dropped}")
    return ids.astype(np.int32)


class PromptEncoder:
    """Both text encoders, jitted; returns (prompt_embeds [B, 77, 2048], pooled [B, 1280]) like diffusers."""

    def __init__(self, tokenizers, encoders, params):
        self.tokenizers, self.encoders, self.params = tokenizers, encoders, params
        self._fns = [jax.jit(lambda p, ids, m=m: m.apply({"params": p}, ids)) for m in encoders]

    def encode(self, prompts: list, prompts_2: list):
        hidden, pooled = [], None
        for tok, fn, params, texts in zip(self.tokenizers, self._fns, self.params, (prompts, prompts_2)):
            out = fn(params, jnp.asarray(tokenize(tok, texts)))
            hidden.append(out.hidden_states[-2])  # SDXL uses the penultimate layer of both
            if out.text_embeds is not None and pooled is None:
                pooled = out.text_embeds  # the projected pooled output of the encoder with a projection
        return jnp.concatenate(hidden, axis=-1), pooled

    def __call__(self, prompt: Prompt, prompt_2: Prompt, negative: Prompt, negative_2: Prompt, batch: int,
                 do_cfg: bool, force_zeros_for_empty_prompt: bool, num_images_per_prompt: int = 1):
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
