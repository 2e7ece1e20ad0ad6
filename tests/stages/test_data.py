"""The data pipeline on real MovieLens-100K, both download routes, ML-1M layout, generic data, bad input."""

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import GENERIC_CSV, GENERIC_SCHEMA, ML100K, write_generic, write_ml1m

from ctrl.app.cli import main
from tabular2text.datamodule import CTRDataModule
from tabular2text.download import ensure_movielens_100k
from tabular2text.prepare import prepare
from tabular2text.schema import OOV, FeatureSpec
from tabular2text.text_side import TextSide


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def ml100k(cache) -> Path:
    return prepare(ML100K, cache)


def splits(prepared: Path) -> dict[str, pd.DataFrame]:
    return {s: pd.read_parquet(prepared / f"{s}.parquet") for s in ("train", "val", "test")}


def test_ml100k_paper_protocol(ml100k):
    parts = splits(ml100k)
    sizes = {s: len(p) for s, p in parts.items()}
    assert sizes == {"train": 58284, "val": 7285, "test": 7286}  # 72,855 = 100,000 minus 27,145 ratings of 3
    assert parts["train"].timestamp.max() <= parts["val"].timestamp.min()
    assert parts["val"].timestamp.max() <= parts["test"].timestamp.min()
    for p in parts.values():
        assert p.timestamp.is_monotonic_increasing
        assert set(p.label.unique()) == {0, 1}
    # Labels against the raw file: rating > 3 -> 1, rating < 3 -> 0, rating 3 dropped.
    raw = pd.read_csv(ML100K / "u.data", sep="\t", names=["u", "i", "r", "t"])
    assert (raw.r != 3).sum() == 72855 and (raw.r > 3).sum() == sum(int(p.label.sum()) for p in parts.values())


def test_val_fold_validates_on_an_earlier_block_and_keeps_test(ml100k, cache):
    """val_fold 1: validation is the block before the usual one, train everything before it, the usual
    validation rows become the gap; test is the same rows; out-of-range folds are refused by name."""
    from tabular2text.prepare import DataError

    fold = prepare(ML100K, cache, val_fold=1)
    assert fold != ml100k
    usual, moved = splits(ml100k), {s: pd.read_parquet(fold / f"{s}.parquet") for s in ("train", "val", "gap", "test")}
    assert {s: len(p) for s, p in moved.items()} == {"train": 50999, "val": 7285, "gap": 7285, "test": 7286}
    for split, rows in (("train", slice(0, 50999)), ("val", slice(50999, 58284))):
        assert moved[split]["user_text"].tolist() == usual["train"]["user_text"].iloc[rows].tolist()
    assert moved["gap"]["user_text"].tolist() == usual["val"]["user_text"].tolist()
    for column in ("user_text", "item_text", "label", "timestamp"):
        assert moved["test"][column].tolist() == usual["test"][column].tolist()
    with pytest.raises(DataError, match="val_fold 8 leaves fewer training rows than one validation block.*up to 7"):
        prepare(ML100K, cache, val_fold=8)


def test_history_is_the_k_most_recent_strictly_earlier_items(ml100k):
    spec = FeatureSpec.load(ml100k / "feature_spec.json")
    vocab = spec.vocabulary_of("item_id")
    users = spec.vocabulary_of("user_id")
    raw = pd.read_csv(ML100K / "u.data", sep="\t", names=["u", "i", "r", "t"], dtype={"u": str, "i": str})
    test = splits(ml100k)["test"]
    for _, row in test[test.user_id > OOV].head(25).iterrows():
        user = users[row.user_id - 2]
        mine = raw[(raw.u == user) & (raw.t < row.timestamp)].sort_values("t", kind="stable")
        expected = [vocab.index(i) + 2 if i in vocab else OOV for i in mine.i.tail(10)]  # any rating counts
        assert list(row.history) == expected


