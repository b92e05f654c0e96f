"""LoRA adapters fused into our weights equal diffusers' `load_lora_weights` + `fuse_lora`, and unfuse exactly."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from distrifusion_jax import keymap
from distrifusion_jax.errors import CheckpointError
from distrifusion_jax.models.presets import unet_preset
from distrifusion_jax.tools.random_pipeline import random_params_of, write_random_pipeline
from distrifusion_jax.weights.clip import text_encoder_key_map
from distrifusion_jax.weights.lora import COMPONENTS, fuse_lora, read_lora, unfuse_lora
from distrifusion_jax.weights.original_layout import Table, unet_rules

PRESET = "tiny-sdxl"
# the layers the test LoRAs adapt: attention projections, feed-forwards, transformer in/out projections,
# resnet and sampler convs (LoCon), time embedding projections; the text encoders' attention and MLP
UNET_TARGETS = re.compile(
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out|conv1|conv2|conv_shortcut"
    r"|time_emb_proj|samplers\.0\.conv)$"
)
TEXT_TARGETS = re.compile(r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
TOLERANCE = 1e-5


# ---- set-up ----
@pytest.fixture(scope="module")
def base():
    """Our float32 parameters of the tiny SDXL pipeline, {component: nested numpy tree}."""
    return {c: keymap.unflatten(random_params_of(PRESET, c)) for c in COMPONENTS}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return write_random_pipeline(tmp_path_factory.mktemp("sdxl"), PRESET, fmt="diffusers")


def targets(params: dict) -> dict:
    """{component: {torch module path: torch weight shape}} of the layers the test LoRAs adapt."""
    out = {}
    for component, tree in params.items():
        wanted = UNET_TARGETS if component == "unet" else TEXT_TARGETS
        for path, leaf in keymap.flatten(tree).items():
            if path.endswith("/kernel"):
                key, shape, _ = keymap.flax_to_torch(path, tuple(leaf.shape))
                module = key.removesuffix(".weight")
                if wanted.search(module):
                    out.setdefault(component, {})[module] = shape
    return out


def factors(rng, shape: tuple, rank: int):
    """(down, up) float32 for a weight of torch `shape`: linear [r, in] / [out, r], conv [r, in, kh, kw] /
    [out, r, 1, 1], scaled so that up @ down is about as large as the weight."""
    down = rng.standard_normal((rank,) + tuple(shape[1:])) / np.sqrt(np.prod(shape[1:]))
    up = rng.standard_normal((shape[0], rank) + (1,) * (len(shape) - 2)) / np.sqrt(rank)
    return down.astype(np.float32), up.astype(np.float32)


def kohya_file(path, params, seed=1, name=lambda component, module: module.replace(".", "_")):
    """A kohya LoRA (LoCon for the convs): linear rank 4 with alpha 3, convs rank 2 with alpha 5 (alpha != rank)."""
    rng, tensors = np.random.default_rng(seed), {}
    for component, layers in targets(params).items():
        for module, shape in layers.items():
            rank, alpha = (2, 5.0) if len(shape) == 4 else (4, 3.0)
            down, up = factors(rng, shape, rank)
            key = KOHYA[component] + name(component, module)
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
            tensors[f"{key}.alpha"] = np.asarray(alpha, np.float32)
    save_file(tensors, str(path))
    return path


def peft_file(path, params, seed=2):
    """A diffusers / peft LoRA (lora_A = down, lora_B = up, no alphas: alpha = rank), rank 3, linears only."""
    rng, tensors = np.random.default_rng(seed), {}
    for component, layers in targets(params).items():
        for module, shape in layers.items():
            if len(shape) == 2:
                down, up = factors(rng, shape, 3)
                tensors.update(
                    {f"{component}.{module}.lora_A.weight": down, f"{component}.{module}.lora_B.weight": up}
                )
    save_file(tensors, str(path))
    return path


def diffusers_fused(pipeline_dir, loras: list, scale: float) -> dict:
    """{component: {our Flax path: array}} of diffusers' pipeline after load_lora_weights + fuse_lora."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dir, torch_dtype=torch.float32)
    for k, lora in enumerate(loras):
        pipe.load_lora_weights(str(lora), adapter_name=f"lora{k}")
    pipe.set_adapters([f"lora{k}" for k in range(len(loras))])  # all active, weight 1
    pipe.fuse_lora(components=list(COMPONENTS), lora_scale=scale)
    out = {}
    for component in COMPONENTS:
        key_map = keymap.torch_to_flax if component == "unet" else text_encoder_key_map
        flat = {}
        for key, value in getattr(pipe, component).state_dict().items():
            if "lora_" in key or keymap.is_ignored(key):
                continue
            path, _, perm = key_map(key.replace(".base_layer.", "."), tuple(value.shape))
            array = value.detach().numpy()
            flat[path] = array.transpose(perm) if perm else array
        out[component] = flat
    return out


