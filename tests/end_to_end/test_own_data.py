"""Users' own data and serving: any RecBole atomic data set, scoring new rows from a file, ONNX export."""

import shlex
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from helpers import ml100k_configs

from ctrl.app.cli import main
from finetune.export import encode_rows, export_model, load_scorer
from tabular2text.datamodule import CTRDataModule
from tabular2text.download import from_recbole_wheel
from tabular2text.prepare import labelled_splits
from tabular2text.schema import OOV
from tabular2text.sources import DataError, read_atomic, read_recbole, read_table
from towers import BACKBONES
from towers.collaborative import CTRModel, backbone_config

ROOT = Path(__file__).resolve().parents[2]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"

SHOP_ITEM = """item_id:token\ttitle:token\tcategories:token_seq\tprice:float\tbrand:token
B01\tRed Kettle\tKitchen Home\t25.5\tAcme
B02\tDesk Lamp\tHome\t\tGlobex
B03\tGarden Hose\tGarden\t12\tAcme
"""
SHOP_USER = """user_id:token\tcountry:token
U1\tFR
U2\tDE
"""
SHOP_INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
U1\tB01\t5\t1
U2\tB02\t2\t2
U1\tB03\t3\t3
U2\tB01\t4\t4
U1\tB02\t1\t5
U2\tB03\t5\t6
U1\tB01\t4\t7
U2\tB02\t5\t8
U1\tB03\t2\t9
U2\tB01\t5\t10
U1\tB02\t4\t11
U2\tB03\t1\t12
"""


def write_shop(directory: Path, item: str = SHOP_ITEM, inter: str = SHOP_INTER) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".item", item), (".user", SHOP_USER), (".inter", inter)):
        (directory / f"shop{suffix}").write_text(text)
    return directory


@pytest.fixture(scope="module")
def recbole_ml100k(tmp_path_factory) -> Path:
    """The ML-100K atomic files of the recbole==1.2.1 wheel (pip download, checked against its SHA-256)."""
    directory = tmp_path_factory.mktemp("recbole-ml-100k")
    from_recbole_wheel(directory)
    return directory


def test_an_amazon_style_recbole_set_maps_header_types_to_kinds(tmp_path):
    dm = CTRDataModule(str(write_shop(tmp_path / "shop")), cache_dir=str(tmp_path / "cache"))
    spec = dm.feature_spec
    kinds = {f.name: (f.kind, f.side, f.text_name) for f in spec.fields}
    assert kinds == {"user_id": ("categorical", "user", None), "country": ("categorical", "user", "country"),
                     "history": ("sequence", "user", "history"), "item_id": ("categorical", "item", None),
                     "title": ("categorical", "item", "title"), "categories": ("multi_valued", "item", "categories"),
                     "price": ("numeric", "item", "price"), "brand": ("categorical", "item", "brand")}
    assert spec["history"].text_field == "title"
    rows = pd.concat([dm.frame(s) for s in ("train", "val", "test")], ignore_index=True)
    assert len(rows) == 11  # the rating of 3 is dropped: above 3 positive, below 3 negative
    assert rows.label.tolist() == [1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 0]
    # U1's history holds B03 too: the interaction whose rating of 3 dropped its row still happened
    assert rows.user_text[3] == ("This is a user, country is FR, who has recently interacted with"
                                 " Red Kettle|Garden Hose.")
    assert rows.item_text[0] == ("This is an item, title is Red Kettle, categories is Kitchen|Home, price is 25.5,"
                                 " brand is Acme.")
    assert rows.item_text[1] == "This is an item, title is Desk Lamp, categories is Home, brand is Globex."


def test_a_byte_order_mark_and_an_item_without_a_line_in_the_item_table(tmp_path):
    """Files saved with a UTF-8 BOM read as without one; an interaction whose item has no .item line keeps
    its row, with that item's features missing (no values, not a crash)."""
    data = write_shop(tmp_path / "shop", inter=SHOP_INTER.replace("U2\tB02\t5\t8", "U2\tB99\t5\t8"))
    for path in data.iterdir():
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    dm = CTRDataModule(str(data), cache_dir=str(tmp_path / "cache"))
    assert dm.feature_spec.names[0] == "user_id"
    rows = pd.concat([dm.frame(s) for s in ("train", "val", "test")], ignore_index=True)
    assert len(rows) == 11 and "This is an item." in rows.item_text.tolist()


