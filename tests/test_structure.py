"""The shape of the library: no import cycles, and the reports stand apart from the orchestrator."""
import ast
from pathlib import Path

LP = Path(__file__).resolve().parents[1] / "lp"


def import_graph() -> dict[str, set[str]]:
    """lp module -> the lp modules it imports anywhere in its file (function-level imports included)."""
    graph = {}
    for path in LP.rglob("*.py"):
        parts = list(path.relative_to(LP.parent).with_suffix("").parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        name = ".".join(parts if parts[-1] != "__init__" else parts[:-1])
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                deps.add(".".join(base + ([node.module] if node.module else [])))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lp":
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "lp"}
        graph[name] = deps - {name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_lp_module_imports_a_module_that_imports_it_back():
    graph = import_graph()
    assert {"lp.pipeline", "lp.patches", "lp.calibration"} <= set(graph)  # the walk found them
    cycles = sorted(m for m in graph if m in reachable(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_reports_do_not_import_the_orchestrator():
    graph = import_graph()
    for module in (m for m in graph if m.startswith("lp.report")):
        assert "lp.pipeline" not in reachable(graph, module), module
