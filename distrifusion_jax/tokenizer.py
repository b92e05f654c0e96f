"""SDXL's CLIP tokenizers on the `tokenizers` package: files checked on load, ids as transformers' CLIPTokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .errors import CheckpointError

# transformers' CLIPTokenizer defaults, used where a folder's configs do not name a token
SPECIAL_DEFAULTS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
CLIP_MAX_LENGTH = 77  # CLIP's context; SDXL's tokenizer configs say the same
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
# CLIP's pre-tokenization: the two special tokens, English contractions, letter runs, single digits, other symbols
SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
WORD_END = "</w>"
ADDED_TOKEN_OPTIONS = ("normalized", "lstrip", "rstrip", "single_word")


class ClipTokenizer:
    """CLIP's byte-level BPE (lowercased, NFC, whitespace runs as one space, `</w>` ending each word).

    `__call__(prompts)` -> int32 ids [B, model_max_length]: BOS, tokens, EOS, padded with the pad token,
    over-long prompts cut to keep their EOS, as `CLIPTokenizer(..., padding="max_length", truncation=True)`.
    """

    def __init__(
        self,
        vocab: dict,
        merges: list,
        special: dict,
        model_max_length: int = CLIP_MAX_LENGTH,
        flags: Optional[dict] = None,
    ):
        model = BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix=WORD_END,
            fuse_unk=False,
            unk_token=special["unk_token"],
        )
        self.backend = backend = Tokenizer(model)
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        # special tokens match verbatim before normalisation (so "!" is id 0 in tokenizer_2, as in transformers),
        # unless the folder's added-token entries say otherwise (`flags`: {token: AddedToken options})
        backend.add_special_tokens(
            [
                AddedToken(t, special=True, **{"normalized": False, **(flags or {}).get(t, {})})
                for t in dict.fromkeys(special.values())
            ]
        )
        self.special = dict(special)
        self.model_max_length = model_max_length
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            vocab[special[k]] for k in ("bos_token", "eos_token", "pad_token")
        )

    def encode(self, prompts: Sequence[str]) -> list:
        """Ids of each prompt, BOS and EOS included, neither cut nor padded."""
        encodings = self.backend.encode_batch(list(prompts), add_special_tokens=False)
        return [[self.bos_token_id, *e.ids, self.eos_token_id] for e in encodings]

    def pad(self, ids: list) -> np.ndarray:
        """int32 [B, model_max_length]: each id list cut to its first n - 1 ids plus EOS, or padded."""
        n = self.model_max_length
        out = np.full((len(ids), n), self.pad_token_id, np.int32)
        for row, seq in zip(out, ids):
            seq = seq if len(seq) <= n else seq[: n - 1] + [self.eos_token_id]
            row[: len(seq)] = seq
        return out

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        return self.pad(self.encode(prompts))

    def decode(self, ids) -> str:
        """Text of `ids` (words separated by single spaces, as transformers' CLIPTokenizer decodes)."""
        return (
            self.backend.decode([int(i) for i in ids], skip_special_tokens=False)
            .replace(WORD_END, " ")
            .strip()
        )


# ---- reading a tokenizer folder ----
def load_tokenizer(folder, vocab_size: Optional[int] = None, what: str = "tokenizer") -> ClipTokenizer:
    """A CLIP tokenizer folder as SDXL ships it (vocab.json + merges.txt, with tokenizer_config.json and
    special_tokens_map.json naming the special tokens), or as transformers >= 5 saves it (tokenizer.json,
    read in preference, as transformers does). Everything is checked first: the files parse, the merges
    use vocabulary tokens, BOS/EOS/PAD/UNK are in the vocabulary, and the vocabulary has `vocab_size`
    tokens (the text encoder's embedding rows) when given. Failures are one-line `CheckpointError`s.
    """
    folder = Path(os.fspath(folder)).expanduser()
    fix = f"copy the {what} folder of the original pipeline"
    if not folder.is_dir():
        raise CheckpointError(f"{what} folder {folder} does not exist; {fix}")
    config = _json_object(folder / "tokenizer_config.json", fix, required=False)
    special_map = _json_object(folder / "special_tokens_map.json", fix, required=False)
    cls = config.get("tokenizer_class", TOKENIZER_CLASSES[0])
    if cls not in TOKENIZER_CLASSES:
        raise CheckpointError(
            f"{folder}: tokenizer_class {cls!r} is not CLIP's; SDXL uses CLIPTokenizer: {fix}"
        )
    if (folder / "tokenizer.json").is_file():
        vocab, merges, added = _read_tokenizer_json(folder / "tokenizer.json", fix)
    else:
        (vocab, merges), added = _read_vocab_merges(folder, fix), config.get("added_tokens_decoder") or {}
    special = _special_tokens(folder, config, special_map, fix)
    _check_vocab(folder, vocab, merges, special, vocab_size, fix)
    flags = _check_added(folder, added, vocab, special, fix)
    return ClipTokenizer(vocab, merges, special, _max_length(folder, config, fix), flags)


def _json_object(path: Path, fix: str, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path} is missing; {fix}")
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object; {fix}")
    return raw


def _read_vocab_merges(folder: Path, fix: str) -> tuple:
    """(vocab, merges) from vocab.json and merges.txt, parsed as the `tokenizers` BPE reader does."""
    present = [f for f in ("vocab.json", "merges.txt") if (folder / f).is_file()]
    if len(present) < 2:
        found = f" (only {present[0]})" if present else ""
        raise CheckpointError(
            f"{folder}: no vocab.json/merges.txt (nor tokenizer.json){found}: not a CLIP "
            f"tokenizer folder; {fix}"
        )
    vocab = _json_object(folder / "vocab.json", fix)
    try:
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{folder / 'merges.txt'}: not UTF-8 text ({e}); {fix}") from None
    if lines[-1] == "":
        lines.pop()
    merges = []
    for n, line in enumerate(lines, 1):
        if line.startswith("#version"):
            continue
        parts = line.rstrip("\r").split(" ")
        if len(parts) != 2:
            raise CheckpointError(
                f"{folder / 'merges.txt'}: line {n} is not two tokens separated by a space; {fix}"
            )
        merges.append(tuple(parts))
    return vocab, merges


def _read_tokenizer_json(path: Path, fix: str) -> tuple:
    """(vocab, merges, added tokens) of a BPE tokenizer.json; its pipeline is CLIP's by construction here."""
    raw = _json_object(path, fix)
    model = raw.get("model")
    if (
        not isinstance(model, dict)
        or model.get("type", "BPE") != "BPE"
        or not isinstance(model.get("vocab"), dict)
        or not isinstance(model.get("merges"), list)
    ):
        raise CheckpointError(f"{path}: not a BPE tokenizer with a vocab and merges; {fix}")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    bad = next(
        (i for i, m in enumerate(merges) if len(m) != 2 or not all(isinstance(t, str) for t in m)), None
    )
    if bad is not None:
        raise CheckpointError(f"{path}: merge {bad} is not a pair of tokens; {fix}")
    added = raw.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(t, dict) for t in added):
        raise CheckpointError(f"{path}: added_tokens is not a list of objects; {fix}")
    return model["vocab"], merges, {str(t.get("id")): t for t in added}


