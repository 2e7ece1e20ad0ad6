"""benchmarks/README.md is an index: every file under benchmarks/ has its row, so no store goes unexplained."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_file_in_benchmarks_has_a_row_in_its_readme():
    rows = [line.split("|")[1] for line in (ROOT / "benchmarks/README.md").read_text().splitlines()
            if line.startswith("| ")]
    listed = subprocess.run(["git", "ls-files", "benchmarks"], cwd=ROOT, capture_output=True, text=True, check=True)
    missing = []
    for path in listed.stdout.split():
        folder, _, name = path.removeprefix("benchmarks/").rpartition("/")
        # a row names `folder/name`, or `folder/first` followed by `name` for more files of that folder
        if not any(f"`{folder}/{name}`" in row if folder else f"`{name}`" in row for row in rows) and not any(
                row.strip().startswith(f"`{folder}/") and f"`{name}`" in row for row in rows if folder):
            missing.append(path)
    assert not missing, f"not in benchmarks/README.md: {missing}"


def test_each_report_overlay_names_files_of_the_repository():
    """A committed report is rewritten by its overlay (`--config benchmarks/.../report.yaml`): what it writes and
    puts around the tables are files here, so a moved file cannot silently drop from the report."""
    import yaml

    overlays = sorted((ROOT / "benchmarks").glob("*/report.yaml"))
    assert len(overlays) == 2
    for overlay in overlays:
        paths = yaml.safe_load(overlay.read_text())
        named = [paths["report"], paths["plot"], *paths.get("preface", []), *paths.get("include", [])]
        assert [p for p in named if not (ROOT / p).is_file()] == [], overlay


def test_a_study_whose_optional_package_is_absent_still_explains_itself(capsys, monkeypatch):
    """`python -m benchmarks peer_fuxictr --help` ended in an error without FuxiCTR; it says what the study does and
    what to install, and only running it is refused."""
    import builtins

    import pytest

    from benchmarks.common import main

    real_import = builtins.__import__

    def without_fuxictr(name, *args, **kwargs):
        if name.split(".")[0] == "fuxictr":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_fuxictr)
    monkeypatch.delitem(sys.modules, "benchmarks.peer_fuxictr.fuxictr_ml100k", raising=False)
    with pytest.raises(SystemExit) as asked:
        main(["peer_fuxictr", "--help"])
    out = capsys.readouterr().out
    assert asked.value.code == 0 and "FuxiCTR's DCN and DeepFM" in out and "pip install -e '.[peer]'" in out
    with pytest.raises(SystemExit) as run:
        main(["peer_fuxictr"])
    assert str(run.value.code).startswith("error: the study 'peer_fuxictr' needs the package 'fuxictr'")
