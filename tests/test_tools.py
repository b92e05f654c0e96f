"""The measurement tools (distrifusion_jax.tools): every command parses, errors are one line, the scaling
tool's one-band emulation computes what a real band does, and the runtime imports none of them."""

import argparse
import ast
import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from distrifusion_jax.config import DistriConfig
from distrifusion_jax.denoise import Denoiser
from distrifusion_jax.errors import ConfigError
from distrifusion_jax.parallel import CFG, PATCH, STALE, PatchPlan
from distrifusion_jax.tools import scaling
from distrifusion_jax.tools.command import options_from
from distrifusion_jax.tools.emulate import EMULATED_MODES, BandPlan, band_step
from distrifusion_jax.tools.fmt import fmt_bytes
from helpers import micro_setup, rel_l2

ROOT = Path(__file__).parents[1]
COMMANDS = (
    "benchmark",
    "comm_report",
    "memory",
    "scaling",
    "stale_options",
    "decode_memory",
    "compile_time",
    "unet_benchmark",
    "gpu_check",
    "train_demo",
    "fidelity",
    "demo_grid",
    "text_probe",
)
HEIGHT, WIDTH = 128, 192  # as tests/test_patch_parallel.py: latents 16 x 24
EXACT = 1e-5


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_parses_help(name, capsys):
    main = importlib.import_module(f"distrifusion_jax.tools.{name}").main
    try:
        code = main(["--help"])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr().out
    assert code == 0 and out.startswith(f"usage: python -m distrifusion_jax.tools.{name}"), out[:200]


@pytest.mark.parametrize("name, options", [("train_demo", "TrainOptions"), ("fidelity", "FidelityOptions")])
def test_command_defaults_are_the_options_defaults(name, options):
    """The flags' defaults build the options dataclass's defaults: train_demo's --steps once defaulted to 4500
    while TrainOptions (and its --help) said 5500, so the documented command trained another recipe."""
    module = importlib.import_module(f"distrifusion_jax.tools.{name}")
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    cls = getattr(module, options)
    assert options_from(cls, p.parse_args(["--out", "x"])) == cls(out="x")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["measure", "--mode", "full_sync"], "mode 'full_sync' (displaced step): one band is emulated only"),
        (
            ["measure", "--device-counts", "2", "3"],
            "--device-counts 3: the CFG split needs an even device count",
        ),
        (["estimate", "m.json", "c.json", "--mode", "sync_gn"], "mode 'sync_gn'"),
        (
            ["measure", "--devices", "2"],
            "unrecognized arguments: --devices",
        ),  # the sweep flag is --device-counts
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, message):
    """Checked before any weight is made: one line on stderr, exit status 2."""
    assert scaling.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_band_plan_refuses_synchronous_exchanges():
    assert EMULATED_MODES == ("corrected_async_gn", "stale_gn", "separate_gn", "no_sync")
    for mode in ("sync_gn", "full_sync"):
        with pytest.raises(ConfigError, match=f"mode '{mode}'"):
            BandPlan(mode=mode)
    with pytest.raises(ConfigError, match="sync step"):
        BandPlan("sync")
    with pytest.raises(ConfigError, match="n_bands=1"):
        BandPlan(n_bands=1)


