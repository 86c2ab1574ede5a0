"""The package layout is the architecture (docs/ARCHITECTURE.md): each folder one layer,
imports only downward, no import cycles — checked on the source, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "adakv_local"

# lower number = lower layer; a module may import its own layer and the ones below
LAYERS = {
    "errors": 0, "defaults": 0, "_closing": 0,
    "bindings": 1, "build": 1, "models": 1, "modelfile": 1,
    "cache": 2,
    "generation": 3,
    "llm": 4, "__init__": 4,
    "bench": 5, "testing": 5, "serve": 5,
    "cli": 6,
}


def _module(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """adakv_local modules imported by ``path`` (relative imports resolved)."""
    mod = _module(path).split(".")
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod if is_pkg else mod[:-1]
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("adakv_local"):
                target = node.module[len("adakv_local"):].lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import x` may name a submodule
                sub = f"{target}.{alias.name}" if target else alias.name
                out.add(sub if (PKG / Path(*sub.split("."))).with_suffix(".py").exists()
                        or (PKG / Path(*sub.split("."))).is_dir() else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("adakv_local."):
                    out.add(alias.name[len("adakv_local."):])
    return {m for m in out if m}


def _layer(mod: str) -> int:
    top = mod.split(".")[0]
    assert top in LAYERS, f"{mod}: its folder is not in the layer map of this test"
    return LAYERS[top]


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in PKG.rglob("*.py")}


def test_imports_only_go_down() -> None:
    bad = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
           for m, targets in _graph().items() for t in targets if _layer(t) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if t == m or t not in graph:
                continue
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, m, t]))
            if t not in state:
                visit(t, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_checker_sees_imports() -> None:
    """The checks above mean something: they see the known edges."""
    graph = _graph()
    assert "cache.adakv" in graph["llm"] and "bindings.llama" in graph["cache.base"]
    assert "bench.machine" in graph["bench.evaluate"]  # a relative import in a subpackage
    assert "llm" in graph["bench.compare"]  # a lazy import inside a function


def test_llm_is_the_public_face_only() -> None:
    lines = (PKG / "llm.py").read_text(encoding="utf-8").count("\n")
    assert lines < 450, f"llm.py has {lines} lines: move the work into cache/ or generation/"
