"""The GPU check (distrifusion_jax.tools.gpu_check) on a CPU: its dry run measures every part, the budget skips
what has not started, bad flags are one-line errors, and the profile summary follows the documented rules."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distrifusion_jax.tools import gpu_check
from helpers import FAST_COMPILE_FLAGS

ROOT = Path(__file__).parents[1]
SMALL, MEDIUM, LARGE = (f"unet_step@{size}" for size in gpu_check.DRY_SIZES)
PARTS = [SMALL, "ddim_loop", "compile_time", MEDIUM, "band_compute", "band_memory", "flops", "profile", LARGE]


def check_profile(p: dict) -> None:
    """A parsed profile: every category's share in [0, 1], together at most 1, the top ops slowest first."""
    assert Path(p["trace"]).is_file() and "parse_error" not in p, p
    assert list(p["shares"]) == list(gpu_check.CATEGORIES)
    assert all(0 <= share <= 1 for share in p["shares"].values()), p["shares"]
    assert sum(p["shares"].values()) <= 1 + 1e-9
    # the small UNet's convolutions, attention and GroupNorms are each found (XLA:CPU keeps their op names)
    assert min(p["shares"][c] for c in ("convolution", "attention", "groupnorm")) > 0, p["shares"]
    times = [t["ms_per_step"] for t in p["top_ops"]]
    assert 0 < len(times) <= gpu_check.TOP_OPS and times == sorted(times, reverse=True)
    assert p["ops_not_in_hlo"] == 0 and p["traced_ms_per_step"] > 0


