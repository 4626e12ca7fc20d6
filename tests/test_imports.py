"""The import graph of vq_jax has no cycle (deferred imports inside functions count too)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _graph() -> dict[str, set[str]]:
    files = {}
    for f in (ROOT / "vq_jax").rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = f
    graph = {}
    for name, f in files.items():
        edges = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & files.keys()
                edges |= subs or {node.module}
        # a package's own __init__ runs before any of its modules: not an edge of the module
        graph[name] = {e for e in edges & files.keys() if e != name and not name.startswith(e)}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            found = visit(nxt, [*path, node])
            if found:
                return found
        done.add(node)
        return None

    return next((c for c in (visit(n, []) for n in sorted(graph)) if c), None)


def test_no_import_cycle():
    graph = _graph()
    assert {"vq_jax.loop", "vq_jax.trainer", "vq_jax.api", "vq_jax.data"} <= graph.keys()
    assert "vq_jax.loop" in graph["vq_jax.trainer"]  # the graph sees `from vq_jax import loop`
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_cycle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
