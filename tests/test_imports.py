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


# What a Serve replica may load: serving, the artifact format and what it is read with (config, model
# families, precision, PNG encoding), and dlray.data for decode_image (a classifier decodes request images
# as its training data was). Everything else in dlray trains (loop, train, tune, checkpoint, ema, finetune,
# export, strategies, streaming, run files, trackers, ...): an allowlist, so a new training module is caught too.
SERVING_MAY_LOAD = ("dlray.serve", "dlray.artifact", "dlray.config", "dlray.models", "dlray.precision", "dlray.png", "dlray.data")
# Libraries only training loads: a replica pulling them in starts seconds slower and may lack them (a serving image).
TRAINING_LIBRARIES = ("deepspeed", "ray.train", "ray.tune", "ray.data", "mlflow", "wandb", "tensorboardX", "matplotlib")

# Imports each module given in argv in turn, printing the training modules each one loaded first.
PROBE = """
import json, sys
allowed, libraries = json.loads(sys.argv[1]), json.loads(sys.argv[2])
def training():
    return {m for m in sys.modules if (m.startswith("dlray.") and not m.startswith(tuple(allowed)))
            or m in libraries or m.startswith(tuple(lib + "." for lib in libraries))}
seen = set()
for module in sys.argv[3:]:
    __import__(module)
    print(json.dumps([module, sorted(training() - seen)]))
    seen |= training()
"""


def training_modules_loaded(modules: list[str]) -> dict[str, list[str]]:
    """module -> the training modules importing it (after the modules before it) loaded, in a fresh interpreter."""
    import json
    import os
    import subprocess
    import sys

    argv = [sys.executable, "-c", PROBE, json.dumps(SERVING_MAY_LOAD), json.dumps(TRAINING_LIBRARIES), *modules]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(json.loads(line) for line in result.stdout.splitlines())


def test_importing_serving_loads_no_training_module():
    """Every dlray.serve module imported, one after another, loads nothing of training, so none does on its
    own either. dlray.export goes last, to show that the probe sees what training loads."""
    serving = sorted(module for module in module_imports() if module.startswith("dlray.serve"))
    loaded = training_modules_loaded([*serving, "dlray.export"])
    assert {module: found for module, found in loaded.items() if found and module != "dlray.export"} == {}
    assert {"dlray.checkpoint", "dlray.export", "dlray.finetune", "ray.train"} <= set(loaded["dlray.export"])
