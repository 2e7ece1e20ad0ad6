"""benchmarks/README.md is an index: every file under benchmarks/ has its row, so no store goes unexplained."""

import subprocess
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