def test_history_by_hand_ties_length_and_rows_without_user():
    """Same-time rows never see each other; only the newest `length` items are kept; no user, no history."""
    from tabular2text.prepare import build_history

    frame = pd.DataFrame({"u": ["a", None, "a", None, "b", "a", "a", "a"], "i": list("xyzwvqrs"),
                          "t": [1, 2, 2, 3, 3, 3, 3, 4]})
    assert build_history(frame, "u", "i", "t", 2).tolist() == [[], [], ["x"], [], [], ["x", "z"], ["x", "z"],
                                                              ["q", "r"]]


def test_vocabularies_come_from_train_only(ml100k):
    spec = FeatureSpec.load(ml100k / "feature_spec.json")
    parts = splits(ml100k)
    assert spec["item_id"].vocab_size == len(spec.vocabularies["item_id"]) + 2
    assert (parts["train"].item_id > OOV).all()
    assert (parts["test"].item_id == OOV).sum() > 0  # items first rated after the train period


def test_prepared_data_is_reused_and_any_option_change_recomputes(ml100k, cache):
    mtime = (ml100k / "train.parquet").stat().st_mtime_ns
    assert prepare(ML100K, cache) == ml100k
    assert (ml100k / "train.parquet").stat().st_mtime_ns == mtime
    other = prepare(ML100K, cache, history_length=3)
    assert other != ml100k
    assert max(len(h) for h in pd.read_parquet(other / "val.parquet").history) == 3


def test_recbole_wheel_route_gives_identical_parquet(ml100k, tmp_path, cache):
    """Offline, GroupLens fails fast and the RecBole copy in the recbole==1.2.1 wheel is used; online, the
    GroupLens archive is. Either way the prepared content equals the raw ML-100K files'."""
    downloaded = ensure_movielens_100k(tmp_path / "ml-100k")
    other = prepare(downloaded, cache)
    for split, frame in splits(ml100k).items():
        pd.testing.assert_frame_equal(frame, pd.read_parquet(other / f"{split}.parquet"))
    assert (other / "feature_spec.json").read_text() == (ml100k / "feature_spec.json").read_text()


def test_datamodule_batches_follow_the_contract(ml100k, cache):
    dm = CTRDataModule(str(ML100K), batch_size=512, cache_dir=str(cache))
    assert dm.prepared_dir == ml100k
    batch = next(iter(dm.train_dataloader()))
    spec = dm.feature_spec
    assert batch["label"].shape == (512,) and batch["label"].dtype == torch.float32
    assert batch["history"].shape == (512, 10) and batch["history_mask"].dtype == torch.bool
    assert torch.equal(batch["history_mask"], batch["history"] != 0)
    assert batch["genres"].shape[1] == spec["genres"].max_len
    first, second = dm.texts("train")
    row = int(batch["row"][0])
    assert first[row].startswith("This is a user, ") and first[row].endswith(".")
    assert second[row].startswith("This is a movie, title is ") and second[row].endswith(".")
    profile = dm.profile_texts("train")[row]
    assert "who has recently" not in profile and first[row].startswith(profile.removesuffix("."))


