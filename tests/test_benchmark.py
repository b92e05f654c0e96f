"""The benchmark tool on fake CPU devices: every configuration measured, ratios, the overhead, one-line errors."""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from distrifusion_jax import cli
from distrifusion_jax.config import DistriConfig
from distrifusion_jax.errors import DistriFusionError
from distrifusion_jax.tools import benchmark
from distrifusion_jax.tools.bench_options import BenchmarkOptions

MEASURED = ("single", "full_sync", "displaced", "naive_patch")  # "tensor" too where DistriConfig accepts it
SMALL = (
    "--random",
    "tiny",
    "--height",
    64,
    "--steps",
    2,
    "--warmup-steps",
    0,
    "--dtype",
    "float32",
    "--repeats",
    2,
)


def run_cli(*args):
    # tests write nothing to the user's cache; the XLA flags of conftest.py (fast compiles) pass down
    env = dict(os.environ, DISTRIFUSION_JAX_CACHE="off")
    return subprocess.run(
        [sys.executable, "-m", "distrifusion_jax", "benchmark", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One CLI run on 4 fake devices (mesh 2x2), 2 steps, with the overhead: (process, JSON report)."""
    path = tmp_path_factory.mktemp("benchmark") / "report.json"
    r = run_cli(*SMALL, "--devices", 4, "--overhead", "--json", path)
    assert r.returncode == 0, r.stderr
    return r, json.loads(path.read_text())


def numbers(tree):
    """Every number in a JSON tree (booleans are not numbers here)."""
    if isinstance(tree, dict):
        for v in tree.values():
            yield from numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def test_every_configuration_is_measured(run):
    _, report = run
    configs = report["configs"]
    assert list(configs) == list(benchmark.CONFIGS)
    present = [n for n in benchmark.CONFIGS if "skipped" not in configs[n]]
    assert set(MEASURED) <= set(present), configs
    assert "skipped" not in configs["tensor"] or configs["tensor"]["skipped"]  # a reason where it is skipped
    for name in present:
        r = configs[name]
        values = list(numbers({k: v for k, v in r.items() if k != "warmup_steps"}))  # a setting, 0 here
        assert values and all(math.isfinite(v) and v > 0 for v in values), (name, r)
        for key in ("compile_s", "first_call_s", "peak_bytes", "program_bytes"):
            assert r[key] > 0, (name, key)
        assert r["step_ms"]["min"] <= r["step_ms"]["median"] <= r["step_ms"]["max"]
        assert r["e2e_decode_s"]["repeats"] == r["e2e_s"]["repeats"] == 2
        assert r["peak_source"] == "memory_analysis"  # the CPU backend reports no memory_stats
        assert (r["devices"], r["mesh"]) == ((1, "1") if name == "single" else (4, "2x2"))
    assert report["memory_source"] == "memory_analysis" and report["vae_decode_s"]["median_s"] > 0
    assert report["unet_parameters"] > 0 and "no text encoders" in report["inputs"]


def test_ratios_are_against_single(run):
    _, report = run
    assert report["baseline"] == "single"
    base = report["configs"]["single"]
    assert base["vs_baseline"]["step_speedup"] == 1.0
    for name, r in report["configs"].items():
        if "skipped" in r:
            continue
        v = r["vs_baseline"]
        assert v["step_speedup"] == pytest.approx(base["step_ms"]["median"] / r["step_ms"]["median"])
        e2e = base["e2e_decode_s"]["median_s"] / r["e2e_decode_s"]["median_s"]
        assert v["e2e_decode_speedup"] == pytest.approx(e2e)
        assert v["memory_ratio"] == pytest.approx(r["peak_bytes"] / base["peak_bytes"])


def test_overhead_ratio(run):
    _, report = run
    o = report["overhead"]
    assert (o["devices"], o["mesh"]) == (4, "2x2")
    assert o["ratio"] == pytest.approx(
        o["displaced"]["step_ms"]["median"] / o["naive_patch"]["step_ms"]["median"]
    )
    assert all(math.isfinite(v) and v > 0 for v in numbers(o))


def test_the_table_is_printed(run):
    r, report = run
    assert "config" in r.stdout and "speedup" in r.stdout and "baseline: single" in r.stdout
    for name in MEASURED:
        assert f"\n{name} " in r.stdout
    assert "displaced-step overhead" in r.stdout and f"= {report['overhead']['ratio']:.3f}" in r.stdout
    assert "Traceback" not in r.stderr


def test_size_that_does_not_split_is_one_line_exit_2():
    r = run_cli("--random", "tiny", "--height", 72, "--devices", 4)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()
    # the single-device configuration is checked first: 9 latent rows do not go down the UNet's levels
    assert len(last) == 1 and last[0].startswith("error: height=72") and "must be divisible by" in last[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--random", "tiny", "--height", 100], "height=100 must be a positive multiple of 8"),
        (["--random", "tiny", "--devices", 3], "the CFG split needs an even number of devices, got 3"),
        (["--random", "tiny", "--configs", "single,pipeline"], "--configs pipeline: choose from"),
        (["--random", "tiny", "--configs", "none"], "'none' only with --overhead"),
        (["--random", "tiny", "--steps", 0], "--steps 0: must be at least 1"),
        (["--random", "huge"], "invalid choice: 'huge'"),
        (["--height", 64], "one of the arguments --model --random is required"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, args, message):
    jax.devices()  # JAX has started: --devices cannot change this process's fake device count
    try:
        code = cli.main(["benchmark", *map(str, args)])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_dry_run_lowers_without_weights(capsys, tmp_path):
    path = tmp_path / "dry.json"
    assert (
        cli.main(["benchmark", *map(str, SMALL), "--configs", "displaced", "--dry-run", "--json", str(path)])
        == 0
    )
    assert "displaced     8   2x4  lowered in" in capsys.readouterr().out
    r = json.loads(path.read_text())["configs"]["displaced"]
    assert r["lowered"] and (r["devices"], r["mesh"]) == (8, "2x4")


# ---- the options object ----
def parsed(*args) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    benchmark.add_arguments(p)
    return p.parse_args([str(a) for a in args])


def test_options_from_the_command_line_equal_those_built_in_python():
    args = parsed(
        *SMALL, "--devices", 4, "--overhead", "--configs", "single,displaced", "--stale-kv", "hidden"
    )
    built = BenchmarkOptions(
        random="tiny",
        distri=DistriConfig(64, 64, devices=4, warmup_steps=0, stale_kv="hidden"),
        steps=2,
        dtype="float32",
        repeats=2,
        overhead=True,
        configs=("single", "displaced"),
    )
    assert BenchmarkOptions.from_args(args) == built
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.steps = 3


def test_options_defaults():
    """The image size follows the model (256 for the tiny one, SDXL's 1024), width follows height."""
    assert (BenchmarkOptions(random="tiny").height, BenchmarkOptions(random="sdxl").width) == (256, 1024)
    o = BenchmarkOptions.from_args(parsed("--random", "sdxl", "--height", 2048))
    assert (o.height, o.width, o.configs, o.distri.devices) == (2048, 2048, benchmark.CONFIGS, None)
    assert BenchmarkOptions(random="tiny", configs="none", overhead=True).configs == ()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(), "one of --model (a pipeline) and --random (random weights) is required"),
        (
            dict(model="x", random="tiny"),
            "one of --model (a pipeline) and --random (random weights) is required",
        ),
        (dict(random="huge"), "--random huge: choose from sdxl, tiny"),
        (dict(random="tiny", steps=0), "--steps 0: must be at least 1"),
        (dict(random="tiny", repeats=2.5), "--repeats 2.5: must be a whole number"),
        (dict(random="tiny", batch=True), "--batch True: must be a whole number"),
        (dict(random="tiny", configs=("single", "pipeline")), "--configs pipeline: choose from"),
        (dict(random="tiny", configs="none"), "'none' only with --overhead"),
        (dict(random="tiny", dtype="float64"), "--dtype float64: choose from float32, bfloat16, float16"),
        (dict(random="tiny", vae_dtype="int8"), "--vae-dtype int8: choose from"),
        (dict(random="tiny", scheduler="pndm"), "--scheduler pndm: choose from ddim, euler, dpm-solver"),
        (dict(random="tiny", seed=-1), "--seed -1: pass a whole number 0 <= seed < 2^63"),
        (dict(random="tiny", distri=(64, 64)), "distri=(64, 64): pass a DistriConfig"),
    ],
)
def test_options_are_checked_on_construction(fields, message):
    with pytest.raises(DistriFusionError) as e:
        BenchmarkOptions(**fields)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_options_check_the_json_path(tmp_path):
    with pytest.raises(DistriFusionError, match="does not exist; create it first"):
        BenchmarkOptions(random="tiny", json=str(tmp_path / "missing" / "r.json"))
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(DistriFusionError, match="already exists; pass --overwrite"):
        BenchmarkOptions(random="tiny", json=str(tmp_path / "old.json"))
    BenchmarkOptions(random="tiny", json=str(tmp_path / "old.json"), overwrite=True)