def errors(ours: dict, reference: dict, base: dict) -> tuple:
    """(largest relative error of a fused tensor, largest relative error of a LoRA's change, tensors changed)."""
    worst_weight, worst_delta, changed = 0.0, 0.0, 0
    for component, flat in reference.items():
        mine, before = keymap.flatten(ours[component]), keymap.flatten(base[component])
        assert sorted(mine) == sorted(flat)
        for path, ref in flat.items():
            ref, got, w = (np.asarray(a, np.float64) for a in (ref, mine[path], before[path]))
            worst_weight = max(worst_weight, np.linalg.norm(got - ref) / np.linalg.norm(ref))
            if np.array_equal(ref, w):
                assert np.array_equal(got, w), path  # what diffusers leaves alone, we leave alone
                continue
            changed += 1
            worst_delta = max(worst_delta, np.linalg.norm((got - w) - (ref - w)) / np.linalg.norm(ref - w))
    return worst_weight, worst_delta, changed


def bits(tree: dict) -> dict:
    return {k: np.asarray(v).tobytes() for k, v in keymap.flatten(tree).items()}


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---- parity with diffusers ----
@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_fused_weights_equal_diffusers(kind, base, pipeline_dir, tmp_path):
    path = (kohya_file if kind == "kohya" else peft_file)(tmp_path / "lora.safetensors", base)
    adapter = read_lora(path)
    assert adapter.format == ("kohya" if kind == "kohya" else "diffusers")
    ours, _ = fuse_lora(base, adapter, scale=0.7)
    weight, delta, changed = errors(ours, diffusers_fused(pipeline_dir, [path], 0.7), base)
    print(f"{kind}: {changed} tensors fused, relative error {weight:.1e} (of the change {delta:.1e})")
    assert changed == len(adapter.modules)
    assert weight <= TOLERANCE and delta <= TOLERANCE


def test_two_adapters_fused_in_sequence_equal_diffusers(base, pipeline_dir, tmp_path):
    first = kohya_file(tmp_path / "a.safetensors", base)
    second = peft_file(tmp_path / "b.safetensors", base)
    ours, undo = fuse_lora(base, read_lora(first), scale=0.5)
    ours, undo = fuse_lora(ours, read_lora(second), scale=0.5, undo=undo)
    weight, delta, _ = errors(ours, diffusers_fused(pipeline_dir, [first, second], 0.5), base)
    print(f"two adapters: relative error {weight:.1e} (of the change {delta:.1e})")
    assert weight <= TOLERANCE and delta <= TOLERANCE
    assert bits(unfuse_lora(ours, undo)["unet"]) == bits(base["unet"])  # one undo for both