def test_the_data_module_serves_each_batch_its_text(bert_dir, tmp_path):
    """serve_text: a frozen encoder's cached vectors of the batch's own rows, or a trainable tower's token ids,
    next to the features. Without it (stage 2) batches carry no text, and test batches never do."""
    from helpers import write_small_ml1m

    from towers.encoder import FrozenEncoder
    from towers.language import LanguageTower

    dm = CTRDataModule(str(write_small_ml1m(tmp_path / "ml-1m")), batch_size=32, cache_dir=str(tmp_path / "cache"))
    assert "text" not in next(iter(dm.train_dataloader()))
    tower = LanguageTower(bert_dir)
    row_text = TextSide.from_settings(dm.feature_spec)
    dm.serve_text(row_text, encoder=FrozenEncoder(tower, precision="fp32"))
    assert len(list((tmp_path / "cache" / "text-vectors").iterdir())) == 1  # one entry: every row before test
    reference = FrozenEncoder(LanguageTower(bert_dir), precision="fp32")
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
        batch = next(iter(loader))
        users, items = dm.texts(split)
        rows = batch["row"].tolist()
        torch.testing.assert_close(batch["text"], reference.encode([users[i] for i in rows], [items[i] for i in rows]),
                                   atol=1e-5, rtol=1e-5)
    assert "text" not in next(iter(dm.test_dataloader()))
    tokens = TextSide.from_settings(dm.feature_spec, trainable_layers=1)
    dm.serve_text(tokens, tokenize=tower.tokenize)
    batch = next(iter(dm.val_dataloader()))
    users, items = dm.texts("val")
    expected = tower.tokenize([users[i] for i in batch["row"].tolist()], [items[i] for i in batch["row"].tolist()])
    assert torch.equal(batch["text"]["input_ids"], expected["input_ids"])
    with pytest.raises(ValueError, match="serving vectors takes encoder alone .* given: neither"):
        dm.serve_text(row_text)
    with pytest.raises(ValueError, match="serving tokens takes tokenize alone .* given: encoder"):
        dm.serve_text(tokens, encoder=reference)


# The default; `{items}` twice, which is formatted per row; no `{items}`; a side separator of whitespace only.
TEMPLATES = ["natural", {"behavior": "who {action} {items}, then again {items}"}, {"behavior": "who has a past"},
             {"side_sep": " ", "feature_sep": "; "}]


@pytest.mark.parametrize("template", TEMPLATES)
def test_rendering_once_per_entity_equals_rendering_every_row(ml100k, cache, template):
    """prepare renders each distinct user and item once and joins the behavior phrases of all rows at once;
    that must give exactly the text of TextRenderer.render on every row (ML-100K train and the generic shop
    data)."""
    from tabular2text.prepare import labelled_splits, render_texts
    from tabular2text.sources import read_table
    from tabular2text.templates import TextRenderer, preset

    for source in (ML100K, write_generic(Path(str(cache)) / f"shop-render-{TEMPLATES.index(template)}")):
        dm = CTRDataModule(str(source), cache_dir=str(cache), template=template)
        table, spec = read_table(Path(source), 10), dm.feature_spec
        part = labelled_splits(table)["train"]
        if template != "natural":
            part = part.iloc[-3000:]  # the user side is what differs; 3,000 rows of long histories are enough
        renderer = TextRenderer(spec.fields, preset(template), spec.item_noun, spec.history_action)
        fast = render_texts(part, table, spec, template)
        names = {}
        for f in spec.fields:
            if f.kind == "sequence" and f.text_field:
                named = table.frame.drop_duplicates(f.shares_embedding)
                names = dict(zip(named[f.shares_embedding], named[f.text_field], strict=True))
        for i, row in enumerate(part.to_dict("records")):
            row["history"] = [names.get(h, h) for h in row["history"]]
            slow = renderer.render(row)
            assert (fast.user_text.iloc[i], fast.item_text.iloc[i]) == (slow.user_text, slow.item_text), i
            assert fast.user_profile_text.iloc[i] == renderer.render({**row, "history": []}).user_text
        if template == "natural":
            assert dm.texts("train") == (fast.user_text.tolist(), fast.item_text.tolist())


