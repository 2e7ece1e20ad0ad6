"""Raw table -> labelled, time-split, encoded and rendered parquet files plus a feature-spec JSON.

    read_table (sources.py) -> sort by time -> behavior history -> labels -> split (8:1:1 by time, or each
        user's last two interactions)
        -> vocabularies on train -> encode ids -> render text -> {train,val,test}.parquet + feature_spec.json

The output directory is named by a fingerprint of the input files and every option, so an unchanged
input is reused without recomputation and any change prepares a new directory. It is written to a
temporary directory first and renamed, so an interrupted run never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tabular2text.atomic import atomic_path, file_sha256, first_mismatch
from tabular2text.encode import (
    arrow_lists,
    encode_column,
    flatten_lists,
    is_list_type,
    list_series,
    missing_mask,
    row_offsets,
)
from tabular2text.oserrors import origin
from tabular2text.schema import OOV, FeatureSpec
from tabular2text.sources import DataError, NegativeRule, Table, plain, read_table
from tabular2text.templates import MAX_VALUE_CHARS, TextRenderer, format_value, is_missing, preset

FORMAT_VERSION = 6  # bump when the prepared layout or its semantics change (6: checksums in meta.json)
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
# How rows are split: `time`, the paper's 8:1:1 in time order; `last_per_user`, DIN's protocol on Amazon reviews:
# each user's last interaction is test, the one before it validation (benchmarks/protocol/ says when to use it).
SplitRule = Literal["time", "last_per_user"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("CTRL_CACHE_DIR", Path.home() / ".cache" / "ctrl-rec"))


def fingerprint(table: Table, options: dict) -> str:
    h = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, "options": options}, sort_keys=True).encode())
    for path in table.sources:
        h.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def sort_by_time(frame: pd.DataFrame, timestamp: str | None) -> pd.DataFrame:
    frame = frame.assign(_line=np.arange(len(frame)))
    if timestamp:
        frame = frame.sort_values(timestamp, kind="stable")  # ties keep file order
    return frame.reset_index(drop=True)


def build_history(frame: pd.DataFrame, user: str, item: str, timestamp: str | None, length: int) -> pd.Series:
    """Per row: the user's `length` most recent items with a strictly earlier timestamp, newest last.
    `frame` is sorted by time; without timestamps, file order stands in for time."""
    times = frame[timestamp].to_numpy() if timestamp else np.arange(len(frame))
    users = pd.factorize(frame[user])[0]
    order = np.argsort(users, kind="stable")  # rows grouped by user, each user's rows in time order
    u, t = users[order], times[order]
    position = np.arange(len(order))
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_time = new_user | np.r_[True, t[1:] != t[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, position, 0))
    time_start = np.maximum.accumulate(np.where(new_time, position, 0))  # rows before it are strictly earlier
    first = np.maximum(user_start, time_start - length)
    first[u < 0] = time_start[u < 0]  # a row without a user has no history
    starts, ends = np.empty(len(frame), dtype=np.int64), np.empty(len(frame), dtype=np.int64)
    starts[order], ends[order] = first, time_start  # each row's window of `order`, in the rows' own order
    offsets = np.r_[0, np.cumsum(ends - starts)]
    window = np.repeat(starts - offsets[:-1], ends - starts) + np.arange(offsets[-1])
    items = pa.array(frame[item].to_numpy(object)[order], from_pandas=True)
    return list_series(offsets, items.take(window), frame.index)


def make_labels(frame: pd.DataFrame, table: Table) -> pd.Series:
    rule = table.label
    if rule is None:  # a log of positives only: its negatives are sampled (`with_negatives`)
        return pd.Series(1.0, index=frame.index)
    labels = rule.labels(frame[rule.column])
    if rule.positive_above is None and rule.negative_below is None:
        bad = labels.isna()
        if bad.any():
            i = int(bad.to_numpy().argmax())
            source = table.origin.get(rule.column, table.name)
            raise DataError(f"{source}: label column {rule.column!r} must hold 0 or 1, found"
                            f" {plain(frame[rule.column].iloc[i])!r} (data row {int(frame['_line'].iloc[i]) + 1});"
                            " give thresholds (positive_above / negative_below) for a rating column")
    return labels


# Redraws of a negative that hit one of the user's own items (or an earlier negative of the same row); a row
# still without one after them has (almost) no item to draw, e.g. the first day of the log.
SAMPLING_ROUNDS = 30


def sample_negatives(frame: pd.DataFrame, rule: NegativeRule, user: str, item: str, timestamp: str | None
                     ) -> np.ndarray:
    """Per row of `frame` (positives, sorted by time), `rule.per_positive` sampled items as row positions of
    `frame` holding that item (its first row), -1 where none could be drawn. A negative is an item interacted
    with strictly before the row's time that the user never interacts with in the whole log (so neither a
    past nor a later positive), distinct from the row's other negatives."""
    times = frame[timestamp].to_numpy() if timestamp else np.arange(len(frame))
    items, _ = pd.factorize(frame[item])  # codes in order of first appearance, as `frame` is in time order
    users, _ = pd.factorize(frame[user], use_na_sentinel=False)
    valid = items >= 0
    n_items = int(items.max(initial=-1)) + 1
    first_row = np.flatnonzero(valid)[np.unique(items[valid], return_index=True)[1]]  # code -> its first row
    own = np.unique(users[valid].astype(np.int64) * n_items + items[valid])
    earlier = np.searchsorted(times, times, side="left")  # rows strictly before each row's time
    low = np.maximum(earlier - rule.window, 0)
    existed = np.searchsorted(times[first_row], times, side="left")  # items first seen before each row's time
    span = earlier - low if rule.by == "popularity" else existed
    rng = np.random.default_rng(rule.seed)
    drawn = np.full((len(frame), rule.per_positive), -1, dtype=np.int64)
    for k in range(rule.per_positive):
        todo = np.flatnonzero(span > 0)
        for _ in range(SAMPLING_ROUNDS):
            if not len(todo):
                break
            pick = np.floor(rng.random(len(todo)) * span[todo]).astype(np.int64)
            codes = items[low[todo] + pick] if rule.by == "popularity" else pick
            bad = (codes < 0) | np.isin(users[todo].astype(np.int64) * n_items + codes, own)
            bad |= (drawn[todo, :k] == codes[:, None]).any(axis=1)
            drawn[todo[~bad], k] = codes[~bad]
            todo = todo[bad]
    return np.where(drawn >= 0, first_row[np.maximum(drawn, 0)], -1)