# ---- our side alone ----
def test_original_layout_names_fuse_as_diffusers_names(base, tmp_path):
    """kohya's SDXL LoRAs name the UNet in the sgm layout (`input_blocks_4_1_...`): the same factors under those
    names fuse to the same bits."""
    table = Table(unet_rules(unet_preset(PRESET)))

    def sgm(component, module):
        if component != "unet":
            return module.replace(".", "_")
        return table.to_original(module + ".weight")[0].removesuffix(".weight").replace(".", "_")

    plain = read_lora(kohya_file(tmp_path / "plain.safetensors", base))
    original = read_lora(kohya_file(tmp_path / "sgm.safetensors", base, name=sgm))
    assert any(m.module.startswith("input_blocks_") for m in original.modules)
    fused = [fuse_lora(base, adapter, scale=1.3)[0] for adapter in (plain, original)]
    for component in COMPONENTS:
        assert bits(fused[0][component]) == bits(fused[1][component])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unfuse_restores_bit_for_bit(dtype, base, tmp_path):
    params = {c: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree) for c, tree in base.items()}
    adapter = read_lora(kohya_file(tmp_path / "lora.safetensors", base))
    fused, undo = fuse_lora(params, adapter, scale=1.0)
    changed = sum(len(v) for v in undo.values())
    assert changed == len(adapter.modules)  # only the changed leaves are kept
    for component, saved in undo.items():
        flat = keymap.flatten(fused[component])
        for path, leaf in saved.items():
            assert flat[path].dtype == dtype and flat[path].sharding == leaf.sharding
            assert not np.array_equal(np.asarray(flat[path]), np.asarray(leaf))
    restored = unfuse_lora(fused, undo)
    assert all(bits(restored[c]) == bits(params[c]) for c in COMPONENTS)


def test_fused_in_float32_then_cast(base, tmp_path):
    """bfloat16 parameters get the float32 sum rounded once, not a sum of rounded terms."""
    adapter = read_lora(peft_file(tmp_path / "lora.safetensors", base))
    half = {c: jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), tree) for c, tree in base.items()}
    fused_half = keymap.flatten(fuse_lora(half, adapter)[0]["unet"])
    fused_full = keymap.flatten(
        fuse_lora({c: jax.tree.map(lambda a: a.astype(np.float32), t) for c, t in half.items()}, adapter)[0][
            "unet"
        ]
    )
    for path, leaf in fused_half.items():
        assert leaf.dtype == ml_dtypes.bfloat16
        assert np.array_equal(leaf, fused_full[path].astype(ml_dtypes.bfloat16))


def test_alpha_keys_and_metadata_scale_diffusers_loras(base, tmp_path):
    """diffusers-named LoRAs with `.alpha` keys, or diffusers' saved LoraConfig metadata, scale by alpha / rank."""
    rng = np.random.default_rng(0)
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    down, up = factors(rng, (64, 64), 4)
    plain = {f"unet.{module}.lora.down.weight": down, f"unet.{module}.lora.up.weight": up}
    save_file(plain, str(tmp_path / "plain.safetensors"))
    save_file(
        dict(plain, **{f"unet.{module}.alpha": np.asarray(2.0, np.float32)}),
        str(tmp_path / "alpha.safetensors"),
    )
    save_file(
        plain,
        str(tmp_path / "meta.safetensors"),
        metadata={"lora_adapter_metadata": '{"unet.lora_alpha": 2, "unet.r": 4}'},
    )
    path = "down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel"
    change = {}
    for name in ("plain", "alpha", "meta"):
        fused = keymap.flatten(fuse_lora(base, read_lora(tmp_path / f"{name}.safetensors"))[0]["unet"])
        change[name] = fused[path] - keymap.flatten(base["unet"])[path]
    np.testing.assert_allclose(change["plain"], (up @ down).T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(change["alpha"], change["plain"] / 2, rtol=1e-5, atol=1e-7)  # W + d - W rounds
    np.testing.assert_array_equal(change["meta"], change["alpha"])


@pytest.mark.parametrize(
    "spelling",
    [
        "unet.{unet}.lora_A.default.weight",  # peft's state dict with the adapter's name
        "{unet}.lora_A.weight",  # a bare peft state dict of the UNet
        "unet.{unet}.lora_linear_layer.down.weight",
        "unet.{processor}.processor.to_q_lora.down.weight",  # diffusers' attention-processor LoRAs
        "text_encoder.{text}.lora.down.weight",
        "text_encoder.{bare_text}.lora_A.weight",  # transformers 5's CLIPTextModel: no `text_model.`
        "text_encoder.{processor_text}.to_q_lora.down.weight",
    ],
)
def test_older_diffusers_spellings(spelling, base, tmp_path):
    names = {
        "unet": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "processor": "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "text": "text_model.encoder.layers.0.self_attn.q_proj",
        "bare_text": "encoder.layers.0.self_attn.q_proj",
        "processor_text": "text_model.encoder.layers.0.self_attn",
    }
    key = spelling.format(**names)
    component, width = ("text_encoder", 32) if key.startswith("text_encoder") else ("unet", 64)
    down, up = factors(np.random.default_rng(0), (width, width), 2)
    up_key = key.replace("lora_A", "lora_B").replace("down.weight", "up.weight")
    save_file({key: down, up_key: up}, str(tmp_path / "l.safetensors"))
    _, undo = fuse_lora(base, read_lora(tmp_path / "l.safetensors"))
    expected = {
        "unet": "down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel",
        "text_encoder": "text_model/encoder/layers_0/self_attn/q_proj/kernel",
    }
    assert {c: list(v) for c, v in undo.items()} == {component: [expected[component]]}


# ---- errors: one line each, naming the key and the fix ----
def test_lora_for_layers_the_model_lacks(base, tmp_path):
    """An SD 1.5 LoRA: attention in down_blocks_0, which SDXL's first level does not have."""
    rng = np.random.default_rng(0)
    down, up = factors(rng, (32, 32), 4)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}, str(tmp_path / "sd15.safetensors")
    )
    with pytest.raises(CheckpointError) as e:
        fuse_lora(base, read_lora(tmp_path / "sd15.safetensors"))
    assert name in one_line(e) and "another base model" in str(e.value)


