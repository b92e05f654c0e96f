"""The fidelity tool (the paper's tables: PSNR and SSIM vs one device) and the text-encoder probe.

SSIM equals a plain loop over windows; the tool runs end to end on a tiny random pipeline and resumes
without recomputing; the probe finds a linear signal and not noise.
"""

import json

import numpy as np
import pytest

from distrifusion_jax.tools import demo_grid, fidelity, text_probe
from distrifusion_jax.tools.random_pipeline import write_random_pipeline


def _ssim_by_windows(a, b):
    """SSIM the slow, obvious way: every 11x11 window, Gaussian weights, per channel, then the mean."""
    g = fidelity._gaussian_window()
    w = np.outer(g, g)
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ch in range(a.shape[-1]):
        for y in range(a.shape[0] - 10):
            for x in range(a.shape[1] - 10):
                pa, pb = a[y : y + 11, x : x + 11, ch], b[y : y + 11, x : x + 11, ch]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
                cov = (w * pa * pb).sum() - ma * mb
                values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return np.mean(values)


def test_ssim_and_psnr_against_plain_computations():
    rng = np.random.default_rng(0)
    a = rng.random((2, 16, 18, 3))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    got = fidelity.ssim(a, b)
    want = [_ssim_by_windows(a[i], b[i]) for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=2e-4)
    np.testing.assert_allclose(fidelity.ssim(a, a), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        fidelity.psnr(a, b), [-10 * np.log10(np.mean((a[i] - b[i]) ** 2)) for i in range(2)]
    )
    assert np.isinf(fidelity.psnr(a, a)).all()


def test_the_tables_measure_each_distinct_run_once():
    """Rows shared between tables (DDIM half steps, the default at the largest count) have one key."""
    todo = fidelity.cases(fidelity.TABLES, (2, 4, 8))
    keys = {c.key for c in todo}
    assert len(todo) == 37 and len(keys) == 32
    assert {c.reference.key for c in todo} == {
        "ddim/full/1/",
        "ddim/half/1/",
        "euler/half/1/",
        "dpm-solver/half/1/",
    }


@pytest.mark.slow
def test_the_fidelity_command_runs_end_to_end_and_resumes(tmp_path):
    """Table 1 on a tiny random pipeline, 2 devices, 2 prompts, 4 steps (warmup 4: every step synchronous, so
    DistriFusion equals one device up to float32 rounding: 59.3 dB, against 13-14 dB for naive patches), then
    the same command again: nothing is recomputed; other settings into the same folder are refused."""
    model = write_random_pipeline(tmp_path / "model", seed=0)
    args = ["--out", tmp_path / "fid", "--model", model, "--prompts", 2, "--steps", 4, "--size", 64]
    args += ["--batch", 2, "--device-counts", 2, "--tables", "table1"]
    assert fidelity.main([str(a) for a in args]) == 0
    results = json.loads((tmp_path / "fid" / "results.json").read_text())
    cases = results["cases"]
    assert len(cases) == 5  # 2 DistriFusion (with and without the CFG split) + 3 naive
    for key, entry in cases.items():
        assert len(entry["psnr"]) == 2 and len(entry["ssim"]) == 2
        if "naive_patch" in key:
            assert max(entry["psnr"]) < 30, (key, entry["psnr"])
        else:  # all steps synchronous: equal to one device up to rounding
            assert min(entry["psnr"]) > 50, (key, entry["psnr"])
    ref = results["references"]["ddim/full/1/"]
    assert ref["n"] == 2 and 0 <= ref["agree"] <= 2
    tables = (tmp_path / "fid" / "tables.md").read_text()
    assert "naive patches (alternate), 2 devices" in tables and "(not yet run)" not in tables
    assert (tmp_path / "fid" / "samples.png").is_file()
    before = (tmp_path / "fid" / "results.json").stat().st_mtime_ns
    assert fidelity.main([str(a) for a in args]) == 0
    assert (tmp_path / "fid" / "results.json").stat().st_mtime_ns == before  # resumed: nothing to do
    other = ["--out", tmp_path / "fid", "--model", model, "--prompts", 3, "--steps", 4, "--size", 64]
    assert fidelity.main([str(a) for a in other + ["--device-counts", 2]]) == 2  # other settings: refused


def test_the_text_probe_finds_a_linear_signal_and_not_noise():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 20))
    signal = np.argmax(x[:, :4], 1)
    assert text_probe.ridge_accuracy(x, signal, 4, 400) > 0.8  # chance: 0.25
    assert text_probe.ridge_accuracy(x, rng.integers(0, 4, 600), 4, 400) < 0.45


def test_the_text_probe_runs_on_a_pipeline(tmp_path):
    results = text_probe.probe(str(write_random_pipeline(tmp_path / "m", seed=0)), 90)
    assert len(results) == 4 and all(0 <= c <= 1 and 0 <= p <= 1 for c, p in results.values())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tables", "bogus"], "--tables bogus: unknown"),
        (["--device-counts", "64"], "JAX sees"),
        (["--device-counts", "2", "3"], "does not split into 3 patches"),  # odd: refused before any run
    ],
)
def test_fidelity_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    assert fidelity.main(["--out", str(tmp_path / "f"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_the_grid_refuses_a_layout_the_model_cannot_split_before_any_run(tmp_path, capsys):
    assert demo_grid.main(["--out", str(tmp_path / "g.png"), "--device-counts", "3"]) == 2
    assert "does not split into 3 patches" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