@pytest.mark.slow
def test_dry_run_measures_every_part(tmp_path):
    """The whole dry run as a command (its own process: it turns on the persistent compilation cache)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE_FLAGS}
    done = subprocess.run(
        [sys.executable, "-m", "distrifusion_jax.tools.gpu_check", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == PARTS and all(p["status"] == "ok" for p in parts.values()), parts
    for name in (SMALL, MEDIUM, LARGE):
        rows = parts[name]["rows"]
        assert rows["cudnn"] == {"status": "unavailable on cpu"}
        assert all(rows[impl]["median_s"] > 0 and rows[impl]["finite"] for impl in ("xla", "chunked")), rows
    loop = parts["ddim_loop"]
    assert loop["steps"] == gpu_check.LOOP_STEPS and loop["per_step_ms"] > 0
    assert all(parts["compile_time"][label]["total_s"] > 0 for label in ("cold", "warm"))
    bands = parts["band_compute"]["rows"]
    assert [(r["size"], r["devices"]) for r in bands] == [
        (s, n) for s in gpu_check.DRY_SIZES for n in gpu_check.BAND_DEVICES
    ]
    assert all(r["status"] == "ok" and r["median_s"] > 0 for r in bands), bands
    memory = parts["band_memory"]
    assert memory["peak_bytes"] == memory["xla_memory_analysis"]["peak"] > 0  # no memory_stats on a CPU
    flops = parts["flops"]
    assert flops["peak_bf16_tflops"] is None and all(r["flops"] > 0 for r in flops["steps"].values())
    assert len(flops["bands"]) == len(bands) and all(r["flops"] > 0 for r in flops["bands"])
    # every timed step (two implementations per size), the loop and every band, each with its TFLOP/s
    achieved = report["achieved"]
    assert len(achieved) == 2 * len(gpu_check.DRY_SIZES) + 1 + len(bands)
    assert all(r["tflops_per_s"] > 0 and r["fraction_of_peak"] is None for r in achieved)
    check_profile(parts["profile"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} |" in md for name in PARTS) and "## Profile of the" in md
    assert all(f"] {name} ..." in done.stdout for name in PARTS)  # progress lines


def test_budget_skips_what_has_not_started(tmp_path, capsys):
    """With a 1 s budget the first measurement runs and every later one is recorded as skipped."""
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "1"]) == 0
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert list(parts) == PARTS
    rows = parts[SMALL]["rows"]
    assert parts[SMALL]["status"] == "ok" and rows["xla"]["status"] == "ok" and rows["xla"]["median_s"] > 0
    assert rows["chunked"] == {"status": gpu_check.SKIPPED}
    assert all(parts[name] == {"status": "skipped: budget"} for name in PARTS[1:]), parts
    md = (tmp_path / "gpu_check.md").read_text()
    assert f"| {SMALL} |" in md
    for name in PARTS[1:]:
        assert f"| {name} | {gpu_check.WHAT[name.split('@')[0]]} | skipped: budget |" in md
    assert "profile: skipped: budget" in capsys.readouterr().out


def test_profile_part_on_its_own(tmp_path):
    """The profile part alone (the dry run's is slow): a trace of the small UNet's step, summarised."""
    c = gpu_check.Check(gpu_check.build_parser().parse_args(["--dry-run", "--out", str(tmp_path)]))
    p = gpu_check.profile(c)
    assert p["size"] == gpu_check.DRY_SIZES[0] and p["attention"] == "xla"  # no step timed: the fallback
    check_profile(p)


MODULE = """HloModule m, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_conv (p0: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  %multiply.1 = f32[4]{0} multiply(%p0, %p0), metadata={op_name="f/blocks_0/norm/mul"}
  ROOT %convolution.2 = f32[4]{0} convolution(%multiply.1, %p0), metadata={op_name="f/blocks_0/conv/conv"}
}

%fused_norm (p1: f32[4]) -> f32[4] {
  %p1 = f32[4]{0} parameter(0)
  %multiply.3 = f32[4]{0} multiply(%p1, %p1), metadata={op_name="f/blocks_0/norm/mul"}
  ROOT %logistic.4 = f32[4]{0} logistic(%multiply.3), metadata={op_name="f/blocks_0/jit(silu)/logistic"}
}

ENTRY %main.9 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %conv_fusion = f32[4]{0} fusion(%p), kind=kOutput, calls=%fused_conv
  %norm_fusion = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_norm
  %custom-call.5 = (f32[4]{0}, u8[0]{0}) custom-call(%p), custom_call_target="__cudnn$fmhaSoftmax"
  %dot.6 = f32[4]{0} dot(%p, %p), metadata={op_name="f/blocks_0/attn1/vmap(BTNH,BSNH->BNTS)/dot_general"}
  %dot.7 = f32[4]{0} dot(%p, %p), metadata={op_name="f/blocks_0/attn1/to_q/dot_general"}
  %exponential.8 = f32[4]{0} exponential(%p), metadata={op_name="f/blocks_0/attn1/vmap()/exp"}
  %reduce.9 = f32[] reduce(%p, %p), dimensions={0}, to_apply=%add
  %copy.10 = f32[4]{0} copy(%p)
  ROOT %while.11 = f32[4]{0} while(%p), condition=%cond, body=%body
}
"""
# module paths of the model (what module_scopes reads off it): an Attention with a Dense, a GroupNorm
SCOPES = {
    ("blocks_0",): None,
    ("blocks_0", "attn1"): "attention",
    ("blocks_0", "attn1", "to_q"): None,
    ("blocks_0", "norm"): "groupnorm",
    ("blocks_0", "conv"): None,
}


def test_profile_categories_follow_the_rules():
    """A fusion takes its fused ops' first category (a convolution over the GroupNorm fused into it);
    attention is cuDNN's kernel or an Attention's own ops, not its projections; containers are not counted."""
    ops, computations = gpu_check.hlo_ops(MODULE)
    assert ops["custom-call.5"].target == "__cudnn$fmhaSoftmax" and ops["conv_fusion"].calls == "fused_conv"
    got = {name: gpu_check.category(name, ops, computations, SCOPES) for name in computations["main.9"]}
    assert got == {
        "p": "elementwise",
        "conv_fusion": "convolution",
        "norm_fusion": "groupnorm",
        "custom-call.5": "attention",
        "dot.6": "attention",
        "dot.7": "matmul",
        "exponential.8": "attention",
        "reduce.9": "other",
        "copy.10": "elementwise",
        "while.11": "other",
    }
    times = {"conv_fusion": 400, "norm_fusion": 100, "custom-call.5": 200, "dot.7": 100, "while.11": 10**6}
    summary = gpu_check.summarize({**times, "not-in-hlo.1": 200}, ops, computations, SCOPES, steps=2)
    assert summary["shares"] == {
        "convolution": 0.4,
        "matmul": 0.1,
        "attention": 0.2,
        "groupnorm": 0.1,
        "other": 0.2,
        "elementwise": 0.0,
    }
    assert summary["ops"] == 5 and summary["ops_not_in_hlo"] == 1
    assert summary["traced_ms_per_step"] == pytest.approx(1000 / 2 / 1e6)
    top = summary["top_ops"]
    assert top[0] == {
        "op": "conv_fusion",
        "category": "convolution",
        "ms_per_step": 400 / 2 / 1e6,
        "share": 0.4,
        "opcode": "fusion",
        "scope": "",  # the fusion instruction carries no op_name here
    }
    assert {t["op"] for t in top[1:3]} == {"custom-call.5", "not-in-hlo.1"} and len(top) == 5


def test_peak_by_device_kind():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756
    assert gpu_check.peak_tflops("NVIDIA H200") == 989
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert gpu_check.peak_tflops("NVIDIA H100 NVL") is None and gpu_check.peak_tflops("cpu") is None


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: --out"),
        (["--out", "x", "--budget-s", "0"], "0 must be at least 1"),
        (["--out", "x", "--repeats", "two"], "'two' is not a whole number"),
        (["--out", "x", "--dry-run", "--sizes", "64"], "unrecognized arguments: --sizes 64"),
    ],
)
def test_bad_flags_are_one_line_errors(capsys, argv, message):
    assert gpu_check.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert gpu_check.main(["--out", str(tmp_path / "file"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {tmp_path / 'file'} is a file: pass a folder (it is created if missing)"]