def with_negatives(part: pd.DataFrame, drawn: np.ndarray, frame: pd.DataFrame, item_columns: list[str]
                   ) -> pd.DataFrame:
    """`part`'s positives, each followed by its negatives: copies of the positive (user, context, time and
    history as of then) whose item-side columns are those of the drawn item's row of `frame`, labelled 0."""
    k = drawn.shape[1]
    rows = part.iloc[np.repeat(np.arange(len(part)), k + 1)].reset_index(drop=True)
    negative = np.tile(np.arange(k + 1) > 0, len(part))
    source = drawn.reshape(-1)
    for column in item_columns:
        values = rows[column].to_numpy(dtype=object if rows[column].dtype == object else None, copy=True)
        values[negative] = frame[column].to_numpy()[source]
        rows[column] = pd.Series(values, dtype=rows[column].dtype)
    rows.loc[negative, "label"] = 0.0
    return rows


def fit_vocabulary(columns: list[pd.Series]) -> list[str]:
    """Known values of some columns of values (e.g. item ids and the elements of histories of item ids),
    frequent first, ties by value: deterministic."""
    counts = []
    for values in columns:
        values = values[~missing_mask(values)].value_counts(sort=False)
        counts.append(values.set_axis(values.index.astype(object)))
    counts = pd.concat(counts).groupby(level=0, sort=False).sum()
    return sorted(counts.index, key=lambda k: (-counts[k], k))


