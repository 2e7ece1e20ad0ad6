"""Score new rows: a CSV or parquet file of raw rows in, a parquet file of click probabilities out.

    ctrl score --model runs/ml100k/export --rows new_rows.csv --out scores.parquet

The rows carry raw values, as in the data the model was trained on (ids, categories, numbers, lists joined
by the field's separator). The output keeps the input's order and holds the user and item id columns
(when the rows have them), `probability`, and `label` when the rows carry the training label's column
(labelled by the same rule; <NA> where the rule drops the row or the value is empty; a value the rule
cannot read is refused). Lightning and transformers are not needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from finetune.export import Scorer
from tabular2text.atomic import atomic_path
from tabular2text.schema import OOV, PAD, FeatureSpec, LabelRule, vocab_key
from tabular2text.sources import DataError, first_bad, plain


def read_rows(path: str | Path) -> pd.DataFrame:
    """A CSV (every value read as text, as the training reader does) or parquet file of raw rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"rows file {path} does not exist")
    if path.suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from e
    if path.suffix != ".csv":
        raise DataError(f"{path}: rows must be a .csv or .parquet file")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=True, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed CSV ({e})") from e


def score_rows(scorer: Scorer, rows: pd.DataFrame, where: str = "rows") -> pd.DataFrame:
    """The id columns of `rows`, the click probability and, when `rows` has the label column, the label; what
    differs from the training data without an error is printed as warnings (`mismatch_warnings`)."""
    spec = scorer.spec
    ids = [c for c in (spec.user_field, spec.item_field) if c and c in rows]
    out = rows[ids].reset_index(drop=True).copy()
    encoded = scorer.encode(rows, where)
    out["probability"] = scorer.predict(encoded)
    if spec.label and spec.label.column in rows:
        out["label"] = labels(spec.label, rows[spec.label.column].reset_index(drop=True), where).astype("Int8")
    for line in mismatch_warnings(spec, rows, encoded):
        print(line, file=sys.stderr)
    return out


def labels(rule: LabelRule, values: pd.Series, where: str) -> pd.Series:
    """The training rule's labels of `values`; an empty value has none, and a value the rule cannot read (not a
    number, or not 0 or 1 without thresholds) is refused by row, as preparation refuses it."""
    out = rule.labels(values)
    present = values.astype(object).map(vocab_key).notna()
    binary = rule.positive_above is None and rule.negative_below is None
    bad = present & (out.isna() if binary else pd.to_numeric(values.where(present), errors="coerce").isna())
    if bad.any():
        i = first_bad(bad)
        raise DataError(f"{where}: row {i + 1}, column {rule.column!r}: a label must be"
                        f" {'0 or 1' if binary else 'a number'} (as in training), found {plain(values.iloc[i])!r};"
                        " fix the value, or leave it empty for a row without a label")
    return out


def mismatch_warnings(spec: FeatureSpec, rows: pd.DataFrame, encoded: pd.DataFrame) -> list[str]:
    """What in the rows (`encoded`: as the model reads them) differs from the training data in a way that changes
    every score without an error: a feature column missing from every row, or a categorical column most of whose
    values were never seen in training, e.g. ids written differently (`00005` read as 5) or another data set."""
    missing = [f.name for f in spec.fields if f.name not in rows]
    out = [f"warning: the rows have no column {', '.join(missing)}: scored as missing in every row"] if missing else []
    for f in spec.fields:
        if f.kind != "categorical" or f.name not in rows:
            continue
        ids = encoded[f.name].to_numpy()
        given = ids != PAD
        unseen = (ids[given] == OOV).mean() if given.any() else 0.0
        if unseen > 0.5:
            out.append(f"warning: {unseen:.0%} of the values of {f.name!r} were never seen in training (scored as"
                       " unknown); are the ids written as in the training data, and is this the model for it?")
    return out


def score_file(scorer: Scorer, rows_path: str | Path, out_path: str | Path) -> pd.DataFrame:
    """Score the rows of a CSV or parquet file and write them to `out_path` (parquet), atomically."""
    rows = read_rows(rows_path)
    where = f"{rows_path} (row 1 is the first line after the header)" if Path(rows_path).suffix == ".csv" \
        else str(rows_path)
    scores = score_rows(scorer, rows, where)
    with atomic_path(Path(out_path)) as tmp:
        scores.to_parquet(tmp, index=False)
    return scores
