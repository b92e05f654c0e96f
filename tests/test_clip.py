"""CLIP text encoders: parity with transformers, full-size key coverage, loading, conversion, clear errors."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig as TorchConfig
from transformers import CLIPTextModel as TorchCLIPText
from transformers import CLIPTextModelWithProjection as TorchCLIPTextProj
from transformers.activations import ACT2FN

from distrifusion_jax import keymap
from distrifusion_jax.convert import convert_text_encoder
from distrifusion_jax.errors import CheckpointError, ConfigError, DistriFusionError
from distrifusion_jax.models.clip import (
    ACTIVATIONS,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    text_encoder_class,
)
from distrifusion_jax.weights.clip import load_text_encoder, text_encoder_key_map
from helpers import perturbed, rel_l2

SDXL = Path(__file__).parents[1] / "distrifusion_jax" / "configs" / "sdxl-base-1.0"
VOCAB, EOS_ARGMAX, EOS_OTHER = 100, 99, 49  # with eos_token_id=2 the pooled token is the largest id (99 here)

TINY = {
    # SDXL text_encoder-like: no projection, quick_gelu, the legacy eos_token_id=2 (argmax pooling)
    "l": dict(
        architectures=["CLIPTextModel"],
        hidden_act="quick_gelu",
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=77,
        projection_dim=24,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    ),
    # SDXL text_encoder_2-like: bias-free projection, exact gelu, three layers
    "g": dict(
        architectures=["CLIPTextModelWithProjection"],
        hidden_act="gelu",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=77,
        projection_dim=24,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    ),
    # a fixed eos_token_id: the pooled token is the first one equal to it, not the largest
    "g_eos": dict(
        architectures=["CLIPTextModelWithProjection"],
        hidden_act="gelu",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=77,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=EOS_OTHER,
        pad_token_id=1,
    ),
}
TORCH_CLASSES = {"CLIPTextModel": TorchCLIPText, "CLIPTextModelWithProjection": TorchCLIPTextProj}


def torch_text_encoder(raw: dict, seed: int = 0):
    """A transformers text encoder with every parameter perturbed away from its initial value (float32, eval)."""
    cfg = {k: v for k, v in raw.items() if k != "architectures"}
    return perturbed(lambda: TORCH_CLASSES[raw["architectures"][0]](TorchConfig(**cfg)), seed)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """name -> (transformers folder written by save_pretrained, the torch model)."""
    cache = {}

    def get(name):
        if name not in cache:
            model = torch_text_encoder(TINY[name])
            folder = tmp_path_factory.mktemp(f"clip_{name}")
            model.save_pretrained(folder)
            cache[name] = (folder, model)
        return cache[name]

    return get


def token_ids(eos: int) -> np.ndarray:
    """Two prompts of 77 tokens: BOS, words, EOS at positions 9 and 40, then padding (EOS, resp. 0).

    Words include ids 2 and values above EOS_OTHER, so the two pooling rules pick different positions.
    """
    rng = np.random.default_rng(1)
    ids = rng.integers(3, EOS_ARGMAX, size=(2, 77))
    ids[:, 0], ids[0, 3], ids[1, 5] = 0, 2, EOS_ARGMAX - 1
    if eos != EOS_ARGMAX:
        ids[ids == eos] = eos + 1
    ids[0, 9], ids[0, 10:] = eos, eos
    ids[1, 40], ids[1, 41:] = eos, 0
    return ids


def run_both(name, tiny_dir, dtype=jnp.float32, attention_mask=None):
    folder, torch_model = tiny_dir(name)
    raw = TINY[name]
    ids = token_ids(EOS_ARGMAX if raw["eos_token_id"] == 2 else raw["eos_token_id"])
    model, params = load_text_encoder(folder, dtype=dtype)
    kw = {} if attention_mask is None else {"attention_mask": jnp.asarray(attention_mask)}
    ours = jax.jit(lambda p, i, **k: model.apply({"params": p}, i, **k))(params, jnp.asarray(ids), **kw)
    tkw = {} if attention_mask is None else {"attention_mask": torch.from_numpy(attention_mask)}
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), output_hidden_states=True, **tkw)
        text = torch_model if isinstance(torch_model, TorchCLIPText) else torch_model.text_model
        pooled = text(torch.from_numpy(ids), **tkw).pooler_output
    return model, ours, ref, pooled, ids


def parity_figures(ours, ref, pooled):
    figs = {
        "last_hidden_state": rel_l2(ours.last_hidden_state, ref.last_hidden_state),
        "hidden_states[-2]": rel_l2(ours.hidden_states[-2], ref.hidden_states[-2]),
        "pooler_output": rel_l2(ours.pooler_output, pooled),
    }
    if ours.text_embeds is not None:
        figs["text_embeds"] = rel_l2(ours.text_embeds, ref.text_embeds)
    return figs


@pytest.mark.parametrize("name", list(TINY))
def test_float32_parity(name, tiny_dir):
    model, ours, ref, pooled, ids = run_both(name, tiny_dir)
    assert type(model).__name__ == TINY[name]["architectures"][0]
    assert len(ours.hidden_states) == len(ref.hidden_states) == TINY[name]["num_hidden_layers"] + 1
    for a, b in zip(ours.hidden_states, ref.hidden_states):
        assert rel_l2(a, b) <= 1e-5
    figs = parity_figures(ours, ref, pooled)
    print(name, "float32 rel L2:", {k: f"{v:.1e}" for k, v in figs.items()})
    assert max(figs.values()) <= 1e-5, figs
    assert ours.last_hidden_state.shape == (2, 77, 32) and ours.pooler_output.shape == (2, 32)
    if isinstance(model, CLIPTextModelWithProjection):
        assert ours.text_embeds.shape == (2, TINY[name]["projection_dim"])
    else:
        assert ours.text_embeds is None


def test_pooling_positions(tiny_dir):
    """eos_token_id=2: the first position of the largest id; otherwise the first EOS (the padding repeats it)."""
    ids = token_ids(EOS_OTHER)  # EOS 49 at 9 and 40, larger word ids before them
    for name, expected in (("g", np.argmax(ids, axis=-1)), ("g_eos", np.array([9, 40]))):
        model, params = load_text_encoder(tiny_dir(name)[0])
        out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
        for b in range(2):
            np.testing.assert_array_equal(
                np.asarray(out.pooler_output[b]), np.asarray(out.last_hidden_state[b, expected[b]])
            )
    assert list(np.argmax(ids, axis=-1)) != [9, 40]


@pytest.mark.parametrize("name", ["l", "g"])
def test_bfloat16_close(name, tiny_dir):
    _, ours, ref, pooled, _ = run_both(name, tiny_dir, dtype=jnp.bfloat16)
    assert ours.last_hidden_state.dtype == jnp.bfloat16
    figs = parity_figures(ours, ref, pooled)
    print(name, "bfloat16 rel L2:", {k: f"{v:.1e}" for k, v in figs.items()})
    assert max(figs.values()) <= 3e-2, figs


def test_attention_mask_parity(tiny_dir):
    mask = np.ones((2, 77), np.int64)
    mask[0, 10:], mask[1, 41:] = 0, 0  # right padding after each EOS
    _, ours, ref, pooled, _ = run_both("g_eos", tiny_dir, attention_mask=mask)
    _, unmasked, _, _, _ = run_both("g_eos", tiny_dir)
    assert rel_l2(ours.last_hidden_state, unmasked.last_hidden_state) > 1e-2  # the mask matters here
    figs = parity_figures(ours, ref, pooled)
    print("attention_mask float32 rel L2:", {k: f"{v:.1e}" for k, v in figs.items()})
    assert max(figs.values()) <= 1e-5, figs


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_activations_match_transformers(act):
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    ref = ACT2FN[act](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ACTIVATIONS[act](jnp.asarray(x))), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, count", [("text_encoder", 123_060_480), ("text_encoder_2", 694_659_840)])
def test_full_size_keys_and_shapes(name, count):
    raw = json.loads((SDXL / name / "config.json").read_text())
    with torch.device("meta"):
        reference = TORCH_CLASSES[raw["architectures"][0]](
            TorchConfig(**{k: v for k, v in raw.items() if k != "architectures"})
        )
    torch_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = {
        k: tuple(v.shape)
        for k, v in keymap.flatten(
            text_encoder_class(raw)(CLIPTextConfig.from_dict(raw)).abstract_params()
        ).items()
    }
    mapped = dict(text_encoder_key_map(k, s)[:2] for k, s in torch_shapes.items())
    assert sorted(set(mapped) - set(ours)) == []
    assert sorted(set(ours) - set(mapped)) == []
    assert {k: v for k, v in mapped.items() if ours[k] != v} == {}
    assert sum(int(np.prod(s)) for s in ours.values()) == count
    assert sum(int(np.prod(s)) for s in torch_shapes.values()) == count
    # the inverse map gives the (pre-transformers-5, text_model.-prefixed) key of every parameter
    prefixed = {
        (k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): s
        for k, s in torch_shapes.items()
    }
    assert {keymap.flax_to_torch(p, s)[:2] for p, s in ours.items()} == set(prefixed.items())


def flat_params(params):
    return {k: np.asarray(v) for k, v in keymap.flatten(params).items()}


def assert_same_params(a, b):
    a, b = flat_params(a), flat_params(b)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("name, dtype", [("l", "float32"), ("g", "bfloat16")])
def test_converter_round_trip(name, dtype, tiny_dir, tmp_path):
    folder, _ = tiny_dir(name)
    out = convert_text_encoder(folder, tmp_path / "out", dtype=dtype, progress=False)
    assert (out / "flax_params.safetensors").is_file()
    model_c, converted = load_text_encoder(out, dtype=dtype)
    model_s, direct = load_text_encoder(folder, dtype=dtype)
    assert type(model_c) is type(model_s) and model_c.config == model_s.config
    assert_same_params(converted, direct)


def test_legacy_prefix_position_ids_and_shards_load(tiny_dir, tmp_path):
    """Older checkpoints: `text_model.` prefix on CLIPTextModel keys, a position_ids buffer; sharded files."""
    folder, model = tiny_dir("l")
    _, direct = load_text_encoder(folder)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((folder / "config.json").read_text())
    tensors = {"text_model." + k: v for k, v in load_file(folder / "model.safetensors").items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(tensors, str(legacy / "model.safetensors"))
    _, params = load_text_encoder(legacy)
    assert_same_params(params, direct)

    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_same_params(load_text_encoder(tmp_path / "sharded")[1], direct)


def test_fp16_variant_loads(tiny_dir, tmp_path):
    folder, model = tiny_dir("g")
    half = torch_text_encoder(TINY["g"]).half()
    half.load_state_dict(model.state_dict())
    half.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "model.fp16.safetensors").is_file()
    _, params = load_text_encoder(tmp_path)  # no variant given: the one present is found
    direct = flat_params(load_text_encoder(folder)[1])
    expected = {k: v.astype(np.float16).astype(np.float32) for k, v in direct.items()}
    assert flat_params(params).keys() == expected.keys()
    for k, v in flat_params(params).items():
        np.testing.assert_array_equal(v, expected[k], err_msg=k)


def copy_folder(src: Path, dst: Path, **config_changes) -> Path:
    dst.mkdir()
    raw = dict(json.loads((src / "config.json").read_text()), **config_changes)
    (dst / "config.json").write_text(json.dumps(raw))
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return dst


def test_bad_inputs_give_clear_errors(tiny_dir, tmp_path):
    folder, _ = tiny_dir("l")
    with pytest.raises(ConfigError, match=r"architectures=\['CLIPVisionModel'\].*CLIPTextModel"):
        load_text_encoder(copy_folder(folder, tmp_path / "a", architectures=["CLIPVisionModel"]))
    with pytest.raises(ConfigError, match="hidden_act='swiglu'"):
        load_text_encoder(copy_folder(folder, tmp_path / "b", hidden_act="swiglu"))
    with pytest.raises(ConfigError, match="unknown CLIP text config field.*rope_theta"):
        load_text_encoder(copy_folder(folder, tmp_path / "c", rope_theta=1e4))
    with pytest.raises(CheckpointError, match="16 missing.*layers_2"):
        load_text_encoder(copy_folder(folder, tmp_path / "d", num_hidden_layers=3))
    with pytest.raises(CheckpointError, match="shape mismatches.*token_embedding"):
        load_text_encoder(copy_folder(folder, tmp_path / "e", vocab_size=101))
    truncated = copy_folder(folder, tmp_path / "f")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_text_encoder(truncated)
    empty = tmp_path / "g"
    empty.mkdir()
    (empty / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors.*text encoder"):
        load_text_encoder(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_text_encoder(tmp_path / "nowhere")


def test_config_from_sdxl_files_and_bad_calls():
    configs = {
        n: CLIPTextConfig.from_json(SDXL / n / "config.json") for n in ("text_encoder", "text_encoder_2")
    }
    assert (
        configs["text_encoder"].hidden_act == "quick_gelu" and configs["text_encoder_2"].hidden_size == 1280
    )
    assert CLIPTextConfig.from_dict(configs["text_encoder_2"].to_dict()) == configs["text_encoder_2"]
    with pytest.raises(ConfigError, match="model_type='clip'"):
        CLIPTextConfig.from_dict({"model_type": "clip"})
    with pytest.raises(ConfigError, match="not divisible"):
        CLIPTextConfig(hidden_size=30, num_attention_heads=4)
    model = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=10,
            max_position_embeddings=4,
        )
    )
    with pytest.raises(DistriFusionError, match="5 tokens but the text encoder has 4 positions"):
        model.abstract_params(seq_len=5)
