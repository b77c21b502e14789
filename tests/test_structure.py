"""The package's structure (docs/architecture.md): imports go one way, the trainer keeps the loop."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from import_graph import import_cycles, import_graph  # noqa: E402

from cure_hub.method_registry import METHOD_CLASSES  # noqa: E402


def test_the_graph_sees_a_circle_closed_by_an_import_inside_a_function(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub.b import f\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import g\n    from . import c\n")
    (package / "sub" / "c.py").write_text("import os\n")
    graph = import_graph(package)
    assert graph == {"": set(), "a": {"sub.b"}, "sub": set(), "sub.b": {"a", "sub.c"}, "sub.c": set()}
    assert import_cycles(graph) == [{"a", "sub.b"}]


def test_imports_go_one_way():
    """No circle among the package's modules, imports inside functions included (docs/architecture.md)."""
    assert import_cycles(import_graph()) == []


def test_the_trainer_names_no_method_and_keeps_to_the_loop():
    source = (REPO / "cure_hub" / "trainer.py").read_text()
    assert not [name for name in METHOD_CLASSES if f'"{name}"' in source]
    lines = source.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("class Trainer")))
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace())
    assert len(lines) <= 600 and end - start <= 400, (len(lines), end - start)
