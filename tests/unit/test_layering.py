"""The import graph, read from the source (every `import`, module-level or inside a function):
the config package imports nothing from distlip but `errors`, every module imports only from
its own layer or below, and no distlip modules import each other in a circle."""

import ast

from helpers import ROOT

PACKAGE = ROOT / "distlip"

# Bottom to top: a module may import its own layer and the layers below it, never above.
LAYERS = (
    ("errors", "seeds"),
    ("config",),
    ("data", "model", "lipschitz", "loss", "metrics", "divergence", "preemption", "paper_protocol", "sample"),
    ("optim", "compress"),
    ("distributed",),
    ("checkpoint", "memory", "preflight", "robustness_report", "evaluation", "ensemble", "teacher"),
    ("trainer",),
    ("cli", "slurm", "__main__"),
)
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def modules() -> dict[str, ast.Module]:
    """Dotted name → parsed source of every module in the package (a package by its `__init__`)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The distlip modules `name` imports: `from a.b import c` counts as `a.b.c` when that is a
    module, else as `a.b`."""
    out = set()
    package = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            subs = {f"{base}.{alias.name}" for alias in node.names} & known
            out.update(subs or {base})
    return {m for m in out if m.split(".")[0] == "distlip"} - {name}


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: imports(name, tree, known) for name, tree in trees.items()}


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    assert part in LAYER or module == "distlip", f"{module} is in no layer: add it to LAYERS in {__file__}"
    return LAYER.get(part, 0)


def test_the_graph_is_read_from_the_source():
    g = graph()
    # known edges, one of them inside a function: a parse that missed imports would pass vacuously
    assert "distlip.lipschitz.caps" in g["distlip.trainer"]
    assert "distlip.model" in g["distlip.lipschitz.caps"]
    assert "distlip.checkpoint.state" in g["distlip.cli"]  # imported inside _certify
    assert "distlip.config.checks" in g["distlip.config.load"]
    assert "distlip.errors" in g["distlip.config.checks"]
    assert len(g) > 50


def test_config_imports_nothing_from_distlip_but_errors():
    bad = {(m, i) for m, deps in graph().items() if m.startswith("distlip.config")
           for i in deps if not i.startswith("distlip.config") and i != "distlip.errors"}
    assert not bad, f"the config package must be the ground floor, but imports {sorted(bad)}"


def test_every_import_goes_down_or_sideways():
    up = [f"{m} (layer {layer_of(m)}) imports {i} (layer {layer_of(i)})"
          for m, deps in graph().items() if m != "distlip" for i in deps if layer_of(i) > layer_of(m)]
    assert not up, "imports from a higher layer:\n" + "\n".join(sorted(up))


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    found = circles(graph())
    assert not found, f"modules that import each other (directly or through others): {found}"


def test_the_circle_check_can_fail():
    g = graph()
    g["distlip.model"] = g["distlip.model"] | {"distlip.trainer"}
    found = circles(g)
    assert len(found) == 1 and {"distlip.model", "distlip.trainer"} <= set(found[0])
