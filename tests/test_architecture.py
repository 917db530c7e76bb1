"""The layout shows the architecture: the library never imports the application, has no import
circles, and its packages import only the layers below them (the README's "Architecture" section).

Imports are read from the source (every ``import`` statement, at module level or inside functions),
so a lazy import that would reach upwards counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What each package of the library may import (besides itself). The README's drawing, as data: a new
# arrow is a decision, made here and in the README together.
ALLOWED = {
    "vlp.config": set(),
    "vlp.batch": set(),
    "vlp.registry": {"vlp.config"},
    "vlp.data": {"vlp.config", "vlp.registry", "vlp.batch"},
    "vlp.curation": {"vlp.config", "vlp.registry", "vlp.data"},
    "vlp.distributed": {"vlp.config"},
    "vlp.losses": {"vlp.config", "vlp.registry", "vlp.distributed"},
    "vlp.models": {"vlp.config", "vlp.registry", "vlp.batch"},
    "vlp.objectives": {"vlp.config", "vlp.registry", "vlp.batch", "vlp.data", "vlp.distributed",
                       "vlp.losses", "vlp.models"},
    "vlp.eval": {"vlp.config", "vlp.registry", "vlp.batch", "vlp.data"},
    "vlp.train": {"vlp.config", "vlp.registry", "vlp.batch", "vlp.data", "vlp.distributed",
                  "vlp.losses", "vlp.models", "vlp.objectives", "vlp.eval"},
    "vlp.scoring": {"vlp.config", "vlp.registry", "vlp.batch", "vlp.data", "vlp.models"},
    # the public surface re-exports from every layer
    "vlp.api": {"vlp.config", "vlp.registry", "vlp.data", "vlp.curation", "vlp.models",
                "vlp.objectives", "vlp.eval", "vlp.train"},
    "vlp": set(),
}


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(modules: dict[str, Path], known: set[str]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from a import b`` counts as ``a.b`` when that is a
    module, else as ``a``)."""

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        while parts:
            if ".".join(parts) in known:
                return ".".join(parts)
            parts.pop()
        return None

    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                target = resolve(name)
                if target and target != module:
                    edges[module].add(target)
    return edges


def _layer(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


LIBRARY = _modules("vlp")
APPLICATION = _modules("pipelines")
EDGES = _imports({**LIBRARY, **APPLICATION}, set(LIBRARY) | set(APPLICATION))


def test_the_library_never_imports_the_application():
    upward = sorted(f"{src} -> {dst}" for src in LIBRARY for dst in EDGES.get(src, ())
                    if dst.split(".")[0] == "pipelines")
    assert upward == []


def test_the_library_has_no_import_circles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in EDGES.get(v, ()):
            if w not in LIBRARY:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in LIBRARY:
        if module not in index:
            visit(module)
    assert circles == []


def test_every_library_package_imports_only_the_layers_below_it():
    assert set(map(_layer, LIBRARY)) <= set(ALLOWED), "a new package: give it its place in ALLOWED"
    wrong = sorted(f"{src} -> {dst}" for src in LIBRARY for dst in EDGES.get(src, ())
                   if _layer(dst) != _layer(src) and _layer(dst) not in ALLOWED[_layer(src)])
    assert wrong == []


def test_the_public_surface_imports_without_ray_or_the_application():
    """``import vlp`` is cheap (no torch); ``vlp.api`` gives the user's names without starting Ray
    and without loading anything from ``pipelines``."""
    code = (
        "import sys, vlp\n"
        "assert 'torch' not in sys.modules, 'import vlp loaded torch'\n"
        "from vlp import ShardFolder, TrainConfig, evaluate_checkpoint, load_config, load_trained_model\n"
        "import vlp.api\n"
        "missing = [n for n in vlp.api.__all__ if not hasattr(vlp, n)]\n"
        "assert not missing, missing\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'pipelines'], 'imported pipelines'\n"
        "import ray\n"
        "assert not ray.is_initialized()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
