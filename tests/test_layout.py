"""The package's shape: one import package, no import circles, no library code on a CLI module,
every sub-package shipped, and a plain wheel that installs nothing under a bare wing name."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]


def source_modules() -> dict[str, Path]:
    """Every installed module name and its source file, through the package-dir mapping."""
    out: dict[str, Path] = {}
    for pkg, folder in PACKAGE_DIR.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            # a folder mapped on its own (prismesh.chain) is not also a child of prismesh/
            if any(name.startswith(other + ".") or name == other for other in PACKAGE_DIR if other != pkg and other.startswith(pkg + ".")):
                continue
            out[name] = path
    return out


MODULES = source_modules()


def imports_of(name: str, path: Path) -> set[str]:
    """Project modules imported anywhere in the file (function-level imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def test_every_module_lives_under_prismesh() -> None:
    assert MODULES and all(n == "prismesh" or n.startswith("prismesh.") for n in MODULES)


def test_every_package_is_shipped() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    packages = {n for n, p in MODULES.items() if p.name == "__init__.py"}
    assert packages == listed, f"add to pyproject's packages: {sorted(packages - listed)}"


def test_no_import_circles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_library_code_never_imports_a_cli_module() -> None:
    offenders = {
        n: sorted(d for d in deps if d == "prismesh.cli" or d.startswith("prismesh.cli."))
        for n, deps in GRAPH.items()
        if not (n == "prismesh.cli" or n.startswith("prismesh.cli.") or n == "prismesh.__main__")
    }
    assert not {n: d for n, d in offenders.items() if d}


def test_data_flows_one_way() -> None:
    """The chain wing knows nothing of nodes or aggregators; the trainer nothing of the chain."""
    for name, deps in GRAPH.items():
        if name.startswith("prismesh.chain"):
            assert not [d for d in deps if d.startswith(("prismesh.node", "prismesh.aggregator", "prismesh.runs"))], name
    for leaf in ("prismesh.node.trainer", "prismesh.node.evaluate", "prismesh.node.data"):
        assert not [d for d in GRAPH[leaf] if d.startswith("prismesh.chain")], leaf


def test_only_the_command_line_imports_the_dashboard() -> None:
    """The dashboard reads the chain and the store; no library module depends on it."""
    offenders = {
        n: sorted(d for d in deps if d.startswith("prismesh.dashboard"))
        for n, deps in GRAPH.items()
        if not n.startswith(("prismesh.dashboard", "prismesh.cli"))
    }
    assert not {n: d for n, d in offenders.items() if d}


@pytest.mark.slow
def test_plain_wheel_installs_only_prismesh(tmp_path: Path) -> None:
    """``pip install .`` as a wheel: the module files sit under prismesh/, the console script
    answers ``--version`` and ``import prismesh`` works in a fresh virtual environment."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("prismesh-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("prismesh-")}
    assert tops == {"prismesh"}, tops
    assert "prismesh/chain/storage/unixfs.py" in names and "prismesh/node/trainer.py" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    out = subprocess.run([str(py), "-c", "import prismesh, importlib.util as u; print(prismesh.__version__, "
                          "[u.find_spec(n) for n in ('chain', 'node', 'aggregator')])"],
                         check=True, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    from prismesh import __version__

    assert out.stdout.split()[0] == __version__ and "None, None, None" in out.stdout
    ver = subprocess.run([str(venv / "bin" / "prismesh"), "--version"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert ver.returncode == 0 and ver.stdout.strip() == f"prismesh {__version__}"


def test_version_loads_no_heavy_library() -> None:
    """`prismesh --version` (and argument parsing) stays fast: no web3, torch or ray import."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "prismesh", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    heavy = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert not heavy & {"web3", "torch", "ray", "transformers", "eth_account"}, sorted(heavy & {"web3", "torch", "ray"})