def test_list_columns_encode_and_pad_alike_from_python_and_arrow_lists():
    """Preparation hands Arrow list columns (no Python list per row) to the encoder, the scorer Python lists:
    both give the same ids, keep the newest max_len known entries, and pad the same."""
    import pyarrow as pa

    from tabular2text.encode import encode_column, pad_lists
    from tabular2text.schema import Field

    spec = FeatureSpec(fields=(Field("item", "categorical", "item", vocab_size=5),
                               Field("history", "sequence", "user", max_len=2, shares_embedding="item",
                                     vocab_size=5)),
                       vocabularies={"item": ["a", "b", "c"]}, numeric_stats={})
    rows = [["a", "b", "c"], [], ["z", None, "b"], ["", "c"]]
    python = pd.Series(rows, dtype=object)
    arrow = pd.Series(pd.arrays.ArrowExtensionArray(pa.array(rows, type=pa.list_(pa.string()))))
    for values in (python, arrow):
        ids = encode_column(values, spec["history"], spec)
        assert ids.tolist() == [[3, 4], [], [1, 3], [4]]  # unseen z: 1; None and "": dropped; newest two kept
        assert pad_lists(ids, 2).tolist() == [[3, 4], [0, 0], [1, 3], [4, 0]]


def test_an_empty_value_is_missing_in_training_as_in_serving(tmp_path):
    """A user without a zip code (an empty last column in users.dat) gets the padding id, not the unseen one,
    in the prepared data as in the exported model's encoder, and no "zip code" in its text."""
    from finetune.export import encode_rows
    from tabular2text.prepare import labelled_splits
    from tabular2text.sources import read_table

    write_ml1m(tmp_path / "ml-1m", "utf-8")
    users = (tmp_path / "ml-1m" / "users.dat").read_text().splitlines()
    users[0] = users[0].rsplit("::", 1)[0] + "::"
    (tmp_path / "ml-1m" / "users.dat").write_text("\n".join(users) + "\n")
    user = users[0].split("::")[0]
    dm = CTRDataModule(str(tmp_path / "ml-1m"), cache_dir=str(tmp_path / "cache"))
    raw = pd.concat(labelled_splits(read_table(tmp_path / "ml-1m")).values(), ignore_index=True)
    prepared = pd.concat([dm.frame(s) for s in ("train", "val", "test")], ignore_index=True)
    mine = (raw["user_id"] == user).to_numpy()
    assert mine.any() and (prepared["zip_code"][mine] == 0).all() and (prepared["zip_code"][~mine] > 1).all()
    assert encode_rows(raw[mine], dm.feature_spec)["zip_code"].eq(0).all()
    assert not prepared["user_text"][mine].str.contains("zip code").any()


def test_item_catalog_names_every_known_item_once(ml100k, cache):
    dm = CTRDataModule(str(ML100K), cache_dir=str(cache))
    ids, texts = dm.item_catalog()
    assert len(ids) == len(set(ids.tolist())) == dm.feature_spec["item_id"].vocab_size - 2
    by_id = dict(zip(ids.tolist(), texts, strict=True))
    train = dm.frame("train")
    assert all(by_id[i] == t for i, t in zip(train.item_id.head(500), train.item_text.head(500), strict=True))


# --- ML-1M layout and generic data -------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8"])
def test_ml1m_layout_through_the_same_pipeline(tmp_path, encoding):
    write_ml1m(tmp_path / "ml-1m", encoding)
    dm = CTRDataModule(str(tmp_path / "ml-1m"), cache_dir=str(tmp_path / "cache"))
    texts = " ".join(pd.concat([dm.frame(s) for s in ("train", "val", "test")]).item_text)
    texts += " ".join(pd.concat([dm.frame(s) for s in ("train", "val", "test")]).user_text)
    assert "Cité des enfants perdus" in texts  # decoded correctly from either encoding
    assert "age is 56+" in texts and "occupation is self-employed" in texts
    assert sum(len(dm.frame(s)) for s in ("train", "val", "test")) > 0
    assert next(iter(dm.val_dataloader()))["history"].shape[1] == 10