def test_a_latin_1_line_in_a_recbole_file_is_read_as_latin_1(tmp_path, capsys):
    """As the README promises for every delimited file: a line that is not UTF-8 is read as latin-1, in the
    .item table (which also tells RecBole's MovieLens conversions apart) and the .user table alike; a file
    mixing both encodings is named in a warning with its first latin-1 line."""
    data = write_shop(tmp_path / "shop")
    (data / "shop.item").write_bytes(SHOP_ITEM.replace("Red Kettle", "Café Kettle").encode("latin-1"))
    (data / "shop.user").write_bytes(SHOP_USER.encode() + "U3\tCuraçao\n".encode("latin-1"))
    table = read_table(data)
    assert "Café Kettle" in table.frame["title"].tolist() and capsys.readouterr().err == ""
    (data / "shop.user").write_bytes(SHOP_USER.encode() + "U3\tCuraçao\n".encode("latin-1")
                                     + "U4\tCôte d'Ivoire\n".encode())
    assert read_atomic(data / "shop.user")[0].country.tolist() == ["FR", "DE", "Curaçao", "Côte d'Ivoire"]
    assert f"warning: {data / 'shop.user'}: 1 line(s) are not UTF-8 (first: line 4)" in capsys.readouterr().err


def test_a_recbole_set_saved_with_windows_line_ends_reads_as_it_does_with_unix_ones(tmp_path):
    """Its header's last type read as 'float\\r' and the whole set was refused as no RecBole file."""
    unix = read_table(write_shop(tmp_path / "unix"))
    windows = write_shop(tmp_path / "windows")
    for path in windows.iterdir():
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    table = read_table(windows)
    pd.testing.assert_frame_equal(table.frame, unix.frame)
    assert table.fields == unix.fields


def test_a_schema_yaml_overrides_label_text_and_columns_of_a_recbole_set(tmp_path):
    lines = SHOP_ITEM.splitlines()
    item = "\n".join([lines[0] + "\temb:float_seq", *(line + "\t0.1 0.2" for line in lines[1:])]) + "\n"
    data = write_shop(tmp_path / "shop", item=item)
    with pytest.raises(DataError, match=r"'emb' is float_seq.*exclude: \[emb\]"):
        read_table(data)
    schema = tmp_path / "shop.yaml"
    schema.write_text("data: shop\nlabel: {column: rating, positive_above: 3.5, negative_below: 1.5}\n"
                      "exclude: [emb, brand]\nitem_noun: product\nhistory: false\n"
                      "fields:\n  - {name: country, text: shipping country, values: {FR: France}}\n")
    table = read_table(schema)
    assert [f.name for f in table.fields] == ["user_id", "country", "item_id", "title", "categories", "price"]
    dm = CTRDataModule(str(schema), cache_dir=str(tmp_path / "cache"))
    rows = pd.concat([dm.frame(s) for s in ("train", "val", "test")], ignore_index=True)
    assert len(rows) == 9 and rows.user_text[0] == "This is a user, shipping country is France."
    assert rows.item_text[0].startswith("This is a product, title is Red Kettle")
    schema.write_text("data: shop\nuser: customer\n")
    with pytest.raises(DataError, match="no user-id column 'customer'"):
        read_table(schema)


def test_the_recbole_wheel_ml100k_reads_through_the_generic_atomic_mapping(recbole_ml100k):
    """The same files read as any atomic data set (not the MovieLens mapping) give the same labelled rows."""
    generic = read_recbole(recbole_ml100k)
    kinds = {f.name: f.kind for f in generic.fields}
    assert kinds == {"user_id": "categorical", "age": "categorical", "gender": "categorical",
                     "occupation": "categorical", "zip_code": "categorical", "history": "sequence",
                     "item_id": "categorical", "movie_title": "multi_valued", "release_year": "categorical",
                     "class": "multi_valued"}
    movielens = read_table(recbole_ml100k)  # RecBole's MovieLens conversion: the raw readers' fields
    assert [f.name for f in movielens.fields] == [f.name for f in read_table(ML100K).fields]
    a, b = labelled_splits(generic), labelled_splits(movielens)
    for split in ("train", "val", "test"):
        assert len(a[split]) == len(b[split])
        assert a[split].label.tolist() == b[split].label.tolist()
    assert sum(len(p) for p in a.values()) == 72_855


