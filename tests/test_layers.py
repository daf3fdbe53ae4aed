"""The package's layering, read from its source: a module imports only from its own layer or the
ones below it (lazy imports inside functions count too)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lcrun"

# Bottom to top. Why this order: kernels are pure compute; the planner is plain Python over numbers;
# offload moves pages by the plan; the runtime runs the model over them; construct builds a run from
# the settings (spec -> config -> plan -> cache); api is the LLM class over it; profiling, eval, serve
# and the CLI drive runs built by construct and api.
LAYERS = [
    {"errors", "units", "ranges", "progress", "exit_signals"},  # leaf modules: no lcrun imports but each other
    {"config"},
    {"kernels"},
    {"planner"},
    {"offload"},
    {"runtime"},
    {"construct"},
    {"api"},
    {"profiling"},
    {"eval"},
    {"serve"},
    {"cli"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}
NO_TORCH = {"planner"}  # plain Python: plans for a GPU from any machine, testable without torch


def _unit(module: str) -> str | None:
    """lcrun.runtime.tiered.cache -> runtime; lcrun.units -> units; lcrun -> None (the facade)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append((".".join(parts), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
    return found


def test_every_module_has_a_layer():
    units = {_unit(m) for m, _ in _modules()} - {None}
    assert units <= set(LEVEL), f"put {sorted(units - set(LEVEL))} in a layer of LAYERS (tests/test_layers.py)"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for module, path in _modules():
        unit = _unit(module)
        if unit is None:
            continue  # lcrun/__init__.py: the public facade (LLM, LcrunConfig) re-exports from above
        for line, target in _imports(module, path):
            if target.split(".")[0] != "lcrun" or _unit(target) is None:
                continue
            if LEVEL[_unit(target)] > LEVEL[unit]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({unit}) imports {target}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_planner_is_plain_python_and_the_package_needs_no_checkout():
    bad = []
    for module, path in _modules():
        for line, target in _imports(module, path):
            top = target.split(".")[0]
            if _unit(module) in NO_TORCH and top in ("torch", "triton"):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} (the planner is plain Python)")
            if top == "perf":  # perf/ is not installed: `lcrun eval` must work after `pip install .`
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} (not in the package)")
        if "sys.path" in path.read_text():
            bad.append(f"{path.relative_to(PACKAGE.parent)} edits sys.path")
    assert not bad, "\n".join(bad)


def test_the_checks_see_an_upward_import(tmp_path):
    """The reader itself: a relative import from runtime into profiling resolves and is caught."""
    path = tmp_path / "generate.py"
    path.write_text("def f():\n    from ..profiling import bench\n")
    (line, target), = _imports("lcrun.runtime.generate", path)
    assert line == 2 and target == "lcrun.profiling" and LEVEL[_unit(target)] > LEVEL["runtime"]
