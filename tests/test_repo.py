"""The README's commands are the ones CI and users run."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
    assert any("examples/quickstart.py" in b for b in blocks)


def test_architecture_map_matches_the_tree():
    """docs/architecture.md names every module of the package, and every path it names exists."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    layout = text[text.index("## Layout") : text.index("## Numerics")]
    named = set()
    for cell in re.findall(r"^\| (`[^|]*`) \|", layout, re.M):
        for path in re.findall(r"`([^`]*)`", cell):
            if "{" in path:  # weights/{files,unet}.py
                head, names, tail = re.match(r"(.*)\{(.*)\}(.*)", path).groups()
                paths = [head + n + tail for n in names.split(",")]
            else:
                paths = [path]
            for p in paths:
                found = [c for c in (p, f"distrifusion_jax/{p}") if (ROOT / c).exists()]
                assert found, f"docs/architecture.md names {p}, which does not exist"
                named.add(found[0].rstrip("/"))
    for module in (ROOT / "distrifusion_jax").glob("*.py"):
        if module.name not in ("__init__.py",):
            assert str(module.relative_to(ROOT)) in named, f"docs/architecture.md does not map {module.name}"
    for package in (ROOT / "distrifusion_jax").iterdir():
        if package.is_dir() and (package / "__init__.py").exists():
            assert any(n.startswith(str(package.relative_to(ROOT))) for n in named), package.name


def test_code_is_formatted_and_linted():
    """ruff (configured in pyproject.toml: line length 110, pyflakes, pycodestyle, import order) finds nothing."""
    for args in (["format", "--check", "."], ["check", "."]):
        run = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, f"ruff {' '.join(args)}:\n{run.stdout}{run.stderr}"
