"""The house: each part imports only the ones before it in the data flow, anywhere in its files (no lazy import
that hides a loop). The two stages stand side by side: neither imports the other, so what both need (the
checkpoint stamp and checks, the finite-loss guard) lives below both, in towers/checkpoints.py."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the flow: table side -> towers (and the checkpoint plumbing both stages share) -> stage 2 (fine-tuning, export)
# beside stage 1 (alignment) -> the application on top of both
LAYERS = [{"tabular2text"}, {"towers"}, {"finetune", "ctrl.align"}, {"ctrl.app"}]
PARTS = sorted(set().union(*LAYERS), key=len, reverse=True)  # the longest name first: ctrl.align before ctrl


def part_of(module: str) -> str | None:
    return next((p for p in PARTS if module == p or module.startswith(p + ".")), None)


def imported_parts(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {part for part in map(part_of, modules) if part}


def layer(part: str) -> int:
    return next(i for i, parts in enumerate(LAYERS) if part in parts)


def test_parts_import_only_the_ones_before_them_and_the_stages_not_each_other():
    wrong = []
    for part in PARTS:
        for path in sorted((ROOT / part.replace(".", "/")).rglob("*.py")):
            later = {p for p in imported_parts(path) if p != part and layer(p) >= layer(part)}
            wrong += [f"{path.relative_to(ROOT)} imports {p}" for p in sorted(later)]
    assert not wrong, wrong


def test_every_package_file_is_in_a_part():
    loose = [str(p.relative_to(ROOT)) for package in ("tabular2text", "towers", "finetune", "ctrl")
             for p in (ROOT / package).rglob("*.py") if part_of(".".join(p.relative_to(ROOT).with_suffix("").parts))
             is None and p.read_text().strip()]
    assert not loose, loose


def test_towers_are_plain_modules_without_lightning():
    for path in (ROOT / "towers").rglob("*.py"):
        assert "pytorch_lightning" not in path.read_text(), path
