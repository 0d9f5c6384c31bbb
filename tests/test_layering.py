"""The layering holds: imports point down only, and no two parts of the package import each other.

Every ``sharedris`` import in ``src/`` is read with ``ast`` (lazy imports inside functions count
too), and each module is mapped to its part: a subpackage (``modeling``, ``data``, ``train``,
``serve``) or a top-level module.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import sharedris

SRC = Path(sharedris.__file__).parent
BOTTOM = {"config", "checkpoint", "progress", "devices", "distributed"}  # import nothing else of sharedris
# What each lower part may import besides itself; parts not listed (cli, serve, predictor, ...) may
# import anything, as long as no cycle forms.
ALLOWED = {
    **{part: set() for part in BOTTOM},
    "modeling": {"config", "checkpoint"},
    "data": {"progress"},
    "text": set(),
    "metrics": set(),
    "losses": {"modeling"},  # one loss term per field of the model's output type
    "precision": set(),
    "conversions": {"checkpoint", "devices"},  # the disk cache of converted models
    "runtime": {"modeling", "precision", "conversions", "devices"},  # the one place that sets up a model for inference
}
INFERENCE = {"bulk", "predictor", "serve", "cli"}  # the doors that run a trained model


def _part(module: str) -> str:
    """``sharedris.modeling.fpn`` -> ``modeling``; ``sharedris.text`` -> ``text``."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports() -> dict[str, set[tuple[str, str]]]:
    """part -> {(importing file, imported sharedris module)}."""
    found: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("sharedris.") and _is_module(name):
                    found[_part(module)].add((str(rel), name))
    return found


def _is_module(name: str) -> bool:
    path = SRC.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_lower_layers_import_only_what_is_below_them():
    wrong = [f"{file} imports {name}" for part, edges in _imports().items() if part in ALLOWED
             for file, name in sorted(edges) if _part(name) not in ALLOWED[part] | {part}]
    assert wrong == []


def test_training_imports_nothing_of_inference():
    wrong = [f"{file} imports {name}" for file, name in sorted(_imports()["train"]) if _part(name) in INFERENCE]
    assert wrong == []


def test_inference_imports_nothing_of_training():
    wrong = [f"{file} imports {name}" for part in INFERENCE - {"cli"} for file, name in sorted(_imports()[part])
             if _part(name) == "train"]
    assert wrong == []


def test_the_service_does_not_import_the_synthetic_generator():
    # what the default model was trained on travels with its weights (vocabulary.json)
    assert not [f for f, name in _imports()["serve"] if name.startswith("sharedris.data.synthetic")]


def test_data_never_imports_the_config_module():
    assert not [f for f, name in _imports()["data"] if name == "sharedris.config"]


def test_bulk_prediction_reads_manifests_below_its_store_and_its_store_below_its_engine():
    below = {"manifest": set(), "store": {"manifest"}, "engine": {"manifest", "store"}}  # within sharedris.bulk
    edges = _imports()["bulk"]
    assert set(below) <= {Path(file).name for file, _ in edges}  # each module is read (each imports sharedris)
    wrong = [f"{file} imports {name}" for file, name in sorted(edges)
             if Path(file).name in below and name.startswith("sharedris.bulk")
             and name.removeprefix("sharedris.bulk").lstrip(".") not in below[Path(file).name]]
    assert wrong == []
    # the engine is given its rank and world; finding them out is the public door's work
    assert not [f for f, name in edges if Path(f).name == "engine" and name == "sharedris.distributed"]


def test_no_import_cycle_between_parts():
    graph = {part: {_part(name) for _, name in edges} - {part} for part, edges in _imports().items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [node])):
                return cycle
        state[node] = 2
        return None

    cycles = [c for part in sorted(graph) if part not in state and (c := visit(part, []))]
    assert cycles == []