def build_spec(table: Table, train: pd.DataFrame) -> FeatureSpec:
    vocabularies, stats, fields = {}, {}, []
    for f in table.fields:
        if f.kind == "numeric":
            col = train[f.name].astype("float64")
            std = float(col.std()) if col.notna().sum() > 1 else 1.0
            stats[f.name] = (float(col.mean()) if col.notna().any() else 0.0, std if std > 0 else 1.0)
            fields.append(f)
            continue
        if f.kind == "sequence":
            fields.append(f)
            continue
        sequences = [s for s in table.fields if s.kind == "sequence" and s.shares_embedding == f.name]
        values = train[f.name] if f.kind == "categorical" else flatten_lists(train[f.name])[0]
        # history items seen in training count as known items
        vocabularies[f.name] = fit_vocabulary([values, *(flatten_lists(train[s.name])[0] for s in sequences)])
        max_len = f.max_len
        if f.kind == "multi_valued":
            max_len = max(1, int(train[f.name].map(len).max()))
        fields.append(replace(f, vocab_size=len(vocabularies[f.name]) + 2, max_len=max_len))
    by_name = {f.name: f for f in fields}
    fields = [replace(f, vocab_size=by_name[f.shares_embedding].vocab_size) if f.shares_embedding else f
              for f in fields]
    return FeatureSpec(fields=tuple(fields), vocabularies=vocabularies, numeric_stats=stats,
                       item_noun=table.item_noun, history_action=table.history_action,
                       user_field=table.user_field, item_field=table.item_field, label=table.label)


def distinct_rows(frame: pd.DataFrame, columns: list[str], list_columns: set[str] = frozenset()
                  ) -> tuple[pd.DataFrame, np.ndarray]:
    """The distinct value combinations of `columns` (each at its first row) and each row's index among them;
    `list_columns` hold lists."""
    if not columns or frame.empty:
        return frame.iloc[:1], np.zeros(len(frame), dtype=np.int64)
    codes = {c: pd.factorize(frame[c].map(tuple) if c in list_columns else frame[c])[0] for c in columns}
    group = pd.DataFrame(codes).groupby(columns, sort=False).ngroup().to_numpy()
    first = pd.Series(group).drop_duplicates().index.to_numpy()
    return frame.iloc[first], group


def render_texts(frame: pd.DataFrame, table: Table, spec: FeatureSpec, template: str | dict[str, str]
                 ) -> pd.DataFrame:
    """Per row: `user_text` (the user sentence, with the behavior sequence), `item_text` (the item sentence)
    and `user_profile_text` (the user sentence without the behavior sequence), exactly as
    `TextRenderer.render` writes them. Each distinct user-side and item-side combination of values is
    rendered once, each history item's name formatted once; per row only the behavior phrase is joined."""
    renderer = TextRenderer(spec.fields, preset(template), spec.item_noun, spec.history_action)
    profiles = render_distinct(frame, [f for f in renderer.user_fields if f.kind != "sequence"],
                               renderer.profile_sentence)
    user_texts = profiles.copy()
    for f in renderer.user_fields:  # the behavior sequences close the user sentence
        if f.kind != "sequence":
            continue
        names = {}
        if f.text_field:  # history items are named by an item field (the title), else by their raw id
            named = table.frame.drop_duplicates(f.shares_embedding)
            names = dict(zip(named[f.shares_embedding], named[f.text_field], strict=True))
        flat, row = flatten_lists(frame[f.name])
        codes, distinct = pd.factorize(flat)  # each history item named once; a missing one (code -1) not at all
        titles = [names.get(item, item) for item in distinct]  # a missing title leaves the item out, not its id
        labels = np.array([None if is_missing(t) else format_value(t) for t in titles] + [None], dtype=object)[codes]
        shown = pd.notna(labels)
        lists = arrow_lists(row_offsets(row[shown], len(frame)), pa.array(labels[shown], type=pa.string()))
        joined = pc.binary_join(lists, renderer.templates.value_sep).to_numpy(zero_copy_only=False)
        some = joined != ""
        user_texts[some] = user_texts[some] + renderer.templates.feature_sep + behavior(renderer, joined[some])
    end = renderer.templates.side_sep.rstrip()  # close_user(s) is s + end unless side_sep is all whitespace
    close = (lambda texts: texts + end) if end else np.vectorize(renderer.close_user, otypes=[object])
    items = render_distinct(frame, renderer.item_fields, renderer.item_sentence)
    return pd.DataFrame({"user_text": close(user_texts), "item_text": items,
                         "user_profile_text": close(profiles)}, index=frame.index)


