"""The core's and the plugins' modules import each other without cycles: imports inside functions
count too (a late import that hides a cycle is still a cycle), and so do the type-only ones of
`if TYPE_CHECKING:` blocks (a reader follows them as well). The layer contract (pyproject.toml,
[tool.importlinter]) holds, and no file patches sys.path: the package is installed."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "platform" / "gppf"
PLUGINS = REPO / "task_plugins"


def _module(path: Path) -> str:
    rel = path.relative_to(path.parent.parent if path.is_relative_to(PLUGINS) else CORE.parent)
    return ".".join(p for p in rel.with_suffix("").parts if p != "__init__")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = {_module(p): p for root in (CORE, PLUGINS) for p in root.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (cycle := visit(n, path + [n])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "gppf.engine.hooks" in graph["gppf.launch.worker"]
    assert "gppf.api.trunk" in graph["gppf.engine.trainer"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_layer_contract_holds():
    """import-linter's contracts (the layers, the core never importing its plugins, the plugins
    building on the contracts only), as CI runs them."""
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_no_file_patches_sys_path():
    patch = re.compile(r"sys\.path\s*(\.(insert|append|extend)\s*\(|\[[^\]]*\]\s*=|\+=)")
    files = [
        p
        for p in REPO.rglob("*.py")
        if not any(part in {".venv", "runs", "demo_data", "build"} for part in p.relative_to(REPO).parts)
    ]
    assert len(files) > 100
    patched = [str(p.relative_to(REPO)) for p in files if patch.search(p.read_text())]
    assert patched == [], patched