def test_generic_csv_and_yaml_through_the_same_pipeline(tmp_path):
    dm = CTRDataModule(str(write_generic(tmp_path / "shop")), cache_dir=str(tmp_path / "cache"))
    train = dm.frame("train")
    assert len(train) == 16 and list(train.timestamp) == sorted(train.timestamp)
    text = train.user_text + " " + train.item_text
    assert text.iloc[7] == ("This is a user, gender is male, who has recently bought Blue Hat|Red Shoes."
                            " This is a product, title is Green Bag, tags is bag|green, price is 20.")
    assert text.iloc[2] == ("This is a user. This is a product, title is Green Bag, tags is bag|green.")
    assert train.user_profile_text.iloc[7] == "This is a user, gender is male."
    batch = next(iter(dm.train_dataloader()))
    assert batch["price"].dtype == torch.float32 and batch["tags"].shape == (16, 2)
    assert (dm.feature_spec.user_field, dm.feature_spec.item_field) == ("user", "item")
    mean, std = dm.feature_spec.numeric_stats["price"]  # train = ts 1..16; ts 3 has no price
    assert mean == pytest.approx(np.mean([12.5, 12.5, 30, 30, 30, 20, 20, 12.5, 99, 20, 12.5, 12.5, 30, 30, 20]))


def test_a_generic_csv_line_with_fewer_values_than_the_header_is_refused_by_its_line(tmp_path):
    """pandas would fill the missing values in; the line is named as the CSV holds it (blank lines and a quoted
    value over two lines count), and an empty last value, written between commas, is only missing."""
    from tabular2text.sources import DataError, read_table

    lines = GENERIC_CSV.splitlines()
    lines[2] = lines[2].replace("Blue Hat", '"Blue\nHat"')  # one value over lines 3 and 4
    lines[5] = lines[5].rsplit(",", 1)[0] + ","  # an empty timestamp: missing, not a short line
    schema = write_generic(tmp_path / "g", csv="\n".join([*lines[:4], "", *lines[4:]]) + "\n")
    assert read_table(schema).frame["ts"].isna().sum() == 1
    lines[6] = lines[6].rsplit(",", 1)[0]  # u3,F,i1,...,0 on line 9: one value too few
    schema = write_generic(tmp_path / "g", csv="\n".join([*lines[:4], "", *lines[4:]]) + "\n")
    with pytest.raises(DataError, match=r"g/clicks.csv:9: expected 8 ','-separated columns, found 7 in 'u3,F,i1,"):
        read_table(schema)


def test_a_parquet_list_column_prepares_as_its_joined_strings_do(tmp_path):
    """Parquet stores a multi-valued column as lists (as `ctrl score` takes them): they prepare to the same ids
    and texts as the `|`-joined strings, a one-element list included (its token is "hat", never "['hat']");
    a list in a categorical column is refused by row and column."""
    from tabular2text.sources import DataError, read_table

    rows = pd.read_csv(io.StringIO(GENERIC_CSV), dtype=str)
    rows.loc[3, "tags"], rows.loc[5, "tags"] = None, ""
    lists = rows["tags"].map(lambda v: [t for t in v.split("|") if t] if isinstance(v, str) else None)
    assert lists[1] == ["hat"] and lists[5] == []
    frames, schema = {}, GENERIC_SCHEMA.replace("data: clicks.csv", "data: clicks.parquet")
    for name, tags in (("joined", rows["tags"]), ("lists", lists)):
        write_generic(tmp_path / name, schema=schema)
        rows.assign(tags=tags).to_parquet(tmp_path / name / "clicks.parquet")
        dm = CTRDataModule(str(tmp_path / name / "schema.yaml"), cache_dir=str(tmp_path / "cache"))
        frames[name] = pd.concat([dm.frame(s) for s in ("train", "val", "test")], ignore_index=True)
        assert sorted(dm.feature_spec.vocabularies["tags"]) == ["bag", "green", "hat", "jewel", "red", "shoes"]
    pd.testing.assert_frame_equal(frames["joined"], frames["lists"])
    assert frames["lists"].item_text[0] == "This is a product, title is Blue Hat, tags is hat, price is 12.5."
    rows.assign(title=rows["title"].map(lambda v: [v])).to_parquet(tmp_path / "lists" / "clicks.parquet")
    with pytest.raises(DataError, match=r"clicks.parquet: row 1, column 'title': a list \(\['Red Shoes'\]\) where a"
                                        " categorical field takes one value"):
        read_table(tmp_path / "lists" / "schema.yaml")


