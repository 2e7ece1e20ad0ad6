"""The feature spec: what every column is, shared by the data pipeline, the templates and the towers.

A `FeatureSpec` is saved as JSON beside the prepared parquet files (as FuxiCTR does), so the data, the
collaborative tower and an exported model always agree on vocabularies.

Id convention for every vocabulary: 0 is padding, 1 is out-of-vocabulary, known values start at 2.

Batch convention (what the data module serves and the towers consume):
    batch[name]          categorical: LongTensor [B]; multi_valued and sequence: LongTensor [B, L]
                         (0-padded); numeric: FloatTensor [B] (standardised with train mean / std)
    batch[name + "_mask"] BoolTensor [B, L] for multi_valued and sequence fields (True = real value)
    batch["label"]       FloatTensor [B] in {0, 1}
    batch["row"]         LongTensor [B], the row's index inside its split (text / cached-embedding lookup)
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from tabular2text.atomic import atomic_write_text

FieldKind = Literal["categorical", "multi_valued", "sequence", "numeric"]
Side = Literal["user", "item", "context"]
KINDS: tuple[str, ...] = ("categorical", "multi_valued", "sequence", "numeric")
SIDES: tuple[str, ...] = ("user", "item", "context")
PAD, OOV = 0, 1


@dataclass(frozen=True)
class Field:
    """One input column.

    Args:
        name: column name in the data and key in the batch.
        kind: categorical (ids included), multi_valued (e.g. genres), sequence (behavior history of item
            ids, newest last) or numeric.
        side: user, item or context; decides which sentence the field is rendered in.
        text_name: the words templates use for the field ("gender", "title"); None keeps it out of text.
        vocab_size: number of ids including padding and OOV (0 for numeric fields).
        max_len: padded length for multi_valued and sequence fields, 1 otherwise.
        shares_embedding: for a sequence, the categorical field whose vocabulary and embedding table it
            uses (the item id field); the target item of DIN-style attention.
        separator: how a multi_valued or sequence value is split in raw text data ("|").
        text_field: for a sequence, the item-side field whose value names a history item in text
            ("title"); None renders the raw item id.
        value_text: raw value -> words for rendering ("F" -> "female").
    """

    name: str
    kind: FieldKind
    side: Side
    text_name: str | None = None
    vocab_size: int = 0
    max_len: int = 1
    shares_embedding: str | None = None
    separator: str = "|"
    text_field: str | None = None
    value_text: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"field {self.name!r}: unknown kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.side not in SIDES:
            raise ValueError(f"field {self.name!r}: unknown side {self.side!r}; use one of {', '.join(SIDES)}")

    @property
    def is_list(self) -> bool:
        return self.kind in ("multi_valued", "sequence")


@dataclass(frozen=True)
class LabelRule:
    """How a label is made. `column` already in {0, 1} when both thresholds are None; otherwise
    value > positive_above -> 1, value < negative_below -> 0, anything between is dropped."""

    column: str
    positive_above: float | None = None
    negative_below: float | None = None

    def labels(self, values: pd.Series) -> pd.Series:
        """1.0 / 0.0 per raw value, NaN where the rule drops the row or the value is missing or not a label."""
        values = pd.to_numeric(values, errors="coerce").astype("float64")
        if self.positive_above is None and self.negative_below is None:
            return values.where(values.isin([0.0, 1.0]))
        labels = pd.Series(np.nan, index=values.index)
        labels[values > self.positive_above] = 1.0
        labels[values < self.negative_below] = 0.0
        return labels


@dataclass(frozen=True)
class FeatureSpec:
    """All fields plus what rendering and encoding need.

    Args:
        fields: every input field, in a fixed order (the towers keep this order).
        vocabularies: field name -> known raw values (as strings); the value at position i has id i + 2.
            Sequence fields use the vocabulary of their `shares_embedding` field.
        numeric_stats: numeric field name -> (mean, std) on the train split.
        item_noun: "movie", "product", ... for the item intro template.
        history_action: "watched", "bought", ... for the behavior-sequence template.
        user_field: the user-id field, if any (cold-start slice: users never seen in training).
        item_field: the item-id field, if any (cold-start slice: items never seen in training).
        label: how the label is made from the raw data (scoring new rows labels them the same way).
    """

    fields: tuple[Field, ...]
    vocabularies: dict[str, list[str]] = field(default_factory=dict)
    numeric_stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    item_noun: str = "item"
    history_action: str = "interacted with"
    user_field: str | None = None
    item_field: str | None = None
    label: LabelRule | None = None

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no field named {name!r}; fields are {', '.join(f.name for f in self.fields)}")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def vocabulary_of(self, name: str) -> list[str]:
        f = self[name]
        return self.vocabularies[f.shares_embedding or f.name]

    def with_fields(self, fields: tuple[Field, ...]) -> FeatureSpec:
        return replace(self, fields=fields)

    # --- JSON -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "fields": [asdict(f) for f in self.fields],
            "vocabularies": self.vocabularies,
            "numeric_stats": {k: list(v) for k, v in self.numeric_stats.items()},
            "item_noun": self.item_noun,
            "history_action": self.history_action,
            "user_field": self.user_field,
            "item_field": self.item_field,
            "label": asdict(self.label) if self.label else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(
            fields=tuple(Field(**f) for f in d["fields"]),
            vocabularies={k: list(v) for k, v in d.get("vocabularies", {}).items()},
            numeric_stats={k: (float(v[0]), float(v[1])) for k, v in d.get("numeric_stats", {}).items()},
            item_noun=d.get("item_noun", "item"),
            history_action=d.get("history_action", "interacted with"),
            user_field=d.get("user_field"),
            item_field=d.get("item_field"),
            label=LabelRule(**d["label"]) if d.get("label") else None,
        )

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> FeatureSpec:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise FileNotFoundError(f"feature spec not found: {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a valid feature spec ({e}); prepare the data again") from e


def vocab_key(value: object) -> str | None:
    """The vocabulary key of one raw categorical value, one rule for preparation and serving alike: None when
    missing (None, NaN, pandas NA, "" or "nan"); booleans "True" / "False"; integers and integer-valued
    floats as decimal integers (37, 37.0, numpy.int64(37), a nullable Int64 37 -> "37", as an integer id
    column that became float through one missing value); other floats in shortest round-trip form ("2.5");
    strings as they are."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value)
    return None if text == "" or text.lower() == "nan" else text