def behavior(renderer: TextRenderer, joined: np.ndarray) -> np.ndarray:
    """`renderer.behavior` of each joined item list: the template's text around `{items}`, added in one go."""
    text = renderer.behavior("\0")
    if text.count("\0") != 1 or "\0" in renderer.history_action:  # `{items}` not once: format each
        return np.array([renderer.behavior(j) for j in joined], dtype=object)
    head, _, tail = text.partition("\0")
    return head + joined + tail


def render_distinct(frame: pd.DataFrame, fields: list, sentence) -> np.ndarray:
    """`sentence(row)` per row of `frame`, computed once per distinct combination of the fields' values."""
    columns = [f.name for f in fields]
    distinct, of_row = distinct_rows(frame, columns, {f.name for f in fields if f.is_list})
    return np.array([sentence(r) for r in distinct[columns].to_dict("records")], dtype=object)[of_row]


def item_texts(frame: pd.DataFrame, spec: FeatureSpec, template: str | dict[str, str]) -> np.ndarray:
    """The item sentence of each row of `frame` (raw values), as `TextRenderer.render` ends the text."""
    renderer = TextRenderer(spec.fields, preset(template), spec.item_noun, spec.history_action)
    return render_distinct(frame, renderer.item_fields, renderer.item_sentence)


def item_catalog(table: Table, spec: FeatureSpec, template: str | dict[str, str]) -> pd.DataFrame:
    """One row per item id of the vocabulary: `id` and `item_text`; the texts entity-level alignment pools
    a behavior sequence from. Items are taken from the whole table (features do not depend on time)."""
    items = table.frame.drop_duplicates(spec.item_field)
    ids = encode_column(items[spec.item_field], spec[spec.item_field], spec)
    known = ids > OOV
    return pd.DataFrame({"id": ids[known], "item_text": item_texts(items[known], spec, template)})


def warn_long_values(table: Table) -> None:
    """Say which rendered fields hold values longer than a text takes (they are cut to MAX_VALUE_CHARS)."""
    for f in table.fields:
        if f.text_name is None or f.name not in table.frame or pd.api.types.is_numeric_dtype(table.frame[f.name]):
            continue
        values = table.frame[f.name]
        if isinstance(values.dtype, pd.StringDtype):
            too_long = values.str.len() > MAX_VALUE_CHARS
        else:  # object: strings, lists, missing values
            too_long = values.map(lambda v: isinstance(v, str) and len(v) > MAX_VALUE_CHARS)
        long = values[too_long.fillna(False).astype(bool)].nunique()
        if long:
            print(f"warning: {long} distinct value(s) of field {f.name!r} are longer than {MAX_VALUE_CHARS}"
                  f" characters; their text is cut to the first {MAX_VALUE_CHARS}", file=sys.stderr)


def split_frame(frame: pd.DataFrame, name: str, val_fold: int = 0) -> dict[str, pd.DataFrame]:
    """Time-ordered rows -> train / val / test, 8:1:1. With val_fold k > 0 the validation block moves k
    blocks back in time (a rolling-origin fold of the training period): train is everything before it, the
    rows between it and test become "gap" (used by no stage), and test stays the same last 10%."""
    n = len(frame)
    cut1, cut2 = int(n * SPLIT_FRACTIONS[0]), int(n * (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]))
    block = cut2 - cut1
    start = cut1 - val_fold * block
    if val_fold < 0 or (val_fold and start < max(1, block)):
        raise DataError(f"{name}: val_fold {val_fold} leaves fewer training rows than one validation block; use 0"
                        f" (the last block before test) up to {max(0, cut1 // max(1, block) - 1)}")
    end = start + cut2 - cut1
    parts = {"train": frame.iloc[:start], "val": frame.iloc[start:end], "test": frame.iloc[cut2:]}
    if val_fold:
        parts["gap"] = frame.iloc[end:cut2]
    for split, part in parts.items():
        if len(part) == 0:
            raise DataError(f"{name}: the {split} split is empty ({n} labelled rows after filtering); the data"
                            " needs at least 10 labelled rows")
    return parts