@pytest.fixture(scope="module")
def ml100k_spec_and_test(tmp_path_factory):
    dm = CTRDataModule(str(ML100K), cache_dir=str(tmp_path_factory.mktemp("cache")))
    return dm.feature_spec, dm.tensors("test")


@pytest.mark.parametrize("name", BACKBONES)
def test_model_onnx_scores_the_test_split_as_torch_does(tmp_path, ml100k_spec_and_test, name):
    spec, test = ml100k_spec_and_test
    torch.manual_seed(0)
    backbone = BACKBONES[name](spec)
    model = CTRModel(backbone).eval()
    export_model(model, spec, backbone_config(BACKBONES[name]), tmp_path / "export")
    session = ort.InferenceSession(str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logit"]
    logits = session.run(None, {i.name: test[i.name].numpy() for i in session.get_inputs()})[0]
    with torch.no_grad():
        expected = model(test).numpy()
    assert logits.shape == (len(test["row"]),)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    all_missing = pd.DataFrame({spec.user_field: [None] * 3})  # a column of the model, no value in it
    np.testing.assert_allclose(load_scorer(tmp_path / "export")(all_missing).shape, (3,))


def test_ctrl_score_new_rows_from_csv_and_parquet(tmp_path, capsys):
    """A model trained with `ctrl fit` scores a file of raw rows: from the checkpoint or its export, the same
    probabilities; the ids and the label (by the training rule) come along; a bad value is one line."""
    main(["fit", *ml100k_configs("finetune"), "--data.data_dir", str(ML100K),
          "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path),
          "--trainer.logger", "false", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "5"])
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    raw = labelled_splits(read_table(ML100K))["test"].head(300).drop(columns=["label", "history"])
    raw["genres"] = raw["genres"].map("|".join)  # as a CSV holds a list
    raw.to_csv(tmp_path / "rows.csv", index=False)
    main(["score", "--model", str(ckpt), "--rows", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "a.parquet")])
    assert "scored 300 rows" in capsys.readouterr().out
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "export")])
    raw.to_parquet(tmp_path / "rows.parquet")
    main(["score", "--model", str(tmp_path / "export"), "--rows", str(tmp_path / "rows.parquet"),
          "--out", str(tmp_path / "b.parquet")])
    a, b = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    assert list(a.columns) == ["user_id", "item_id", "probability", "label"]
    assert a.user_id.tolist() == raw.user_id.tolist()
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-6)
    expected = np.where(raw.rating > 3, 1, np.where(raw.rating < 3, 0, -1))
    assert a.label.fillna(-1).tolist() == expected.tolist()  # rating 3 keeps its row, without a label

    bad = raw.copy()
    bad["age"] = bad["age"].astype(str)
    bad.loc[bad.index[6], "user_id"] = None  # a missing value is scored as missing
    bad.drop(columns=["rating"]).to_csv(tmp_path / "unlabelled.csv", index=False)
    main(["score", "--model", str(tmp_path / "export"), "--rows", str(tmp_path / "unlabelled.csv"),
          "--out", str(tmp_path / "c.parquet")])
    c = pd.read_parquet(tmp_path / "c.parquet")
    assert "label" not in c and np.isfinite(c.probability).all() and c.user_id.isna().sum() == 1


