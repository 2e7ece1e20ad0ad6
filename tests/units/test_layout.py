"""The house: each package imports only the ones before it in the data flow, anywhere in its files (no
lazy import that hides a loop)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the flow: table side -> towers -> stage 2 (fine-tuning, export, the guards both stages share) -> stage 1
# and the application on top
ORDER = ["tabular2text", "towers", "finetune", "ctrl"]


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(ORDER)


def test_packages_import_only_the_ones_before_them():
    wrong = []
    for rank, package in enumerate(ORDER):
        for path in sorted((ROOT / package).rglob("*.py")):
            later = {p for p in imported_packages(path) if ORDER.index(p) > rank}
            wrong += [f"{path.relative_to(ROOT)} imports {p}" for p in sorted(later)]
    assert not wrong, wrong


def test_towers_are_plain_modules_without_lightning():
    for path in (ROOT / "towers").rglob("*.py"):
        assert "pytorch_lightning" not in path.read_text(), path
