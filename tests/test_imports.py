"""Imports run one way: the package's modules form layers, with no cycle even through imports inside functions."""

import ast
import inspect
from pathlib import Path

from distrifusion_jax.nn.plan import LayerPlan
from distrifusion_jax.parallel import PatchPlan
from distrifusion_jax.tools.emulate import BandPlan

PACKAGE = Path(__file__).parents[1] / "distrifusion_jax"

# Each module or subpackage (by its first name under distrifusion_jax) in its layer; a module imports only
# from lower layers and from its own subpackage. "" is the package's __init__ (re-exports the public API).
LAYERS = [
    {"errors"},
    {"cache"},
    {"config", "keymap", "tokenizer", "distributed", "prompts"},
    {"parallel", "nn", "schedulers"},  # parallel/ depends on nothing above nn/
    {"models"},
    {"weights", "tensor_parallel", "decode", "arguments"},
    {"convert", "denoise", "preflight", "flags"},
    {"guards", "workflows"},
    {"pipeline"},
    {"generate_checks"},
    {"", "generate", "tools"},  # tools: measurement, reports, the random pipeline writer
    {"cli"},
    {"__main__"},
]
# Imports inside functions, allowed only where they keep the command line's start fast (no JAX before the
# arguments are checked); they still count as edges above, so they cannot hide a cycle.
LAZY = {"cli", "generate", "generate_checks"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(imported module under distrifusion_jax, inside a function?) for each import of the package."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    tree = ast.parse(path.read_text())
    nested = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            targets = [".".join(base + [a.name]) for a in node.names]
            targets = [
                t
                if (PACKAGE / t.replace(".", "/")).with_suffix(".py").exists()
                or (PACKAGE / t.replace(".", "/")).is_dir()
                else ".".join(base)
                for t in targets
            ]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            module = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            targets = [
                m.removeprefix("distrifusion_jax").lstrip(".")
                for m in module
                if m == "distrifusion_jax" or m.startswith("distrifusion_jax.")
            ]
        else:
            continue
        for t in targets:
            yield t, id(node) in nested


def graph() -> dict:
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        edges[module_name(path)] = {(t, lazy) for t, lazy in imports(path) if t != module_name(path)}
    return edges


def layer(name: str) -> int:
    group = name.split(".")[0]
    return next(i for i, members in enumerate(LAYERS) if group in members)


def test_every_module_has_a_layer():
    for name in graph():
        layer(name)


def test_imports_point_down_the_layers():
    wrong = []
    for name, targets in graph().items():
        for target, _ in targets:
            same_package = target.split(".")[0] == name.split(".")[0]
            if not same_package and layer(target) >= layer(name):
                wrong.append(f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def find_cycle(edges: dict):
    """A cycle in {node: targets} as a list of nodes, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    return next((c for node in sorted(edges) if node not in state and (c := visit(node))), None)


def test_no_cycle_even_through_function_level_imports():
    cycle = find_cycle({name: {t for t, _ in targets} for name, targets in graph().items()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_function_level_imports_only_where_the_command_line_starts():
    lazy = sorted(
        f"{name} imports {t} inside a function"
        for name, targets in graph().items()
        for t, inside in targets
        if inside and name.split(".")[0] not in LAZY
    )
    assert not lazy, "\n".join(lazy)


def test_the_checks_can_fail():
    """A made-up cycle is found, and the layers rank parallel/ and models/ below what uses them."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("parallel.plan") < layer("denoise") and layer("models.unet") < layer("weights.unet")
    assert layer("tools.benchmark") > layer("pipeline")


def test_plans_implement_the_layer_hooks():
    """PatchPlan (and the tools' one-band plan) offer exactly the hooks nn/'s LayerPlan declares."""
    hooks = [n for n, v in vars(LayerPlan).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert sorted(hooks) == ["group_norm_stats", "pad_rows", "self_attention_kv"]
    for plan in (PatchPlan, BandPlan):
        for hook in hooks:
            params = list(inspect.signature(getattr(plan, hook)).parameters)
            assert params == list(inspect.signature(getattr(LayerPlan, hook)).parameters), (plan, hook)
