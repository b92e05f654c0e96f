"""The memory report (tools/memory.py) on the tiny models: img2img's row-sharded VAE encode runs end to end and
its memory falls with the devices; the refine pass's loop takes what the text-to-image loop takes."""

import json

import pytest

from distrifusion_jax.tools import memory


def test_tiny_img2img_encode_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = [
        "--tiny",
        "--img2img",
        "--no-denoise",
        "--no-decode",
        "--sizes",
        "64",
        "--device-counts",
        "1",
        "4",
    ]
    assert memory.main(argv + ["--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["devices"] for r in rows] == [1, 4] and all(
        set(r) == {"size", "devices", "encode", "compile_s"} for r in rows
    )
    one, four = (r["encode"]["temp"] for r in rows)
    assert one > 2 * four > 0  # row-sharded: each device holds its band's activations
    assert report["meta"]["first_step"] == 35 and report["meta"]["machine"]
    assert "encode: temp   peak" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_run_with_every_part(tmp_path):
    """The refine loop, the encode and the decode of each device count, in MB."""
    out = tmp_path / "m.json"
    argv = ["--tiny", "--img2img", "--sizes", "64", "--device-counts", "1", "2", "4", "--json", str(out)]
    assert memory.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert all(r[k]["peak"] > r[k]["temp"] > 0 for r in rows for k in ("refine", "encode", "decode"))
    assert [r["refine"]["stale"] > 0 for r in rows] == [False, False, True]  # 4 devices: 2 bands per half


@pytest.mark.slow
def test_refine_loop_takes_the_text_to_image_loops_memory():
    """The refine runs the same programs from a later step: its loop's memory is the text-to-image loop's."""
    args = memory.build_parser().parse_args(["--tiny", "--img2img"])  # 15 of 50 steps: first step 35
    unet, _, params, _, _ = memory.models(args)
    refine = memory.denoise_memory(unet, params, 64, 4, args, first_step=35)
    text_to_image = memory.denoise_memory(unet, params, 64, 4, args)
    assert refine["stale"] == text_to_image["stale"] > 0
    assert refine["peak"] == pytest.approx(text_to_image["peak"], rel=0.01)
