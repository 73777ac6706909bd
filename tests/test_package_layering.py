"""The package's import graph: every module imports on its own, dependencies point one way, no private names cross
modules. Imports are read with `ast`, so those inside functions and under `TYPE_CHECKING` count too."""

import ast
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hf_dendrites

PACKAGE = hf_dendrites.__name__
ROOT = Path(hf_dendrites.__file__).parent


def _discover() -> dict[str, Path]:
    """Every module of the package (subpackages included), by dotted name relative to the package: its source."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


SOURCES = _discover()
MODULES = sorted(SOURCES)

# Dependencies that must never exist: the lower layers never reach up (config -> layers -> model; saving and hub
# are functions over files and plain data that the model orchestrates).
FORBIDDEN = {
    "constants": {"config", "layers", "model", "saving", "hub", "trainer"},
    "utils": {"config", "layers", "model", "saving", "hub", "trainer"},
    "config": {"layers", "model", "saving", "hub", "trainer"},
    "kernels": {"config", "layers", "model", "saving", "hub", "trainer"},
    "layers": {"model", "saving", "hub", "trainer"},
    "saving": {"model", "hub", "trainer"},
    "hub": {"model", "saving", "trainer"},
    "model": {"trainer"},
    # The core never imports the optional TRL module (hf_dendrites/trl.py); the package loads it on first use.
    **{m: {"trl"} for m in ("callback", "trainer", "training_args", "hp_search", "hub", "saving", "schedule")},
}


def _package_of(module: str) -> list[str]:
    parts = module.split(".")
    return parts if SOURCES[module].name == "__init__.py" else parts[:-1]


def _known(dotted: list[str]) -> str:
    """The package module that `dotted` (relative to the package) names or lies in; "" for the package itself."""
    for end in range(len(dotted), 0, -1):
        name = ".".join(dotted[:end])
        if name in SOURCES:
            return name
    return ""


def package_imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported package module, names imported from it, line) for every import of a package module in `module`.

    The package itself (its `__init__`) is "". `from . import x` is an import of module `x` when `x` is a module.
    """
    tree = ast.parse(SOURCES[module].read_text(encoding="utf-8"), filename=str(SOURCES[module]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != PACKAGE:
                    continue
                base = parts[1:]
            else:
                package = _package_of(module)
                if node.level - 1 > len(package):
                    raise AssertionError(f"{module}:{node.lineno}: relative import beyond the package")
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            target = _known(base)
            if node.module is None or target != ".".join(base):
                # `from . import x`, or names from a module: each alias may itself be a module
                for alias in node.names:
                    sub = ".".join([*base, alias.name])
                    found.append((sub, [], node.lineno) if sub in SOURCES else (target, [alias.name], node.lineno))
            else:
                found.append((target, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE:
                    found.append((_known(parts[1:]), [], node.lineno))
    return found


def import_graph() -> dict[str, set[str]]:
    # Edges into the package's `__init__` ("") are left out: Python runs it before any of its modules anyway, and
    # it only re-exports public names (e.g. utils reads `__version__` from it).
    return {m: {t for t, _, _ in package_imports(m) if t not in ("", m)} for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


@pytest.mark.parametrize("module", [m for m in MODULES if m.rpartition(".")[2] != "__main__"])  # __main__ runs a CLI
def test_every_module_imports_on_its_own(module):
    importlib.import_module(f"{PACKAGE}.{module}")


def test_no_import_cycle():
    graph = import_graph()
    assert {"config", "layers", "model", "saving", "hub"} <= set(graph)
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)
    # The checker sees cycles, including function-level imports.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_dependencies_point_one_way():
    graph = import_graph()
    wrong = sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets & FORBIDDEN.get(m, set()))
    assert not wrong, wrong
    # config -> layers -> model, and model orchestrates saving and hub.
    assert "config" in graph["model"] and "layers" in graph["model"]
    assert {"saving", "hub"} <= graph["model"]


def test_no_private_name_crosses_modules():
    crossing = []
    for module in MODULES:
        for target, names, line in package_imports(module):
            crossing += [
                f"{SOURCES[module].relative_to(ROOT)}:{line} imports {name} from {target or PACKAGE}"
                for name in names
                if target != module and name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
            ]
    assert not crossing, crossing


def test_the_core_imports_without_trl_and_the_trl_trainers_name_the_extra():
    """Without TRL installed (simulated: `import trl` fails), `import hf_dendrites` and its core work, and asking
    for a TRL trainer raises an ImportError that names the extra to install."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["trl"] = None  # what an environment without TRL gives: `import trl` raises ImportError
        import hf_dendrites
        from hf_dendrites import *  # the TRL names are not in __all__
        assert hf_dendrites.DendriticTrainer.__name__ == "DendriticTrainer"
        assert "DendriticSFTTrainer" not in hf_dendrites.__all__
        for name in ("DendriticSFTTrainer", "DendriticSFTConfig", "DendriticDPOTrainer", "DendriticDPOConfig"):
            try:
                getattr(hf_dendrites, name)
            except ImportError as err:
                assert 'pip install "hf_dendrites[trl]"' in str(err), err
            else:
                raise AssertionError(name + " imported without TRL")
        try:
            from hf_dendrites import DendriticSFTTrainer
        except ImportError as err:
            print("OK", err)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK ") and "hf_dendrites[trl]" in done.stdout
    with pytest.raises(AttributeError, match="no attribute 'NotAName'"):
        hf_dendrites.NotAName
