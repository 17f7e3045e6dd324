"""The rooms and their allowed imports (docs/ARCHITECTURE.md), enforced on every module's AST.

Every ``import`` and ``from ... import`` in every product module counts, at module level
or inside a function: a lazy import is still a dependency the package must be able to
satisfy.  ``core`` and ``edge_agent`` install on a Raspberry Pi with the ``[agent]``
extra alone, so they never reach torch or the cloud-side packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# room -> the first-party rooms it may import (itself always allowed).
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "edge_agent": frozenset({"core"}),
    "train": frozenset({"core"}),
    "export": frozenset({"core", "train"}),
    "fleet": frozenset({"core", "train", "export"}),
    # The demo and the benchmarks genuinely run agents next to a fleet.
    "demo": frozenset({"core", "edge_agent", "train", "export", "fleet"}),
    "benchmarks": frozenset({"core", "edge_agent", "train", "export", "fleet", "demo", "edgeloop"}),
    "edgeloop": frozenset({"core", "edge_agent", "train", "export", "fleet", "demo", "benchmarks"}),
}
FIRST_PARTY = frozenset(ALLOWED)
# Third-party packages that only the cloud side may use.
HEAVY = frozenset({"torch", "torchvision", "onnx", "onnxscript", "sklearn", "optuna", "matplotlib", "litert_torch",
                   "sqlalchemy", "fastapi", "uvicorn"})
DEVICE_ROOMS = ("core", "edge_agent")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _modules(room: str) -> list[Path]:
    return sorted(p for p in (ROOT / room).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_rooms_import_only_what_they_may(room: str) -> None:
    bad = []
    for path in _modules(room):
        for line, name in _imports(path):
            top = name.split(".")[0]
            if top in FIRST_PARTY and top != room and top not in ALLOWED[room]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
            if room in DEVICE_ROOMS and top in HEAVY:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} (the device installs without it)")
    assert not bad, "\n".join(bad)


def test_every_room_is_listed() -> None:
    rooms = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert rooms == set(ALLOWED), "a new top-level package needs its row in ALLOWED and docs/ARCHITECTURE.md"


def test_import_walker_sees_lazy_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("import a.b\nfrom c import d\nfrom . import e\ndef f():\n    import torch\n")
    assert _imports(src) == [(1, "a.b"), (2, "c"), (5, "torch")]
