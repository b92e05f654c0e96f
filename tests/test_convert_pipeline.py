"""The tiny SDXL pipeline (diffusers loads it) and whole-pipeline conversion (our loaders load the result)."""

import functools
import json
import shutil
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import CLIPTokenizer

from distrifusion_jax import convert as convert_module
from distrifusion_jax import keymap
from distrifusion_jax.cli import main as cli_main
from distrifusion_jax.config import DistriConfig
from distrifusion_jax.convert import PIPELINE_MODELS, convert, convert_pipeline, convert_unet
from distrifusion_jax.errors import CheckpointError, ConfigError
from distrifusion_jax.models.presets import preset_dict
from distrifusion_jax.pipeline import DistriSDXLPipeline
from distrifusion_jax.tools.random_pipeline import random_params_of, write_random_pipeline
from distrifusion_jax.weights import load_text_encoder, load_unet, load_vae
from distrifusion_jax.weights.clip import text_encoder_key_map
from distrifusion_jax.weights.vae import vae_key_map

LOADERS = {
    "unet": load_unet,
    "vae": load_vae,
    "text_encoder": load_text_encoder,
    "text_encoder_2": load_text_encoder,
}
KEY_MAPS = {
    "unet": keymap.torch_to_flax,
    "vae": vae_key_map,
    "text_encoder": text_encoder_key_map,
    "text_encoder_2": text_encoder_key_map,
}
UNET, VAE = (
    preset_dict("tiny-sdxl", "unet"),
    preset_dict("tiny-sdxl", "vae"),
)  # what the random pipeline holds
PROMPT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" in the CLIP vocabulary


@pytest.fixture(scope="module")
def tiny_diffusers(tmp_path_factory):
    return write_random_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", seed=0, fmt="diffusers")


@pytest.fixture(scope="module")
def converted(tiny_diffusers, tmp_path_factory):
    return convert_pipeline(
        tiny_diffusers, tmp_path_factory.mktemp("converted") / "sdxl", dtype="bfloat16", progress=False
    )


@functools.lru_cache(maxsize=None)
def expected_params(name: str) -> dict:
    """The random pipeline's parameters, drawn once per module (the UNet's abstract evaluation takes a second)."""
    return random_params_of("tiny-sdxl", name, seed=0)


def torch_as_flax(module, key_map) -> dict:
    """A torch module's state dict through our key map: {Flax path: float32 array}."""
    out = {}
    for key, value in module.state_dict().items():
        mapped = key_map(key, tuple(value.shape))
        if mapped is not None:  # buffers (position_ids)
            path, _, perm = mapped
            array = value.float().numpy()
            out[path] = array.transpose(perm) if perm else array
    return out


def assert_same(flat: dict, expected: dict, dtype=np.float32):
    assert set(flat) == set(expected)
    for k, v in expected.items():
        got = np.asarray(flat[k])
        assert got.dtype == dtype, k
        np.testing.assert_array_equal(got, v.astype(dtype), err_msg=k)


def stored_dtypes(folder) -> set:
    with safe_open(str(folder / "flax_params.safetensors"), framework="np") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.mark.slow
