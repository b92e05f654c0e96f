"""The tiny SDXL pipeline (diffusers loads it) and whole-pipeline conversion (our loaders load the result)."""

import functools
import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import CLIPTokenizer

from distrifusion_jax import keymap
from distrifusion_jax.cli import main as cli_main
from distrifusion_jax.convert import PIPELINE_MODELS, convert_pipeline
from distrifusion_jax.errors import CheckpointError, ConfigError
from distrifusion_jax.tiny import UNET, VAE, tiny_params, write_tiny_pipeline
from distrifusion_jax.weights import load_text_encoder, load_unet, load_vae
from distrifusion_jax.weights.clip import text_encoder_key_map
from distrifusion_jax.weights.vae import vae_key_map

LOADERS = {"unet": load_unet, "vae": load_vae, "text_encoder": load_text_encoder, "text_encoder_2": load_text_encoder}
KEY_MAPS = {"unet": keymap.torch_to_flax, "vae": vae_key_map, "text_encoder": text_encoder_key_map,
            "text_encoder_2": text_encoder_key_map}
PROMPT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" in the CLIP vocabulary


@pytest.fixture(scope="module")
def tiny_diffusers(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", seed=0, fmt="diffusers")


@pytest.fixture(scope="module")
def converted(tiny_diffusers, tmp_path_factory):
    return convert_pipeline(tiny_diffusers, tmp_path_factory.mktemp("converted") / "sdxl", dtype="bfloat16",
                            progress=False)


@functools.lru_cache(maxsize=None)
def expected_params(name: str) -> dict:
    """tiny_params(name, seed=0), drawn once per module (the UNet's abstract evaluation takes a second)."""
    return tiny_params(name, seed=0)


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


def test_tiny_pipeline_loads_and_runs_in_diffusers(tiny_diffusers):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_diffusers)
    for name in PIPELINE_MODELS:
        assert_same(torch_as_flax(getattr(pipe, name), KEY_MAPS[name]), expected_params(name))
    assert pipe.vae_scale_factor == 8 and pipe.default_sample_size == UNET["sample_size"]
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2.pad_token_id == 0
    # a run checks the shapes agree: context 32 + 32, text_embeds + 6 time ids, 4 VAE levels
    out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
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
    assert index["_distrifusion_jax"]["dtype"] == "bfloat16" and index["_distrifusion_jax"]["vae_dtype"] == "float32"


def test_converted_tokenizers_and_scheduler(tiny_diffusers, converted):
    tok, tok_2 = (CLIPTokenizer.from_pretrained(str(converted / n)) for n in ("tokenizer", "tokenizer_2"))
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    ids_2 = tok_2("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids == PROMPT_IDS + [49407] * 70
    assert ids_2 == PROMPT_IDS + [0] * 70 and tok_2.pad_token == "!"
    assert sorted(p.name for p in (converted / "tokenizer_2").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    sched = "scheduler/scheduler_config.json"
    assert json.loads((converted / sched).read_text()) == json.loads((tiny_diffusers / sched).read_text())


def test_tiny_converted_format_equals_the_converted_diffusers_one(converted, tmp_path):
    direct = write_tiny_pipeline(tmp_path / "tiny", seed=0, dtype="bfloat16")
    for name in PIPELINE_MODELS:
        dtype = np.float32 if name == "vae" else ml_dtypes.bfloat16
        model_a, a = LOADERS[name](direct / name, dtype=dtype)
        model_b, b = LOADERS[name](converted / name, dtype=dtype)
        assert model_a.config == model_b.config
        assert_same(keymap.flatten(a), {k: np.asarray(v) for k, v in keymap.flatten(b).items()}, dtype)
    assert stored_dtypes(direct / "vae") == {"F32"} and VAE["force_upcast"]
    with pytest.raises(ConfigError, match="unknown fmt 'torch'"):
        write_tiny_pipeline(tmp_path / "bad", fmt="torch")


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