def test_ctrl_score_refuses_a_bad_value_in_one_line_and_writes_nothing(tmp_path, capsys):
    from towers import DCN

    spec = CTRDataModule(str(ROOT / "configs" / "generic" / "schema.yaml"), cache_dir=str(tmp_path)).feature_spec
    export_model(CTRModel(DCN(spec)), spec, backbone_config(DCN), tmp_path / "export")
    (tmp_path / "rows.csv").write_text("user_id,price\n7,1.5\n\n8,abc\n")
    (tmp_path / "labels.csv").write_text("user_id,click\n7,1\n8,\n9,2\n")  # empty: no label; 2: no label value
    out = tmp_path / "scores.parquet"
    for rows, message in ((tmp_path / "rows.csv", "row 2, column 'price': 'abc' is not a number"),
                          (tmp_path / "labels.csv", "row 3, column 'click': a label must be 0 or 1 (as in training),"
                                                    " found '2'"),
                          (tmp_path / "rows.txt", "must be a .csv or .parquet file"),
                          (tmp_path / "missing.csv", "does not exist")):
        shutil.copy(tmp_path / "rows.csv", tmp_path / "rows.txt")
        with pytest.raises(SystemExit) as exit_info:
            main(["score", "--model", str(tmp_path / "export"), "--rows", str(rows), "--out", str(out)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:  # it wrote parquet bytes into scores.csv
        main(["score", "--model", str(tmp_path / "export"), "--rows", str(tmp_path / "labels.csv"), "--out",
              str(tmp_path / "scores.csv")])
    assert exit_info.value.code == 2 and "writes a parquet file; name it *.parquet" in capsys.readouterr().err
    assert not (tmp_path / "scores.csv").exists()


def test_ctrl_score_warns_when_the_rows_do_not_look_like_the_training_data(tmp_path, capsys):
    """Rows that score without error but not as trained: ids written otherwise (zero-padded, or another data set's)
    all score as unknown, and a feature column absent from every row as missing; each gets a warning line."""
    from towers import DCN

    spec = CTRDataModule(str(ROOT / "configs" / "generic" / "schema.yaml"), cache_dir=str(tmp_path)).feature_spec
    export_model(CTRModel(DCN(spec)), spec, backbone_config(DCN), tmp_path / "export")
    training = pd.read_csv(ROOT / "configs" / "generic" / "clicks.csv", dtype=str)
    for name, rows in (("same", training), ("padded", training.assign(user_id=training.user_id.str.zfill(5)))):
        rows.to_csv(tmp_path / f"{name}.csv", index=False)
        main(["score", "--model", str(tmp_path / "export"), "--rows", str(tmp_path / f"{name}.csv"), "--out",
              str(tmp_path / f"{name}.parquet")])
    err = capsys.readouterr().err.splitlines()
    history = "warning: the rows have no column history: scored as missing in every row"
    assert err == [history, history, "warning: 100% of the values of 'user_id' were never seen in training (scored as"
                   " unknown); are the ids written as in the training data, and is this the model for it?"]
    assert len(pd.read_parquet(tmp_path / "padded.parquet")) == len(training)  # a warning, not a refusal


def test_the_readme_own_data_commands_run_verbatim(tmp_path, monkeypatch, capsys):
    """Each command of the README's "Your own data" block, as written, from a folder laid out like the
    repository root (its configs/); outputs land in that folder."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Your own data", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert len(commands) == 6 and all(c[0] == "ctrl" for c in commands)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CTRL_CACHE_DIR", str(tmp_path / "cache"))
    for command in commands:
        main(command[1:])
    out = capsys.readouterr().out
    assert out.count("test AUC") == 2 and "This is an item, title is" in out
    generic = pd.read_parquet(tmp_path / "runs" / "generic" / "scores.parquet")
    assert len(generic) == 60 and generic.probability.between(0, 1).all() and generic.label.notna().all()
    shop = pd.read_parquet(tmp_path / "runs" / "shop" / "scores.parquet")
    assert shop.user_id.tolist() == ["U03", "U05", "U99", "U10"]
    assert shop.label.tolist()[:2] == [1, 0] and shop.label.isna().tolist()[2:] == [True, True]
    assert (tmp_path / "runs" / "shop" / "finetune" / "export" / "model.onnx").is_file()
    # new_rows.csv joins its RecBole token_seq values as the .item file does (a space): known categories, not the
    # out-of-vocabulary id its old "Garden|Home" scored as
    spec = load_scorer(tmp_path / "runs" / "shop" / "finetune" / "export").spec
    categories = encode_rows(pd.read_csv(ROOT / "configs" / "recbole" / "new_rows.csv", dtype=str), spec)["categories"]
    assert [sorted(set(ids) - {0}) != [] and OOV not in ids for ids in categories] == [True] * 4
