"""The import graph of dlray: no cycles, even through the imports made inside functions (which are
there to load heavy libraries late, never to dodge a cycle), and models and data know nothing of Ray.

Read from the source with `ast`: every module is checked, in a second, without importing anything.
"""

import ast

from helpers import REPO


def module_imports() -> dict[str, set[str]]:
    """dlray module -> the dlray modules (or packages) it imports anywhere in its body, and the
    third-party top-level packages it imports, as `ext:<name>`."""
    files = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path for path in (REPO / "dlray").rglob("*.py")}
    graph = {}
    for module, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:  # `from dlray.data import text` imports the module dlray.data.text
                    imported.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in files else node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[module] = {name if name.startswith("dlray") else "ext:" + name.split(".")[0] for name in imported}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting, done = [], set()

    def visit(module):
        if module in visiting:
            return visiting[visiting.index(module):] + [module]
        if module in done or module not in graph:
            return None
        visiting.append(module)
        for target in sorted(graph[module]):
            if cycle := visit(target):
                return cycle
        visiting.pop()
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module))), None)


def test_no_import_cycles_even_through_deferred_imports():
    cycle = find_cycle(module_imports())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_models_and_data_know_nothing_of_ray_or_of_each_other():
    for module, imported in module_imports().items():
        if module.startswith(("dlray.models", "dlray.data")):
            assert "ext:ray" not in imported, f"{module} imports ray"
            other = "dlray.data" if module.startswith("dlray.models") else "dlray.models"
            assert not any(name.startswith(other) for name in imported), f"{module} imports {other}"
