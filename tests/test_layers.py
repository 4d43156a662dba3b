"""The import graph: layers point one way and no mmscene module imports itself round a circle.

Every import counts, those inside functions too: a lazy import still makes the lower module
depend on the higher one, which is what the layering is about.
"""

import ast
import subprocess
import sys
from pathlib import Path

import mmscene

ROOT = Path(mmscene.__file__).parent

# Bottom to top. A module may import its own group and the groups of lower rank; groups of
# equal rank (the three data stages beside the model) do not import each other.
LAYERS: list[tuple[int, str, tuple[str, ...]]] = [
    (
        0,
        "floor",
        ("mmscene.constants", "mmscene.skips", "mmscene.schema", "mmscene.metrics", "mmscene.scenario"),
    ),
    (1, "registry", ("mmscene.registry",)),
    (1, "shard format", ("mmscene.data.shards", "mmscene.data.tar_reader", "mmscene.data.seeds")),
    (2, "media", ("mmscene.data.media",)),
    (3, "ingest", ("mmscene.data.ingest",)),
    (3, "pipeline", ("mmscene.data.pipeline",)),
    (3, "model", ("mmscene.model",)),
    (4, "tools", ("mmscene.data.tools",)),
    (5, "train", ("mmscene.train",)),
    (6, "launch", ("mmscene.launch",)),
    (6, "eval", ("mmscene.eval",)),  # runs lmms-eval on models and runs of the layers below
    (7, "entry points", ("mmscene.cli", "mmscene.demo", "mmscene.export")),
]
PACKAGE_DOCS_ONLY = ("mmscene", "mmscene.data")  # their __init__ holds no imports of its own


def module_files() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets.update(subs)
                if len(subs) < len(node.names):  # names taken from the module itself
                    targets.add(base)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def layer_of(module: str) -> tuple[int, str]:
    best = None
    for rank, group, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[0]
            ):
                best = (len(prefix), rank, group)
    assert best is not None or module in PACKAGE_DOCS_ONLY, f"{module} belongs to no layer: add it to LAYERS"
    return (best[1], best[2]) if best else (-1, "package docs")


def test_the_graph_is_read_correctly():
    """The checks below are only as good as the graph: spot-check edges known to exist."""
    graph = import_graph()
    assert "mmscene.data.pipeline.stream" in graph["mmscene.data.pipeline.mixer"]
    assert "mmscene.schema" in graph["mmscene.scenario"]
    assert "mmscene.model.export_hf" in graph["mmscene.model.formats"]  # a function-level import
    assert len(graph) > 60


def test_layers_point_down():
    bad = []
    for module, targets in sorted(import_graph().items()):
        rank, group = layer_of(module)
        for target in sorted(targets):
            t_rank, t_group = layer_of(target)
            if t_group != group and t_rank >= rank and module not in PACKAGE_DOCS_ONLY:
                bad.append(f"{module} ({group}) imports {target} ({t_group})")
    assert not bad, "imports pointing up or sideways:\n" + "\n".join(bad)


def test_the_bottom_imports_nothing_of_mmscene():
    graph = import_graph()
    assert graph["mmscene.constants"] == set()
    assert graph["mmscene.skips"] == set()
    assert graph["mmscene.schema"] <= {"mmscene.constants", "mmscene.skips"}


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [node, nxt]))
            elif nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_a_cycle_would_be_caught(monkeypatch):
    """The cycle check fails on a graph with a circle (so its passing above means something)."""
    real = import_graph()
    looped = {k: set(v) for k, v in real.items()}
    looped["mmscene.constants"].add("mmscene.scenario")
    monkeypatch.setattr(sys.modules[__name__], "import_graph", lambda: looped)
    try:
        test_no_import_cycles()
    except AssertionError as err:
        assert "mmscene.constants -> mmscene.scenario" in str(err) or "mmscene.scenario" in str(err)
    else:
        raise AssertionError("a cycle constants -> scenario -> constants went unnoticed")


def test_the_pipeline_loads_without_the_model_side():
    """Loader workers import the pipeline: transformers and torch.distributed stay out of them."""
    code = """
import pkgutil, importlib, sys
import torch, torch.utils.data
before = {m for m in sys.modules if m.startswith("torch.distributed")}
import mmscene.data.pipeline as pipeline
for info in pkgutil.iter_modules(pipeline.__path__, "mmscene.data.pipeline."):
    importlib.import_module(info.name)
import mmscene.registry, mmscene.data.media
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "lightning", "mmscene.model"))
heavy += sorted(m for m in sys.modules if m.startswith("torch.distributed") and m not in before)
heavy += sorted(m for m in sys.modules if m.startswith("mmscene.model") or m.startswith("mmscene.train"))
print(" ".join(heavy))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"importing the pipeline pulled in: {out}"
