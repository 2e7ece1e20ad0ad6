"""The package outside its repository: `configs/...` paths read from the copy shipped with the package, and a
wheel and an sdist built from this checkout, the wheel installed into a fresh virtual environment and `ctrl run`
there from a folder that is not the repository."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import write_small_ml1m

from ctrl.app.cli import main
from ctrl.app.paths import resolve_config_args, resolve_config_path, shipped_configs

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ctrl", "finetune", "tabular2text", "towers")


def test_a_path_that_exists_wins_else_configs_names_the_shipped_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped_configs() == ROOT / "configs"  # a source checkout: the repository's own
    assert resolve_config_path("configs/ml100k/align.yaml") == str(ROOT / "configs/ml100k/align.yaml")
    assert resolve_config_path("./configs/ml100k") == str(ROOT / "configs/ml100k")
    (tmp_path / "configs" / "ml100k").mkdir(parents=True)
    (tmp_path / "configs" / "ml100k" / "align.yaml").write_text("mine")
    assert resolve_config_path("configs/ml100k/align.yaml") == "configs/ml100k/align.yaml"  # the user's own
    for as_given in ("configs/ml100k/nope.yaml", "elsewhere/align.yaml", "/nowhere/configs/ml100k/align.yaml", ""):
        assert resolve_config_path(as_given) == as_given  # what the error that follows names
    args = ["fit", "--config", "configs/bench/ml100k.yaml", "--config=configs/ml100k/finetune.yaml", "-c",
            "configs/ml100k/finetune/deepfm.yaml", "--data.data_dir", "configs/generic/schema.yaml", "--config"]
    shipped = str(ROOT / "configs" / "ml100k")
    assert resolve_config_args(args) == [
        "fit", "--config", str(ROOT / "configs/bench/ml100k.yaml"), f"--config={shipped}/finetune.yaml", "-c",
        f"{shipped}/finetune/deepfm.yaml", "--data.data_dir", "configs/generic/schema.yaml", "--config"]


def test_readme_examples_of_configs_run_from_another_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CTRL_CACHE_DIR", str(tmp_path / "cache"))
    main(["prepare", "--data_dir", "configs/generic/schema.yaml", "--show", "1"])
    assert "This is a user" in capsys.readouterr().out
    from ctrl.app.lightning_cli import lightning_cli

    cli = lightning_cli(["--config", "configs/stages/finetune.yaml", "--config", "configs/ml100k/finetune.yaml",
                         "--config", "configs/ml100k/finetune/deepfm.yaml", "--data.data_dir", "configs/recbole/shop",
                         "--trainer.logger", "false"], run=False)
    assert type(cli.model.model.tower).__name__ == "DeepFM"
    assert cli.datamodule.hparams.data_dir == str(ROOT / "configs" / "recbole" / "shop")
    assert not (tmp_path / "configs").exists()


def run(command: list, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """A command as a user outside the repository runs it: this checkout not importable (no PYTHONPATH)."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **env}
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def build_hook(hook: str, source: Path, dist: Path) -> Path:
    """One PEP 517 hook of setuptools, as `python -m build --no-isolation` calls it (without needing `build`)."""
    code = f"import sys, setuptools.build_meta as b; print(b.{hook}(sys.argv[1]))"
    return dist / run([sys.executable, "-c", code, dist], source).stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_wheel_runs_the_main_job_outside_the_repository(tmp_path):
    # The sdist from a copy of what pyproject.toml names (the build writes its egg-info next to the sources), the
    # wheel from the unpacked sdist: the sdist is complete if the wheel built from it is.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for name in ("configs", *PACKAGES):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    sdist = build_hook("build_sdist", source, dist)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
        in_sdist = {Path(*Path(n).parts[1:]) for n in tar.getnames()}
    wheel = build_hook("build_wheel", tmp_path / "unpacked" / sdist.name.removesuffix(".tar.gz"), dist)
    in_wheel = set(map(Path, zipfile.ZipFile(wheel).namelist()))
    configs = {p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*") if p.is_file()}
    modules = {p.relative_to(ROOT) for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    assert configs | modules <= in_sdist
    assert {Path("ctrl", p) for p in configs} | modules <= in_wheel

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path)
    # torch, Lightning, the language model ... from the system; pip too (the venv's python runs it for the venv).
    # --force-reinstall: an editable install of the same version outside the venv would otherwise satisfy it.
    run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", "--quiet",
         wheel], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    imported = run([venv / "bin" / "python", "-c", "import ctrl; print(ctrl.__file__)"], elsewhere).stdout
    assert Path(imported.strip()).is_relative_to(venv)
    assert run([venv / "bin" / "ctrl", "--help"], elsewhere).stdout.startswith("usage: ctrl COMMAND")

    data = write_small_ml1m(tmp_path / "ml-1m")
    # the command, shortened: the shipped configs (configs/ml100k: all-MiniLM-L6-v2, DCN), one epoch a stage
    done = run([venv / "bin" / "ctrl", "run", "--backbone", "dcn", "--data_dir", data, "--out", "out",
                "--max_epochs_align", "1", "--max_epochs_finetune", "1"], elsewhere,
               CTRL_CACHE_DIR=str(tmp_path / "cache"))
    assert (elsewhere / "out" / "finetune" / "export" / "model.json").is_file()
    assert "test AUC" in done.stdout and "wall time per phase" in done.stdout
    assert not (elsewhere / "configs").exists()


def test_bench_report_goes_beside_its_store_and_a_committed_one_only_by_its_overlay(tmp_path, monkeypatch):
    """A bench with a shipped config once wrote the repository's committed report (benchmarks/RESULTS.md, prefaced
    with ML-100K's verdict) from whatever runs its --out held, a user's own data included."""
    from ctrl.app.report import append_record

    monkeypatch.chdir(tmp_path)
    for seed in (0, 1):
        for variant, auc in (("base", 0.70 + seed / 100), ("ctrl", 0.72 + seed / 200)):
            append_record(tmp_path / "out" / "results.jsonl", {
                "variant": variant, "backbone": "dcn", "seed": seed, "phases": {"stage 2": 1.0},
                "metrics": {"val/auc": auc, "test/auc": auc, "test/logloss": 0.5}, "command": "ctrl bench",
                "overrides": {"both": [], "align": [], "finetune": []}})
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "RESULTS.md").write_text("the committed report")
    main(["bench", "--config", "configs/bench/ml100k.yaml", "--report_only", "true", "--out", "out"])  # shipped config
    report = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "| dcn |" in report and "MovieLens-100K" not in report  # no other data set's verdict before the tables
    assert (tmp_path / "out" / "results_auc.png").is_file()
    assert (tmp_path / "benchmarks" / "RESULTS.md").read_text() == "the committed report"
    # the headline's overlay names the committed report, its plot and preface (absent here: left out)
    main(["bench", "--config", "configs/bench/ml100k.yaml", "--config", str(ROOT / "benchmarks" / "headline_ml100k"
          / "report.yaml"), "--report_only", "true", "--out", "out"])
    assert "| dcn |" in (tmp_path / "benchmarks" / "RESULTS.md").read_text()
    assert (tmp_path / "benchmarks" / "headline_ml100k" / "results_auc.png").is_file()
