"""Our CLIP tokenizer: the same ids as transformers' CLIPTokenizer for both SDXL tokenizers, checked files, quiet."""

import collections
import json
import re
import shutil
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from transformers import CLIPTokenizer

from distrifusion_jax.errors import CheckpointError
from distrifusion_jax.prompts import PromptEncoder, tokenize
from distrifusion_jax.tokenizer import load_tokenizer
from distrifusion_jax.weights.converted import write_tokenizers

PROMPTS = [
    "",
    "a photo of a cat",
    "A PHOTO OF A Cat, In CAPITALS",
    "hello, world!! what?! (yes) [no] {maybe} x,y;z:w",
    "1234567890 cats, 3.14 dogs, 1st 2nd 10k",
    "café crème brûlée, naïve Zürich, e\u0301 composed vs é",
    "emoji 🐱🚀, 中文, русский, ελληνικά",
    "  extra   spaces\tand\ttabs\nand newlines  ",
    "it's, don't, we'll, they're, I'd, you've, I'm",
    "<|endoftext|> inside <|startoftext|> the text, <|EndOfText|>!<|endoftext|>x",
    "!!!",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(f"word{i}" for i in range(60)),  # > 77 tokens: truncated
    "x" * 400,  # one very long word
]


NAMES = ("tokenizer", "tokenizer_2", "tokenizer_2_v4")


def added_token(content, normalized=True):
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """tokenizer/ (pads with <|endoftext|>) and tokenizer_2/ (pads with "!") as SDXL ships them, and
    tokenizer_2_v4/ with the configs transformers 4 wrote: AddedToken objects, and added_tokens_decoder
    entries whose `normalized` makes BOS/EOS match after lower-casing."""
    root = tmp_path_factory.mktemp("tok")
    write_tokenizers(root)
    v4 = root / "tokenizer_2_v4"
    shutil.copytree(root / "tokenizer_2", v4)
    special = {
        "bos_token": added_token("<|startoftext|>"),
        "eos_token": added_token("<|endoftext|>"),
        "unk_token": added_token("<|endoftext|>"),
        "pad_token": "!",
    }
    decoder = {
        "0": dict(added_token("!", normalized=False), special=True),
        "49406": dict(added_token("<|startoftext|>"), special=True),
        "49407": dict(added_token("<|endoftext|>"), special=True),
    }
    (v4 / "tokenizer_config.json").write_text(
        json.dumps(
            dict(
                special,
                add_prefix_space=False,
                do_lower_case=True,
                errors="replace",
                model_max_length=77,
                tokenizer_class="CLIPTokenizer",
                added_tokens_decoder=decoder,
            )
        )
    )
    (v4 / "special_tokens_map.json").write_text(json.dumps(special))
    return root


@pytest.fixture(scope="module")
def references(folders):
    return {name: CLIPTokenizer.from_pretrained(str(folders / name)) for name in NAMES}


def reference_ids(tok, prompts) -> np.ndarray:
    return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids


@pytest.mark.parametrize("name", NAMES)
def test_ids_equal_transformers(folders, references, name):
    ours, ref = load_tokenizer(folders / name, vocab_size=49408), references[name]
    assert (
        (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id)
        == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
        == (49406, 49407, 49407 if name == "tokenizer" else 0)
    )
    assert ours.model_max_length == ref.model_max_length == 77
    ids = ours(PROMPTS)  # one batch
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, reference_ids(ref, PROMPTS))
    for prompt in PROMPTS:  # uncut, one at a time
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert ours.encode([prompt])[0] == ref(prompt).input_ids, prompt
    hello = ours.encode(["hello!"])[0]
    assert hello[-2] == (
        256 if name == "tokenizer" else 0
    )  # "!" is tokenizer_2's pad token, matched verbatim
    assert ours.decode(ours.encode([PROMPTS[3]])[0][1:-1]) == ref.decode(ref(PROMPTS[3]).input_ids[1:-1])


def test_tokenizer_json_folder(folders, references, tmp_path):
    """transformers >= 5 saves tokenizer.json (no vocab.json / merges.txt): it loads to the same ids."""
    references["tokenizer_2"].save_pretrained(str(tmp_path))
    assert not (tmp_path / "merges.txt").exists() and (tmp_path / "tokenizer.json").is_file()
    ours = load_tokenizer(tmp_path, vocab_size=49408)
    np.testing.assert_array_equal(ours(PROMPTS), reference_ids(references["tokenizer_2"], PROMPTS))


def _edit_json(path, **changes):
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