def test_emulated_band_computes_what_the_real_band_does():
    """BandPlan (the scaling tool's band of a displaced step, one device, no mesh) gives band 0's real result,
    from band 0's state, and leaves the state as it was (it exchanges nothing)."""
    unet, params, (latents, ehs, added), sched = micro_setup(HEIGHT, WIDTH)
    x = latents.at[:, HEIGHT // 16].set(
        0.0
    )  # band 1's first row: conv_in's exact halo, which emulation zeroes
    ehs1, added1 = ehs[1:], {k: v[1:] for k, v in added.items()}
    d = Denoiser(unet, DistriConfig(HEIGHT, WIDTH, devices=2, do_classifier_free_guidance=False), sched, 4)
    sync, disp = (
        d.model(PatchPlan("sync", "corrected_async_gn")),
        d.model(PatchPlan("displaced", "corrected_async_gn")),
    )
    t = jnp.float32(300.0)

    def f(params, x):
        _, state = d.eps(sync, params, None, x, t, ehs1, added1)
        eps, _ = d.eps(disp, params, state, x, t, ehs1, added1)
        return eps, state

    both = (CFG, PATCH)  # the cfg axis has size 1 here; the state is typed as varying over it
    eps, state = jax.jit(
        jax.shard_map(f, mesh=d.mesh, in_specs=(P(), P(None, PATCH)), out_specs=(P(None, both), P(both)))
    )(params, x)
    band0_state = jax.tree.map(lambda a: a[: a.shape[0] // 2], state)  # device 0's slice of the stacked state
    band, rows = unet.clone(parallel=BandPlan(n_bands=2)), x[:, : HEIGHT // 16]
    out, new = jax.jit(
        lambda p, s, r: band.apply({"params": p, STALE: s}, r, t, ehs1, added1, mutable=[STALE])
    )(params, band0_state, rows)
    assert rel_l2(out, np.asarray(eps)[:, : HEIGHT // 16]) <= EXACT
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new[STALE]), jax.tree.leaves(band0_state))
    )


@pytest.mark.parametrize("options", [{}, dict(mode="no_sync", stale_kv="hidden", stale_kv_dtype="int8")])
def test_emulated_band_keeps_the_real_bands_state(options):
    """The scaling tool's state (zeros of these shapes) is what a device keeps in a real run: same leaves, shapes
    and dtypes as band 0's slice of the loop's state (traced only)."""
    unet, params, (latents, ehs, added), sched = micro_setup(HEIGHT, WIDTH)
    d = Denoiser(unet, DistriConfig(HEIGHT, WIDTH, devices=4, split_batch=False, **options), sched, 4)
    init = jax.shard_map(
        lambda p, x, e, a: d.initial_stale(d.model(d.plan("sync")), p, x, e, a),
        mesh=d.mesh,
        in_specs=(P(), P(None, PATCH), P(), P()),
        out_specs=P(PATCH),
    )
    real = jax.eval_shape(init, params, latents, ehs, added)
    _, state_shapes = band_step(unet, 4, **options)
    rows = jnp.concatenate([latents[:, : HEIGHT // 32]] * 2)  # band 0 of 4, both guidance branches (no split)
    band = state_shapes(params, rows, jnp.float32(300.0), ehs, added)[STALE]
    shape = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    per_device = jax.tree.map(lambda a: jax.ShapeDtypeStruct((a.shape[0] // 4,) + a.shape[1:], a.dtype), real)
    assert jax.tree.leaves(band) and shape(band) == shape(per_device)  # the loop stacks the devices' states
    if options:  # the int8 hidden tokens and their scales
        assert {a.dtype for a in jax.tree.leaves(band)} >= {jnp.dtype(jnp.int8), jnp.dtype(jnp.float32)}


def test_fmt_bytes():
    assert [fmt_bytes(n) for n in (None, 0, 999, 1500, 2.5e6, 123.4e9, 1234e9)] == [
        "-",
        "0 B",
        "999 B",
        "1.5 kB",
        "2.5 MB",
        "123 GB",
        "1234 GB",
    ]


def imports_of(path: Path):
    """Module names a file imports (relative ones resolved against distrifusion_jax)."""
    package = ["distrifusion_jax"] + list(path.relative_to(ROOT / "distrifusion_jax").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield from ([module] if node.module else [f"{module}.{a.name}" for a in node.names])
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_the_runtime_imports_no_tool():
    """Measurement lives in tools/, above the runtime; only the CLI (the top layer) registers the benchmark."""
    users = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "distrifusion_jax").rglob("*.py")
        if "tools" not in p.parts and any(m.startswith("distrifusion_jax.tools") for m in imports_of(p))
    )
    assert users == ["distrifusion_jax/cli.py"]
    assert not hasattr(PatchPlan("displaced"), "emulate")  # the runtime carries no measurement-only switch


def test_no_sys_path_manipulation():
    files = [*ROOT.joinpath("distrifusion_jax").rglob("*.py"), *ROOT.joinpath("examples").rglob("*.py")]
    assert [str(p) for p in files if "sys.path" in p.read_text()] == []
