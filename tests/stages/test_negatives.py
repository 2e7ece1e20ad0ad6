"""Logs of positives only: sampled negatives (`negatives:` in a schema, or the default of a label-less RecBole
folder), checked by hand on small logs, and the whole path on a slice of Amazon Beauty."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import ML100K, small_config_dir

from ctrl.app.cli import main
from tabular2text.prepare import labelled_splits, prepare, sample_negatives
from tabular2text.sources import DataError, NegativeRule, read_table

AMAZON = ML100K.parent / "amazon-beauty"


def write_log(directory: Path, rows: list[tuple[str, str, int]], titles: dict[str, str] | None = None,
              schema: str | None = None) -> Path:
    """A RecBole folder of positives only (user, item, time) with an item table of titles and a brand;
    with `schema`, a schema YAML beside it whose `data:` is the folder (returned instead)."""
    directory.mkdir(parents=True)
    (directory / "log.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t{t}\n" for u, i, t in rows))
    items = sorted({i for _, i, _ in rows})
    titles = titles or {i: f"Thing {i}" for i in items}
    (directory / "log.item").write_text("item_id:token\ttitle:token\tbrand:token\n" + "".join(
        f"{i}\t{titles[i]}\tbrand of {i}\n" for i in items))
    if schema is None:
        return directory
    (directory.parent / "log.yaml").write_text(f"data: {directory.name}\n{schema}")
    return directory.parent / "log.yaml"


def random_log(seed: int = 0, users: int = 60, items: int = 40, per_user: int = 8) -> list[tuple[str, str, int]]:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        for i in rng.choice(items, size=per_user, replace=False):
            rows.append((f"U{u}", f"I{i}", int(rng.integers(0, 50))))  # days: many ties in time
    return rows


def test_a_hand_checked_log_gets_the_only_possible_negatives():
    """U1 i1 at 1, U2 i2 at 2, U1 i3 at 3. Row 1 has no earlier item (dropped); row 2's only earlier item is
    i1; row 3's earlier items are i1 (U1's own) and i2: the negative is i2, by either rule."""
    frame = pd.DataFrame({"user": ["U1", "U2", "U1"], "item": ["i1", "i2", "i3"], "t": [1, 2, 3]})
    for by in ("popularity", "uniform"):
        drawn = sample_negatives(frame, NegativeRule(by=by, seed=3), "user", "item", "t")
        assert frame.item.to_numpy()[drawn[1:, 0]].tolist() == ["i1", "i2"] and drawn[0, 0] == -1


def test_negatives_are_seeded_unseen_by_the_user_existing_then_and_not_in_histories(tmp_path):
    rows = random_log()
    data = write_log(tmp_path / "log", rows, schema="negatives: {per_positive: 3, seed: 7, by: uniform}\n")
    table = read_table(data)
    assert table.label is None and table.negatives == NegativeRule(per_positive=3, seed=7, by="uniform")
    parts = labelled_splits(table)
    frame = pd.concat(parts.values(), ignore_index=True)
    assert frame.equals(pd.concat(labelled_splits(read_table(data)).values(), ignore_index=True))  # seeded
    log = pd.DataFrame(rows, columns=["user", "item", "t"])
    owned = set(zip(log.user, log.item, strict=True))
    first_seen = log.groupby("item").t.min()
    positives, negatives = frame[frame.label == 1], frame[frame.label == 0]
    assert len(negatives) == 3 * len(positives) and frame.label.iloc[::4].eq(1).all()  # each positive, then 3
    assert not any((u, i) in owned for u, i in zip(negatives.user_id, negatives.item_id, strict=True))
    assert (first_seen[negatives.item_id].to_numpy() < negatives.timestamp.to_numpy()).all()
    group = np.arange(len(frame)) // 4
    assert frame.groupby(group).item_id.nunique().eq(4).all()  # a positive's negatives are distinct items
    histories = pd.Series([tuple(h) for h in frame.history], dtype=object)
    for values in (frame.user_id, frame.timestamp, histories):  # same user, time and history as its positive
        assert values.groupby(group).nunique().eq(1).all()
    # histories hold the user's own earlier positives only: never a sampled negative
    assert all((u, i) in owned for u, h in zip(frame.user_id, frame.history, strict=True) for i in h)
    # the item side is the sampled item's own: its title and brand, in the columns and in the text
    assert (negatives.title == "Thing " + negatives.item_id).all()
    assert (negatives.brand == "brand of " + negatives.item_id).all()
    other = labelled_splits(read_table(write_log(tmp_path / "other" / "log", rows, schema="negatives: {seed: 8}\n")))
    assert not pd.concat(other.values()).item_id.equals(frame.item_id)


def test_last_per_user_tests_each_user_s_last_review_and_validates_the_one_before(tmp_path, capsys):
    """U1 reviews at days 1..5, U2 at 2, 4, 6 (its last three), U3 only twice (stays in train): test holds
    U1's day-5 and U2's day-6 review, val U1's day 4 and U2's day 4; each positive keeps its negative, and
    histories still reach back over every split's earlier reviews."""
    rows = [("U1", f"i{t}", t) for t in range(1, 6)] + [("U2", "j2", 2), ("U2", "j4", 4), ("U2", "j6", 6)]
    rows += [("U3", "k1", 1), ("U3", "k3", 3)]
    data = write_log(tmp_path / "log", rows, schema="negatives: {by: uniform}\n")
    parts = labelled_splits(read_table(data), split="last_per_user")
    positives = {name: sorted(zip(part.user_id[part.label == 1], part.timestamp[part.label == 1], strict=True))
                 for name, part in parts.items()}
    assert positives["test"] == [("U1", 5), ("U2", 6)] and positives["val"] == [("U1", 4), ("U2", 4)]
    assert [u for u, _ in positives["train"]].count("U3") == 1  # its first review has no earlier item: dropped
    for part in parts.values():  # every positive followed by its negative, of the same user and time
        assert part.label.tolist() == [1.0, 0.0] * (len(part) // 2)
        assert part.user_id.iloc[::2].tolist() == part.user_id.iloc[1::2].tolist()
    test = parts["test"][parts["test"].label == 1].set_index("user_id")
    assert list(test.history["U1"]) == ["i1", "i2", "i3", "i4"] and list(test.history["U2"]) == ["j2", "j4"]
    with pytest.raises(DataError, match="val_fold 1 moves a block of time; it needs `split: time`"):
        labelled_splits(read_table(data), val_fold=1, split="last_per_user")
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--data_dir", str(data), "--cache_dir", str(cache), "--split", "last_of_user"])
    assert exit_info.value.code == 2 and "Literal['time', 'last_per_user']" in capsys.readouterr().err
    assert prepare(data, cache, split="last_per_user") != prepare(data, cache)  # its own prepared folder


def test_popularity_draws_by_recent_interactions_and_uniform_evenly():
    """Before day 100, item A has 91 interactions and B1..B9 one each (the last nine of all); 2,000 users then
    take a new item Z. Uniform over the ten items that existed: A about 1 in 10; by popularity over all
    earlier interactions: A about 91 in 100; over the last 9 interactions only: never A."""
    background = [(f"b{k}", "A", k) for k in range(91)] + [(f"c{k}", f"B{k}", 91 + k) for k in range(9)]
    frame = pd.DataFrame([*background, *((f"p{k}", "Z", 100) for k in range(2000))], columns=["user", "item", "t"])
    shares = {}
    for rule in (NegativeRule(by="uniform"), NegativeRule(by="popularity"), NegativeRule(by="popularity", window=9)):
        drawn = frame.item.to_numpy()[sample_negatives(frame, rule, "user", "item", "t")[100:, 0]]
        shares[rule.by, rule.window] = (drawn == "A").mean()
        assert set(drawn) <= {"A", *(f"B{k}" for k in range(9))}
    window = NegativeRule().window  # the default, longer than these 100 interactions
    assert abs(shares["uniform", window] - 0.1) < 0.03 and abs(shares["popularity", window] - 0.91) < 0.03
    assert shares["popularity", 9] == 0


def test_the_negatives_options_are_part_of_the_prepared_data_s_fingerprint(tmp_path):
    rows = random_log(seed=1)
    data = write_log(tmp_path / "log", rows)
    first = prepare(data, tmp_path / "cache")
    meta = json.loads((first / "meta.json").read_text())
    assert meta["options"]["negatives"] == {"per_positive": 1, "seed": 0, "by": "popularity", "window": 3_000}
    assert meta["label"] is None and prepare(data, tmp_path / "cache") == first
    for schema in ("negatives: {seed: 1}\n", "negatives: {by: uniform}\n"):
        (tmp_path / "log.yaml").write_text(f"data: log\n{schema}")
        assert prepare(tmp_path / "log.yaml", tmp_path / "cache") != first
    train = pd.read_parquet(first / "train.parquet")
    assert set(train.label) == {0, 1} and train.label.mean() == 0.5
    vocabulary = json.loads((first / "feature_spec.json").read_text())["vocabularies"]["item_id"]
    items = np.array(vocabulary, dtype=object)[train.item_id.to_numpy() - 2]  # ids of known items start at 2
    assert (train.item_text == [f"This is an item, title is Thing {i}, brand is brand of {i}." for i in items]).all()


def amazon_slice(target: Path, every: int = 60) -> Path:
    """Every `every`-th user of Amazon Beauty (about 370 users, 3,300 reviews) with their items' titles. Reviews
    of the few products titled in over 200 characters are left out: the tiny test BERT holds 128 tokens, and an
    item sentence longer than the language tower's max_length stops stage 1 (the shipped 128 tokens too)."""
    inter = pd.read_csv(AMAZON / "amazon_beauty.inter", sep="\t", dtype=str)
    items = pd.read_csv(AMAZON / "amazon_beauty.item", sep="\t", dtype=str, keep_default_na=False)
    long = items.loc[items["title:token"].str.len() > 200, "item_id:token"]
    users = np.sort(inter["user_id:token"].unique())[::every]
    inter = inter[inter["user_id:token"].isin(users) & ~inter["item_id:token"].isin(long)]
    target.mkdir()
    inter.to_csv(target / "amazon_beauty.inter", sep="\t", index=False)
    items[items["item_id:token"].isin(inter["item_id:token"])].to_csv(target / "amazon_beauty.item", sep="\t",
                                                                       index=False)
    return target


def test_a_slice_of_amazon_beauty_prepares_trains_exports_and_scores(tmp_path, bert_dir, monkeypatch, capsys):
    """A label-less RecBole folder with no schema: `ctrl prepare` says which negatives it samples in one line,
    then stage 1, stage 2, export and `ctrl score` run on it as on any labelled data set."""
    if not AMAZON.is_dir():
        pytest.skip(f"needs {AMAZON}")
    data = amazon_slice(tmp_path / "amazon-beauty")
    monkeypatch.setenv("CTRL_CACHE_DIR", str(tmp_path / "cache"))
    main(["prepare", "--data_dir", str(data)])
    out = capsys.readouterr().out
    note = [line for line in out.splitlines() if line.startswith("note:")]
    assert note == ["note: amazon_beauty.inter has no label or rating column: each row counts as a positive, with"
                    " 1 negative per positive sampled by popularity (seed 0); to change it, set `negatives:` in a"
                    " schema YAML whose `data:` is this directory"]
    assert "This is an item, title is" in out and out.count("0.5000") == 3  # every split: one negative per positive
    configs = small_config_dir(tmp_path / "configs", bert_dir, tmp_path / "text-vectors")
    for stage in ("align", "finetune"):  # Amazon Beauty's split, as configs/amazon-beauty/ gives it
        config = yaml.safe_load((configs / f"{stage}.yaml").read_text())
        config["data"]["split"] = "last_per_user"
        (configs / f"{stage}.yaml").write_text(yaml.safe_dump(config))
    main(["run", "--config_dir", str(configs), "--data_dir", str(data), "--out", str(tmp_path / "run")])
    test = labelled_splits(read_table(data), split="last_per_user")["test"]
    assert f"(exported model, {len(test)} raw test rows)" in capsys.readouterr().out  # the trainer's test rows
    rows = test.head(50).copy()
    rows["history"] = ["|".join(h) for h in rows.history]  # as a file of new rows holds it
    rows.drop(columns=["label"]).to_parquet(tmp_path / "rows.parquet")
    main(["score", "--model", str(tmp_path / "run" / "finetune" / "export"), "--rows", str(tmp_path / "rows.parquet"),
          "--out", str(tmp_path / "scores.parquet")])
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    assert scores.item_id.tolist() == rows.item_id.tolist() and scores.probability.between(0, 1).all()
    assert "label" not in scores  # no label column to label new rows by