BROKEN = {  # how a folder is broken -> what the one-line error says (literally)
    "no_files": (
        lambda f: [p.unlink() for p in f.iterdir()],
        "no vocab.json/merges.txt (nor tokenizer.json):",
    ),
    "no_merges": (
        lambda f: (f / "merges.txt").unlink(),
        "no vocab.json/merges.txt (nor tokenizer.json) (only vocab",
    ),
    "bad_vocab_json": (lambda f: (f / "vocab.json").write_text('{"a": 0,'), "vocab.json: not valid JSON"),
    "bad_merge_line": (
        lambda f: (f / "merges.txt").write_text("#version: 0.2\ni n\nt h e\n"),
        "merges.txt: line 3 is not two tokens",
    ),
    "merge_out_of_vocab": (
        lambda f: (f / "merges.txt").write_text("#version: 0.2\ni n\nzq@ x\n"),
        "merge 2 (zq@ x) uses tokens outside the vocabulary",
    ),
    "special_not_in_vocab": (
        lambda f: _edit_json(f / "tokenizer_config.json", bos_token={"content": "<s>"}),
        "special token(s) not in the vocabulary: bos_token='<s>'",
    ),
    "sparse_ids": (lambda f: (f / "vocab.json").write_text('{"a": 0, "b": 5}'), "ids 0..n-1"),
    "not_clip": (
        lambda f: _edit_json(f / "tokenizer_config.json", tokenizer_class="T5Tokenizer"),
        "tokenizer_class 'T5Tokenizer' is not CLIP's",
    ),
    "max_length": (
        lambda f: _edit_json(f / "tokenizer_config.json", model_max_length=1e30),
        "model_max_length=1e",
    ),
    "added_token": (
        lambda f: _edit_json(
            f / "tokenizer_config.json", added_tokens_decoder={"49408": {"content": "<cat-toy>"}}
        ),
        "added token '<cat-toy>' (id 49408) is not one of SDXL's special tokens",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_folders_are_one_line_errors(folders, tmp_path, case):
    folder = tmp_path / "tokenizer_2"
    shutil.copytree(folders / "tokenizer_2", folder)
    breaks, message = BROKEN[case]
    breaks(folder)
    with pytest.raises(CheckpointError, match=re.escape(message)) as info:
        load_tokenizer(folder, vocab_size=49408, what="tokenizer_2")
    assert "\n" not in str(info.value) and "copy the tokenizer_2 folder of the original pipeline" in str(
        info.value
    )


def test_missing_folder_and_vocab_size(folders, tmp_path):
    with pytest.raises(
        CheckpointError, match=r"tokenizer_2 folder .*missing does not exist; copy the tokenizer_2"
    ):
        load_tokenizer(tmp_path / "missing", what="tokenizer_2")
    with pytest.raises(
        CheckpointError, match="the vocabulary has 49408 tokens but the text encoder embeds 49409"
    ):
        load_tokenizer(folders / "tokenizer", vocab_size=49409)
    assert load_tokenizer(folders / "tokenizer").model_max_length == 77  # no size to check against: accepted


Out = collections.namedtuple("Out", "hidden_states text_embeds")


class IdsEncoder:
    """A stand-in text encoder whose hidden states are its input ids, so the embeddings show what it was fed."""

    def apply(self, variables, ids):
        h = ids[..., None].astype(jnp.float32)
        return Out((h, h), h[:, 0, 0][:, None])


def test_quiet_and_one_warning_per_cut_prompt(folders, references, monkeypatch, capfd):
    long_a, long_b = "a cube " * 60, "a sphere " * 50  # 120 and 100 tokens
    prompts = [long_a, "short", long_a, long_b]
    expected = [reference_ids(references[n], prompts) for n in ("tokenizer", "tokenizer_2")]
    capfd.readouterr()
    monkeypatch.setitem(
        sys.modules, "transformers", None
    )  # importing it now fails: the runtime path never does
    toks = [load_tokenizer(folders / n, vocab_size=49408) for n in ("tokenizer", "tokenizer_2")]
    ids, cut = tokenize(toks[1], prompts)
    np.testing.assert_array_equal(ids, expected[1])
    assert cut == {long_a: (45, cut[long_a][1]), long_b: (25, cut[long_b][1])}
    assert cut[long_a][1] == "cube" + " a cube" * 22  # the 45 tokens past position 76, EOS aside
    encoder = PromptEncoder(toks, [IdsEncoder(), IdsEncoder()], [{}, {}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embeds, pooled = encoder.encode(prompts, prompts)
    messages = sorted(str(w.message) for w in caught)
    assert messages == [  # both encoders, a repeated prompt: one short line per cut prompt
        "CLIP takes at most 77 tokens; 25 cut from the end of the prompt: 'sphere a sphere a sphere a sphere a s...'",
        "CLIP takes at most 77 tokens; 45 cut from the end of the prompt: 'cube a cube a cube a cube a cube a cu...'",
    ]
    np.testing.assert_array_equal(np.asarray(embeds)[..., 0], expected[0])  # what each encoder was fed
    np.testing.assert_array_equal(np.asarray(embeds)[..., 1], expected[1])
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # nothing from transformers or tokenizers