def test_preparation_and_the_scorer_key_every_dtype_the_same_way(tmp_path):
    """Raw ids of float-with-NaN, nullable-integer, boolean and string columns get the same ids in the
    prepared train split as when the same raw rows go through the exported model's encoder."""
    from finetune.export import encode_rows
    from tabular2text.schema import vocab_key

    assert [vocab_key(v) for v in (37, 37.0, np.int64(37), np.float32(37), 2.5, True, np.bool_(False), "x")] == [
        "37", "37", "37", "37", "2.5", "True", "False", "x"]
    assert [vocab_key(v) for v in (None, float("nan"), pd.NA, "", "NaN")] == [None] * 5
    n = 40
    frame = pd.DataFrame({
        "user": pd.Series([float(i % 7) if i != 3 else np.nan for i in range(n)]),  # int ids made float by a NaN
        "item": pd.array([i % 5 if i != 4 else None for i in range(n)], dtype="Int64"),
        "member": pd.array([i % 2 == 0 for i in range(n)], dtype="boolean"),
        "city": [f"c{i % 3}" for i in range(n)],
        "click": [i % 2 for i in range(n)], "ts": range(n)})
    (tmp_path / "data").mkdir()
    frame.to_parquet(tmp_path / "data" / "rows.parquet")
    (tmp_path / "data" / "schema.yaml").write_text(
        "data: rows.parquet\nlabel: click\ntimestamp: ts\nfields:\n"
        "  - {name: user, kind: categorical, side: user}\n  - {name: item, kind: categorical, side: item}\n"
        "  - {name: member, kind: categorical, side: user, text: member}\n"
        "  - {name: city, kind: categorical, side: user, text: city}\n")
    dm = CTRDataModule(str(tmp_path / "data" / "schema.yaml"), cache_dir=str(tmp_path / "cache"))
    prepared = dm.frame("train")
    served = encode_rows(frame.iloc[:len(prepared)], dm.feature_spec)
    for name in ("user", "item", "member", "city"):
        assert served[name].tolist() == prepared[name].tolist(), name
        assert (prepared[name] > 1).mean() > 0.9, name  # known ids, not all out-of-vocabulary


def test_the_example_schema_runs_as_written_and_an_undeclared_id_field_is_one_line(tmp_path, capsys):
    example = Path(__file__).resolve().parents[2] / "configs" / "generic" / "schema.yaml"
    main(["prepare", "--data_dir", str(example), "--cache_dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert "train        48" in out and "This is a user, gender is" in out and "This is a product, title is" in out
    broken = tmp_path / "example"
    broken.mkdir()
    (broken / "clicks.csv").write_text((example.parent / "clicks.csv").read_text())
    text = example.read_text()
    for old, key in (("  - {name: item_id, kind: categorical, side: item}\n", "`item: item_id` names no"),
                     ("  - {name: title, kind: categorical, side: item, text: title}\n", "title}` names no")):
        (broken / "schema.yaml").write_text(text.replace(old, ""))
        with pytest.raises(SystemExit) as exit_info:
            main(["prepare", "--data_dir", str(broken / "schema.yaml"), "--cache_dir", str(tmp_path / "cache")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and key in err, err


# Bad input (missing files, malformed lines, bad labels, bad schemas ...) is in test_bad_input.py.


def test_cli_prepare_prints_sizes_rates_and_texts(capsys, ml100k, cache):
    main(["prepare", "--data_dir", str(ML100K), "--cache_dir", str(cache)])
    out = capsys.readouterr().out
    assert "train     58284         0.7567" in out and "test       7286         0.7693" in out
    assert out.count("This is a user,") == 3
    meta = json.loads((ml100k / "meta.json").read_text())
    assert meta["splits"]["val"]["rows"] == 7285
