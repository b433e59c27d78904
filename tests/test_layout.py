"""The package's layers, measured on its import graph: no cycle, and no import from a lower layer to a higher one."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "zamba2"
# low to high: a module may import its own layer and those before it (pipeline also uses training's shard writer)
LAYERS = ["errors", "hub", "text", "ops", "model", "infer", "train", "eval", "serve", "pipeline", "demo", "__main__"]
ALLOWED_UP = {("pipeline", "zamba2.train.data")}


def imports() -> dict[str, set[str]]:
    """Module -> the zamba2 modules (or packages) it imports anywhere in its body, function-level imports too."""
    graph = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if parts[-1] == "__init__" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                names = [f"{base}.{node.module}"] if node.module else [f"{base}.{a.name}" for a in node.names]
                targets.update(names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("zamba2"):
                targets.add(node.module)
        graph[module] = targets
    return graph


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_import_points_up_a_layer():
    upward = [f"{m} -> {t}" for m, targets in imports().items() for t in targets
              if layer(m) and layer(t) and LAYERS.index(layer(t)) > LAYERS.index(layer(m))
              and (layer(m), t) not in ALLOWED_UP]
    assert upward == []


def test_no_import_cycle():
    graph = imports()
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for t in graph.get(m, ()):
            if t not in graph or t == "zamba2":  # a name imported from a package, or the public API
                continue
            if state.get(t) == "open":
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_model_reaches_hardware_only_through_its_layers_and_mixer_backends():
    """The model file reads as plain torch: its projections and norms (ops.layers) and its mixer's compiled kernels
    (ops.mixer) are plugged in from ops/, which alone imports the kernels themselves."""
    plugged = {"zamba2.ops.layers", "zamba2.ops.mixer"}
    reached = {t for m, targets in imports().items() if layer(m) == "model" for t in targets if layer(t) == "ops"}
    assert reached <= plugged