def _token(value):
    """A special token as configs write it: a string or an AddedToken object {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _special_tokens(folder: Path, config: dict, special_map: dict, fix: str) -> dict:
    special = {}
    for key, default in SPECIAL_DEFAULTS.items():
        value = _token(config.get(key) if config.get(key) is not None else special_map.get(key, default))
        if not isinstance(value, str) or not value:
            raise CheckpointError(f"{folder}: {key} is {value!r}, expected a token string; {fix}")
        special[key] = value
    return special


def _check_vocab(folder: Path, vocab: dict, merges: list, special: dict, vocab_size: Optional[int], fix: str):
    ids = sorted(v for v in vocab.values() if isinstance(v, int) and not isinstance(v, bool))
    if not vocab or len(ids) != len(vocab) or ids != list(range(len(ids))):
        raise CheckpointError(f"{folder}: the vocabulary is not {{token: id}} with ids 0..n-1; {fix}")
    if vocab_size is not None and len(vocab) != vocab_size:
        raise CheckpointError(
            f"{folder}: the vocabulary has {len(vocab)} tokens but the text encoder embeds "
            f"{vocab_size}; use the tokenizer that belongs to this text encoder ({fix})"
        )
    missing = [f"{k}={t!r}" for k, t in special.items() if t not in vocab]
    if missing:
        raise CheckpointError(
            f"{folder}: special token(s) not in the vocabulary: {', '.join(missing)}; {fix}"
        )
    # checked here: the `tokenizers` BPE builder panics (a Rust backtrace) on merges outside the vocabulary
    bad = next(
        (i for i, (a, b) in enumerate(merges) if a not in vocab or b not in vocab or a + b not in vocab), None
    )
    if bad is not None:
        raise CheckpointError(
            f"{folder}: merge {bad + 1} ({' '.join(merges[bad])}) uses tokens outside the vocabulary; {fix}"
        )


def _check_added(folder: Path, added, vocab: dict, special: dict, fix: str) -> dict:
    """{token: AddedToken options} of the added-token entries, which must be special tokens: others (e.g.
    textual inversion) are refused rather than ignored."""
    if not isinstance(added, dict) or not all(isinstance(e, (dict, str)) for e in added.values()):
        raise CheckpointError(f"{folder}: added tokens are not {{id: token}} entries; {fix}")
    flags = {}
    for key, entry in added.items():
        token = _token(entry)
        if token not in special.values() or str(vocab.get(token)) != str(key):
            raise CheckpointError(
                f"{folder}: added token {token!r} (id {key}) is not one of SDXL's special "
                f"tokens; extra added tokens are not supported ({fix})"
            )
        if isinstance(entry, dict):
            flags[token] = {k: bool(entry[k]) for k in ADDED_TOKEN_OPTIONS if k in entry}
    return flags


def _max_length(folder: Path, config: dict, fix: str) -> int:
    n = config.get("model_max_length", CLIP_MAX_LENGTH)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise CheckpointError(
            f"{folder}: model_max_length={n!r} in tokenizer_config.json; expected CLIP's "
            f"{CLIP_MAX_LENGTH} ({fix})"
        )
    return n