def split_last_per_user(frame: pd.DataFrame, user: str | None, name: str) -> dict[str, pd.DataFrame]:
    """Time-ordered rows -> train / val / test: each user's last row is test, the one before it val, the rest
    train. A user with fewer than three rows, and a row without a user, stays in train. Each split keeps time
    order and the positions of `frame` as its index."""
    if user is None:
        raise DataError(f"{name}: `split: last_per_user` needs a user-id field; use `split: time`")
    users = pd.Series(pd.factorize(frame[user])[0], index=frame.index)
    from_end = users.groupby(users).cumcount(ascending=False)  # 0: the user's last row
    enough = (users >= 0) & (users.map(users.value_counts()) >= 3)
    test, val = enough & (from_end == 0), enough & (from_end == 1)
    parts = {"train": frame[~(test | val)], "val": frame[val], "test": frame[test]}
    for split, part in parts.items():
        if len(part) == 0:
            raise DataError(f"{name}: the {split} split is empty under `split: last_per_user` (no user has three"
                            " labelled rows); use `split: time`")
    return parts


def split_rows(frame: pd.DataFrame, table: Table, split: SplitRule, val_fold: int) -> dict[str, pd.DataFrame]:
    """`frame` (time-ordered) -> its splits under the rule `split` (SplitRule)."""
    if split == "time":
        return split_frame(frame, table.name, val_fold)
    if val_fold:
        raise DataError(f"val_fold {val_fold} moves a block of time; it needs `split: time` (last_per_user has one"
                        " validation row per user)")
    return split_last_per_user(frame, table.user_field, table.name)


def labelled_splits(table: Table, val_fold: int = 0, split: SplitRule = "time") -> dict[str, pd.DataFrame]:
    """Raw rows with history and label, sorted by time and split by the rule `split` (the rows a scorer would
    see). A log of positives only is split by its positives, each followed by its sampled negatives in its split."""
    frame = sort_by_time(table.frame, table.timestamp)
    if table.history is not None:
        h = table.history
        frame["history"] = build_history(frame, h.user, h.item, table.timestamp, h.length)
    frame["label"] = make_labels(frame, table)
    if table.negatives is None:
        return split_rows(frame[frame["label"].notna()].reset_index(drop=True), table, split, val_fold)
    drawn = sample_negatives(frame, table.negatives, table.user_field, table.item_field, table.timestamp)
    kept = (drawn >= 0).all(axis=1)
    if not kept.all():
        print(f"note: {int((~kept).sum())} of {len(frame)} rows of {table.name} have no item the user never"
              " interacted with among the items seen before their time (the first ones in time); they are"
              " dropped (they still count in later histories)", file=sys.stderr)
    item_columns = [f.name for f in table.fields if f.side == "item" and f.name in frame]
    parts = split_rows(frame[kept].reset_index(drop=True), table, split, val_fold)
    drawn = drawn[kept]  # each split keeps the positions of the kept rows as its index
    return {split: with_negatives(part, drawn[part.index.to_numpy()], frame, item_columns)
            for split, part in parts.items()}