def test_rank_and_shape_mismatches(base, tmp_path):
    rng = np.random.default_rng(0)
    good = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    down, up = factors(rng, (64, 64), 4)
    wide_down, wide_up = factors(rng, (320, 320), 4)  # SD 1.5's width
    tensors = {
        f"unet.{good}.lora_A.weight": down,
        f"unet.{good}.lora_B.weight": up[:, :3],  # rank 4 down, rank 3 up
        "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": wide_down,
        "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": wide_up,
    }
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        fuse_lora(base, read_lora(tmp_path / "bad.safetensors"))
    message = one_line(e)
    assert f"unet.{good}" in message and "rank mismatch" in message
    assert "proj_in: LoRA [320, 320] vs layer [64, 64]" in message


def test_unreadable_and_unsupported_files(tmp_path):
    (tmp_path / "lora.pt").write_bytes(b"\x80\x04pickle")
    (tmp_path / "renamed.safetensors").write_bytes(b"\x80\x04pickle")
    rng = np.random.default_rng(0)
    down, up = factors(rng, (64, 64), 4)
    name = "lora_unet_down_blocks_1_attentions_0_proj_in"
    save_file(
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.dora_scale": up[:, 0]},
        str(tmp_path / "dora.safetensors"),
    )
    save_file({f"{name}.lora_down.weight": down}, str(tmp_path / "half.safetensors"))
    save_file({"model.diffusion_model.out.2.weight": down}, str(tmp_path / "model.safetensors"))
    expected = {
        "lora.pt": "never unpickled",
        "renamed.safetensors": "not a safetensors file",
        "dora.safetensors": "DoRA is not supported",
        "half.safetensors": f"without both a down and an up factor [{name}]",
        "model.safetensors": "not LoRA weights",
        "missing.safetensors": "does not exist",
    }
    for file, words in expected.items():
        with pytest.raises(CheckpointError) as e:
            read_lora(tmp_path / file)
        assert words in one_line(e), file


def test_lora_for_a_component_not_given(base, tmp_path):
    adapter = read_lora(peft_file(tmp_path / "lora.safetensors", base))
    with pytest.raises(CheckpointError) as e:
        fuse_lora({"unet": base["unet"]}, adapter)
    assert "text_encoder, text_encoder_2" in one_line(e)


