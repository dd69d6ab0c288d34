"""The package's layering: imports only go down, and siblings stay apart.

Each subpackage's ``__init__`` docstring says what it owns and what it may
import; this test holds the code to it, so the tree keeps showing the
architecture. It reads the source (AST), so it also sees imports that only
run inside functions or under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "poolinetd"

# Lower rank = lower layer. A module may import from a strictly lower rank, or
# from its own subpackage. Subpackages of equal rank are siblings: they must
# not import each other.
RANK = {
    "observe": 0,
    "net": 1,
    "config": 2,
    "admission": 3, "builtins": 3, "launch": 3,
    "ops": 4,
    "engine": 5,
    "pool": 6, "classic": 6,
    "": 7,  # the entry modules at the top: cli, check, __main__
}


def _layer(module: str) -> str:
    """'poolinetd.engine.loop' -> 'engine'; 'poolinetd.cli' -> '' (the top)."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in RANK:
        return parts[1]
    return ""


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        found.append((name, path))
    return found


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every poolinetd module ``path`` imports (``from poolinetd import x`` counts x)."""
    got = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "poolinetd":
                got += [(node.lineno, f"poolinetd.{a.name}") for a in node.names]
            elif node.module.startswith("poolinetd."):
                # ``from poolinetd.engine import loop`` imports the module poolinetd.engine.loop
                where = PACKAGE.parent / node.module.replace(".", "/")
                subs = [a.name for a in node.names if (where / f"{a.name}.py").exists()]
                got += [(node.lineno, f"{node.module}.{sub}") for sub in subs] or [
                    (node.lineno, node.module)]
        elif isinstance(node, ast.Import):
            got += [(node.lineno, a.name) for a in node.names if a.name.startswith("poolinetd")]
        elif isinstance(node, ast.ImportFrom) and node.level:
            got.append((node.lineno, "<relative import>"))
    return got


def test_every_subpackage_is_ranked_and_documented() -> None:
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == set(RANK) - {""}
    for name in subpackages:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"{name}/__init__.py must say what it may import"


@pytest.mark.parametrize("module,path", _modules(), ids=lambda v: str(v).split("/")[-1])
def test_imports_only_go_down(module: str, path: Path) -> None:
    own = _layer(module)
    wrong = []
    for line, target in _imports(path):
        if target == "<relative import>":
            wrong.append(f"line {line}: relative import (use absolute poolinetd.* imports)")
            continue
        if target in ("poolinetd", "poolinetd.__version__"):
            continue
        theirs = _layer(target)
        if theirs == own:
            continue
        if RANK[theirs] >= RANK[own]:
            wrong.append(f"line {line}: {module} ({own or 'top'}) imports {target} "
                         f"({theirs or 'top'})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules() -> None:
    """Within a layer too: a cycle means two modules are one concept, or a seam is missing."""
    names = {name for name, _ in _modules()}
    graph: dict[str, set[str]] = {}
    for name, path in _modules():
        graph[name] = {t for _, t in _imports(path) if t in names and t != name}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt):], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