def test_tiny_pipeline_loads_and_runs_in_diffusers(tiny_diffusers):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_diffusers)
    for name in PIPELINE_MODELS:
        assert_same(torch_as_flax(getattr(pipe, name), KEY_MAPS[name]), expected_params(name))
    assert pipe.vae_scale_factor == 8 and pipe.default_sample_size == UNET["sample_size"]
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2.pad_token_id == 0
    # a run checks the shapes agree: context 32 + 32, text_embeds + 6 time ids, 4 VAE levels
    out = pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_converted_pipeline_loads_the_same_parameters(converted):
    for name in PIPELINE_MODELS:
        dtype = np.float32 if name == "vae" else ml_dtypes.bfloat16  # force_upcast keeps the VAE float32
        assert stored_dtypes(converted / name) == ({"F32"} if name == "vae" else {"BF16"})
        _, params = LOADERS[name](converted / name, dtype=dtype)
        assert_same(keymap.flatten(params), expected_params(name), dtype)
    unet_config = json.loads((converted / "unet" / "config.json").read_text())
    assert unet_config["sample_size"] == UNET["sample_size"]  # carried over for the default image size
    index = json.loads((converted / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"]
    assert (
        index["_distrifusion_jax"]["dtype"] == "bfloat16"
        and index["_distrifusion_jax"]["vae_dtype"] == "float32"
    )


def test_converted_tokenizers_and_scheduler(tiny_diffusers, converted):
    tok, tok_2 = (CLIPTokenizer.from_pretrained(str(converted / n)) for n in ("tokenizer", "tokenizer_2"))
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    ids_2 = tok_2("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids == PROMPT_IDS + [49407] * 70
    assert ids_2 == PROMPT_IDS + [0] * 70 and tok_2.pad_token == "!"
    assert sorted(p.name for p in (converted / "tokenizer_2").iterdir()) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    sched = "scheduler/scheduler_config.json"
    assert json.loads((converted / sched).read_text()) == json.loads((tiny_diffusers / sched).read_text())


def test_tiny_converted_format_equals_the_converted_diffusers_one(converted, tmp_path):
    direct = write_random_pipeline(tmp_path / "tiny", seed=0, dtype="bfloat16")
    for name in PIPELINE_MODELS:
        dtype = np.float32 if name == "vae" else ml_dtypes.bfloat16
        model_a, a = LOADERS[name](direct / name, dtype=dtype)
        model_b, b = LOADERS[name](converted / name, dtype=dtype)
        assert model_a.config == model_b.config
        assert_same(keymap.flatten(a), {k: np.asarray(v) for k, v in keymap.flatten(b).items()}, dtype)
    assert stored_dtypes(direct / "vae") == {"F32"} and VAE["force_upcast"]
    with pytest.raises(ConfigError, match="unknown fmt 'torch'"):
        write_random_pipeline(tmp_path / "bad", fmt="torch")


def test_cli_converts_a_pipeline_folder(tiny_diffusers, tmp_path, capsys):
    assert cli_main(["convert", str(tiny_diffusers), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "converted SDXL pipeline" in err and "float32" in err
    for name in PIPELINE_MODELS:
        assert stored_dtypes(tmp_path / "out" / name) == {"F32"}  # the default dtype is float32 everywhere
    assert (tmp_path / "out" / "tokenizer" / "vocab.json").is_file()


def test_missing_component_and_non_pipeline_folder(tiny_diffusers, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_diffusers, partial, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(CheckpointError, match=r"component\(s\) missing: text_encoder_2 "):
        convert_pipeline(partial, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # checked before anything is written
    assert cli_main(["convert", str(partial), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "text_encoder_2" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model_index.json; not a diffusers pipeline folder"):
        convert_pipeline(tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="must differ"):
        convert_pipeline(tiny_diffusers, tiny_diffusers, progress=False)


# ---- a safe destination: never the source, never mixed, written whole or not at all ----
def snapshot(folder) -> dict:
    """{relative path: contents} of every file under `folder`: the bytes, for safetensors files the header
    as a dict (its metadata's key order varies between writes) and the tensor bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            raw = p.read_bytes()
            if p.suffix == ".safetensors":
                n = int.from_bytes(raw[:8], "little")
                raw = (json.loads(raw[8 : 8 + n]), raw[8 + n :])
            out[str(p.relative_to(folder))] = raw
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_non_empty_destination_needs_overwrite(tiny_diffusers, converted, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli_main(["convert", str(tiny_diffusers), str(out), "--dtype", "bfloat16"]) == 2
    assert "exists and is not empty; pass --overwrite" in one_line_error(capsys)
    assert snapshot(out) == {"notes.txt": b"keep me"}
    assert cli_main(["convert", str(tiny_diffusers), str(out), "--dtype", "bfloat16", "--overwrite"]) == 0
    assert f"to {out} in " in capsys.readouterr().err  # the summary names the real destination
    assert snapshot(out) == snapshot(converted)  # the old contents are gone, the new equal a fresh conversion
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    (tmp_path / "empty").mkdir()  # an empty folder needs no --overwrite
    convert_unet(tiny_diffusers / "unet", tmp_path / "empty", progress=False)
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [
        "config.json",
        "flax_params.safetensors",
    ]
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        convert_unet(tiny_diffusers / "unet", tmp_path / "empty", progress=False)


def test_overlapping_or_file_destinations_are_refused(tiny_diffusers, tmp_path, capsys):
    before = snapshot(tiny_diffusers)
    unet = tiny_diffusers / "unet"
    for src, dst in [
        (tiny_diffusers, tiny_diffusers / "converted"),
        (unet, unet / "converted"),
        (unet, tiny_diffusers),
        (tiny_diffusers / ".." / tiny_diffusers.name / "unet", tiny_diffusers),
    ]:
        with pytest.raises(CheckpointError, match="the output and source folders must not overlap"):
            convert(src, dst, progress=False, overwrite=True)  # overwrite=True: would delete the source
    (tmp_path / "link").symlink_to(unet)
    with pytest.raises(CheckpointError, match="must differ"):
        convert_unet(unet, tmp_path / "link", progress=False, overwrite=True)
    assert snapshot(tiny_diffusers) == before  # byte for byte, nothing added
    (tmp_path / "link").unlink()
    (tmp_path / "file").write_text("not a folder")
    for src in (tiny_diffusers, unet):
        assert cli_main(["convert", str(src), str(tmp_path / "file"), "--overwrite"]) == 2
        assert "file exists and is not a folder" in one_line_error(capsys)
    assert (tmp_path / "file").read_text() == "not a folder"


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt  # as Ctrl-C would, after the UNet was written


def disk_full(*args, **kwargs):
    raise OSError("disk full")


def test_a_failed_conversion_leaves_no_output(tiny_diffusers, converted, tmp_path, monkeypatch):
    monkeypatch.setitem(convert_module.READERS, "vae", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_pipeline(tiny_diffusers, tmp_path / "new", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the destination nor a partial folder
    good = tmp_path / "good"
    shutil.copytree(converted, good)
    before = snapshot(good)
    monkeypatch.setitem(convert_module.READERS, "vae", disk_full)
    with pytest.raises(OSError, match="disk full"):
        convert_pipeline(tiny_diffusers, good, dtype="float32", progress=False, overwrite=True)
    assert snapshot(good) == before  # the old conversion is intact, not float32 in part
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]


def broken_copy(folder, dst, edit):
    shutil.copytree(folder, dst)
    edit(dst)
    return dst


def test_bad_tokenizers_are_refused_before_writing(tiny_diffusers, tmp_path, capsys):
    no_merges = broken_copy(
        tiny_diffusers, tmp_path / "no_merges", lambda f: (f / "tokenizer_2" / "merges.txt").unlink()
    )
    assert cli_main(["convert", str(no_merges), str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    assert "tokenizer_2: no vocab.json/merges.txt (nor tokenizer.json) (only vocab.json)" in err
    assert "copy the tokenizer_2 folder of the original pipeline" in err

    def grow_vocab(folder):
        path = folder / "text_encoder" / "config.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), vocab_size=50000)))

    wrong_size = broken_copy(tiny_diffusers, tmp_path / "wrong_size", grow_vocab)
    with pytest.raises(
        CheckpointError, match="tokenizer: the vocabulary has 49408 tokens but the text encoder embeds 50000"
    ):
        convert_pipeline(wrong_size, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_from_pretrained_checks_tokenizers_without_transformers(converted, tmp_path, monkeypatch):
    monkeypatch.setitem(
        sys.modules, "transformers", None
    )  # the runtime never imports it: this load gets as far
    bad = broken_copy(converted, tmp_path / "bad", lambda f: (f / "tokenizer" / "merges.txt").unlink())
    with pytest.raises(
        CheckpointError, match=r"tokenizer: no vocab.json/merges.txt .*copy the tokenizer folder"
    ):
        DistriSDXLPipeline.from_pretrained(bad, DistriConfig(64, 64, devices=1), dtype=np.float32)