def read_split(path: Path) -> pd.DataFrame:
    """A prepared split as written: list columns (id lists) come back as Arrow lists, not an array per row."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:  # Arrow's message is the bare path
        raise DataError(f"prepared split {path} is gone: its cache folder was removed while this run used it; run"
                        " the command again to prepare it anew (and leave a cache in use alone)") from None
    return table.to_pandas(types_mapper=lambda t: pd.ArrowDtype(t) if is_list_type(t) else None)


def damaged_file(prepared: Path) -> str | None:
    """The first file of a prepared result that is missing or differs from its checksum in meta.json."""
    try:
        checksums = json.loads((prepared / "meta.json").read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return "meta.json"
    return first_mismatch(prepared, checksums)


def cache_origin(cache_dir: str | Path | None, option: str) -> Path:
    """The cache folder, registered with where it came from (`option`, CTRL_CACHE_DIR or the default) so that
    an error about a path in it names that."""
    if cache_dir:
        return origin(Path(cache_dir).expanduser(), option)
    variable = "CTRL_CACHE_DIR" if os.environ.get("CTRL_CACHE_DIR") else "the default cache folder (set CTRL_CACHE_DIR)"
    return origin(default_cache_dir().expanduser(), variable)


def prepare(data: str | Path, cache_dir: str | Path | None = None, history_length: int = 10,
            template: str | dict[str, str] = "natural", val_fold: int = 0, cache_option: str = "--cache_dir",
            split: SplitRule = "time") -> Path:
    """Prepare `data` (a directory or a schema YAML) once; return the directory holding the result.
    val_fold: which time block before test validates (0: the last one; see `split_frame`).
    split: the split rule, `time` (8:1:1) or `last_per_user` (see SplitRule).
    cache_option: the option `cache_dir` came from, named in errors about it."""
    try:
        preset(template)  # fail on a bad template before any work
    except ValueError as e:
        raise DataError(f"template: {e}") from None
    if split not in get_args(SplitRule):
        raise DataError(f"split: {split!r} is not a split rule; use one of {', '.join(get_args(SplitRule))}")
    table = read_table(Path(data).expanduser(), history_length)
    if table.note:
        print(table.note)
    options = {"history_length": history_length, "template": template, "split": SPLIT_FRACTIONS}
    if val_fold:  # absent for fold 0, so caches prepared before folds existed stay valid
        options["val_fold"] = val_fold
    if split != "time":  # likewise absent for the rule every earlier cache used
        options["split_by"] = split
    if table.negatives:  # the defaults of a folder without a schema live in code, not in any input file
        options["negatives"] = asdict(table.negatives)
    key = fingerprint(table, options)
    out = cache_origin(cache_dir, cache_option) / "prepared" / f"{table.name}-{key[:16]}"
    if (out / "meta.json").is_file():
        damaged = damaged_file(out)
        if damaged is None:
            return out
        warnings.warn(f"prepared data {out}: {damaged} does not match its checksum (truncated or modified);"
                      " preparing it again", stacklevel=2)

    warn_long_values(table)  # once, when the texts are rendered; a cached result was warned about then
    parts = labelled_splits(table, val_fold, split)
    spec = build_spec(table, parts["train"])

    # Never removed in place: a concurrent run (another DDP rank) may have just finished the same result, and
    # its readers use it. Under the writers' lock a complete one is kept, a damaged one replaced by a rename.
    with atomic_path(out, directory=True, replace=lambda found: damaged_file(found) is not None) as tmp:
        sizes = {}
        for split, part in parts.items():
            columns = {f.name: encode_column(part[f.name], f, spec) for f in spec.fields}
            columns["label"] = part["label"].to_numpy(np.int8)
            if table.timestamp:
                columns["timestamp"] = part[table.timestamp].to_numpy()
            columns.update(render_texts(part, table, spec, template).items())
            # written by Arrow: id lists stay Arrow lists, no Python list per row (read back by `read_split`)
            pq.write_table(pa.table({name: pa.array(values) for name, values in columns.items()}),
                           tmp / f"{split}.parquet")
            sizes[split] = {"rows": len(part), "positive_rate": float(part["label"].mean())}
        if spec.item_field:
            item_catalog(table, spec, template).to_parquet(tmp / "items.parquet", index=False)
        spec.save(tmp / "feature_spec.json")
        checksums = {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}
        meta = {"fingerprint": key, "dataset": table.name, "options": options, "sha256": checksums,
                "sources": [str(p) for p in table.sources], "splits": sizes, "timestamp": table.timestamp,
                "label": asdict(table.label) if table.label else None,
                "negatives": asdict(table.negatives) if table.negatives else None}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return out