# ---- the pipeline, `generate --lora` and `convert --lora` ----
def flat_equal(tree: dict, reference: dict) -> bool:
    a, b = keymap.flatten(tree), keymap.flatten(reference)
    return sorted(a) == sorted(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_pipeline_load_and_unload_lora(base, pipeline_dir, tmp_path):
    """load_lora fuses into the pipeline's own weights (no recompilation: they are the programs' arguments),
    stacks, and unload_lora gives back the loaded weights and image bit for bit."""
    import distrifusion_jax as dj

    pipe = dj.DistriSDXLPipeline.from_pretrained(
        pipeline_dir, dj.DistriConfig(64, 64, devices=2, warmup_steps=1), dtype=jnp.float32
    )
    call = lambda: pipe("a red cube", num_inference_steps=3, seed=1, output_type="np")
    plain = call()
    first, second = kohya_file(tmp_path / "a.safetensors", base), peft_file(tmp_path / "b.safetensors", base)
    pipe.load_lora(first, 0.7).load_lora(second, 0.3)
    want, undo = fuse_lora(base, read_lora(first), 0.7)
    want, _ = fuse_lora(want, read_lora(second), 0.3, undo)
    assert flat_equal(pipe.unet_params, want["unet"])
    assert flat_equal(pipe.prompt_encoder.params[1], want["text_encoder_2"])
    adapted = call()
    assert not adapted.timings["compiled"] and adapted.timings["programs_compiled"] == 0
    assert np.abs(adapted.images - plain.images).max() > 0.05  # the LoRA changes the image
    pipe.unload_lora()
    assert flat_equal(pipe.unet_params, base["unet"]) and flat_equal(
        pipe.prompt_encoder.params[0], base["text_encoder"]
    )
    np.testing.assert_array_equal(call().images, plain.images)


def test_generate_with_lora_and_refused_lora(base, pipeline_dir, tmp_path, monkeypatch, capsys):
    from distrifusion_jax import cli, pipeline

    good = kohya_file(tmp_path / "good.safetensors", base)
    args = ["generate", "--model", str(pipeline_dir), "--prompt", "x", "--height", "64", "--width", "64"]
    args += [
        "--steps",
        "2",
        "--devices",
        "1",
        "--dtype",
        "float32",
        "--compile-cache",
        "off",
        "--no-progress",
    ]
    assert cli.main(args + ["--lora", f"{good}:0.5", "--output", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").is_file()
    # a LoRA for another model: one line, exit 2, before any weight is read
    wide = {"lora_unet_conv_in.lora_down.weight": np.zeros((4, 9, 3, 3), np.float32)}
    wide["lora_unet_conv_in.lora_up.weight"] = np.zeros((320, 4, 1, 1), np.float32)
    save_file(wide, str(tmp_path / "other.safetensors"))

    def fail(*a, **k):
        raise AssertionError("weights loaded before the LoRA was checked")

    monkeypatch.setattr(pipeline.DistriPipeline, "from_pretrained", classmethod(fail))
    capsys.readouterr()
    rc = cli.main(args + ["--lora", str(tmp_path / "other.safetensors"), "--output", str(tmp_path / "b.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "conv_in" in err[0], err
    assert not (tmp_path / "b.png").exists()


def test_convert_with_lora(base, pipeline_dir, tmp_path):
    """`convert --lora` writes the fused weights: the same as loading the folder and fusing."""
    import json

    from distrifusion_jax.convert import convert
    from distrifusion_jax.weights import load_text_encoder, load_unet

    lora = kohya_file(tmp_path / "a.safetensors", base)
    out = convert(pipeline_dir, tmp_path / "out", progress=False, loras=[(lora, 0.7)])
    want, _ = fuse_lora(base, read_lora(lora), 0.7)
    assert flat_equal(load_unet(out / "unet")[1], want["unet"])
    assert flat_equal(load_text_encoder(out / "text_encoder_2")[1], want["text_encoder_2"])
    note = json.loads((out / "model_index.json").read_text())["_distrifusion_jax"]
    assert note["loras"] == [{"path": str(lora), "scale": 0.7}]
    with pytest.raises(CheckpointError) as e:  # checked before anything is converted
        convert(
            pipeline_dir, tmp_path / "out2", progress=False, loras=[(tmp_path / "missing.safetensors", 1.0)]
        )
    one_line(e)
    assert not (tmp_path / "out2").exists()
