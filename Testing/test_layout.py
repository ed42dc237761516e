"""The engine's folders follow the data and its dependencies point one way: data/learn/predict/
measure never import project; project never imports service/slicer/apps (read from the imports)."""

from __future__ import annotations

import ast
from pathlib import Path

LOGIC = Path(__file__).resolve().parents[1] / "SemSegLoop" / "Logic"

# What each part may import from the engine (besides errors and itself).
ALLOWED = {
    "data": {"data"},
    "learn": {"data", "learn"},
    "predict": {"data", "learn", "predict"},
    "measure": {"data", "measure"},
    "project": {"data", "learn", "predict", "measure"},
    "service": {"project", "data", "learn", "predict", "measure", "service"},
    "slicer": {"project", "data", "learn", "predict", "measure", "slicer", "service"},
    "apps": {"project", "data", "learn", "predict", "measure", "apps", "service", "slicer"},
}
PARTS = set(ALLOWED) | {"errors"}


def _part(path: Path) -> str:
    rel = path.relative_to(LOGIC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _engine_imports(path: Path) -> set[str]:
    """Top-level engine parts a module imports, relative or absolute, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path.relative_to(LOGIC)}: relative import; use "
                                     f"'semsegloop.<part>' so the direction stays visible")
            mod = node.module or ""
            if mod == "semsegloop":
                found |= {a.name for a in node.names if a.name in PARTS}
            elif mod.startswith("semsegloop."):
                found.add(mod.split(".")[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("semsegloop."):
                    found.add(a.name.split(".")[1])
    return found


def test_every_stage_is_a_package_with_a_two_line_docstring():
    for part in ("data", "learn", "predict", "measure", "service", "slicer", "apps"):
        init = LOGIC / part / "__init__.py"
        assert init.is_file(), f"{part}/ is not a package"
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.strip().splitlines()) >= 2, f"{part}/__init__.py needs a docstring"


def test_dependencies_point_one_way():
    wrong = []
    for f in sorted(LOGIC.rglob("*.py")):
        part = _part(f)
        if part in ("__init__", "__main__", "errors"):
            continue
        assert part in ALLOWED, f"{f.relative_to(LOGIC)} is outside the known parts"
        for used in _engine_imports(f) - {"errors"}:
            if used not in ALLOWED[part]:
                wrong.append(f"{f.relative_to(LOGIC)} imports {used}")
    assert not wrong, "dependencies must point one way: " + "; ".join(wrong)


def test_the_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from semsegloop.project import Project\n")
    assert _engine_imports(bad) == {"project"}
