"""The declared shape of every schema YAML, checked in one place before any key is read.

A schema key that no reader understands used to be ignored (`exculde: [brand]` left the column in every
text); a shape names every allowed key, its type and nesting, so a misspelt or misplaced key stops with its
name, the file and, where one is close, the key that was meant. Rules that span keys (thresholds the wrong
way round, a field declared twice) are checked here too, so a reader can trust what it is handed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from tabular2text.schema import KINDS, SIDES


class SchemaError(ValueError):
    """A schema that does not fit its shape; the message names the file and the key."""


@dataclass(frozen=True)
class Scalar:
    """A string, an integer (at least `minimum`), a number, or true/false; `null` only when `optional`."""

    kind: type
    minimum: int | None = None
    optional: bool = False

    def describe(self) -> str:
        words = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[self.kind]
        if self.minimum is not None:
            words += f" >= {self.minimum}"
        return words


@dataclass(frozen=True)
class Choice:
    """One of some strings."""

    values: tuple[str, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(self.values)


@dataclass(frozen=True)
class Mapping:
    """A mapping with known keys; `required` must be there."""

    keys: dict[str, object]
    required: tuple[str, ...] = ()

    def describe(self) -> str:
        return "a mapping {" + ", ".join(self.keys) + "}"


@dataclass(frozen=True)
class Table:
    """A mapping from any scalar to a scalar (`values: {F: female}`)."""

    def describe(self) -> str:
        return "a mapping of values to words"


@dataclass(frozen=True)
class ListOf:
    item: object

    def describe(self) -> str:
        return "a list"


@dataclass(frozen=True)
class Either:
    """The first shape the value fits; a mapping is held to the mapping shape among them."""

    shapes: tuple[object, ...]
    words: str = field(default="")

    def describe(self) -> str:
        return self.words or " or ".join(s.describe() for s in self.shapes)


@dataclass(frozen=True)
class Literal:
    value: object

    def describe(self) -> str:
        return {False: "false", True: "true"}.get(self.value, repr(self.value))


STRING, OPTIONAL_STRING = Scalar(str), Scalar(str, optional=True)
LABEL = Either((STRING, Mapping({"column": STRING, "positive_above": Scalar(float), "negative_below": Scalar(float)},
                               required=("column",))),
               words="a column name or {column: NAME, positive_above: NUMBER, negative_below: NUMBER}")
HISTORY = Either((Mapping({"text_field": OPTIONAL_STRING}), Literal(False)), words="{text_field: FIELD} or false")
SAMPLING = ("popularity", "uniform")
NEGATIVES = Mapping({"per_positive": Scalar(int, 1), "seed": Scalar(int, 0), "by": Choice(SAMPLING),
                     "window": Scalar(int, 1)})
COMMON = {"data": STRING, "label": LABEL, "negatives": NEGATIVES, "timestamp": STRING, "user": STRING,
          "item": STRING, "history": HISTORY, "item_noun": STRING, "history_action": STRING}
# A table of interactions (CSV or parquet): every column is declared.
TABLE_SCHEMA = Mapping({**COMMON, "fields": ListOf(Mapping(
    {"name": STRING, "kind": Choice(KINDS), "side": Choice(SIDES), "text": OPTIONAL_STRING, "values": Table(),
     "separator": STRING, "max_len": Scalar(int, 1)}, required=("name", "kind")))}, required=("data", "fields"))
# A RecBole directory: the header types declare the columns; a schema only overrides.
RECBOLE_SCHEMA = Mapping({**COMMON, "exclude": ListOf(STRING), "fields": ListOf(Mapping(
    {"name": STRING, "kind": Choice(("categorical", "multi_valued", "numeric")), "text": OPTIONAL_STRING,
     "values": Table(), "separator": STRING}, required=("name",)))}, required=("data",))


def shown(value: object) -> str:
    """A YAML value as a user wrote it (true, null; 0 is not false)."""
    if value is None or isinstance(value, bool):
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value)


def fits(value: object, shape: object, where: str) -> None:
    """Raise SchemaError naming `where` (the key's path, "" for the whole schema) when `value` does not fit
    `shape`."""
    if isinstance(shape, Scalar):
        if value is None and shape.optional:
            return
        if shape.kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif shape.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, shape.kind)
        if ok and shape.minimum is not None and value < shape.minimum:
            ok = False
        if not ok:
            raise SchemaError(f"{where}: {shown(value)} is not {shape.describe()}")
    elif isinstance(shape, Choice):
        if value not in shape.values:
            *head, key = where.rsplit(".", 1) if "." in where else ("", where)
            at = f"{head[0]}: " if head and head[0] else ""
            raise SchemaError(f"{at}unknown {key} {shown(value)}; use one of {', '.join(shape.values)}")
    elif isinstance(shape, Literal):
        if value is not shape.value:
            raise SchemaError(f"{where}: {shown(value)} is not {shape.describe()}")
    elif isinstance(shape, Table):
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: {shown(value)} is not {shape.describe()}")
        for k, v in value.items():
            if isinstance(v, dict | list) or isinstance(k, dict | list):
                raise SchemaError(f"{where}.{k}: {shown(v)} is not a single value")
    elif isinstance(shape, ListOf):
        if not isinstance(value, list):
            raise SchemaError(f"{where}: {shown(value)} is not a list")
        for i, item in enumerate(value):
            name = item.get("name") if isinstance(item, dict) else None
            fits(item, shape.item, f"{where}[{i}]" + (f" ({name})" if isinstance(name, str) else ""))
    elif isinstance(shape, Mapping):
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: {shown(value)} is not {shape.describe()}")
        for key in value:
            if key not in shape.keys:
                close = difflib.get_close_matches(str(key), list(shape.keys), n=1)
                hint = f"did you mean `{close[0]}`? " if close else ""
                at = f" in {where}" if where else ""
                raise SchemaError(f"unknown key `{key}`{at}; {hint}known keys: {', '.join(shape.keys)}")
        for key in shape.required:
            if key not in value:
                raise SchemaError(f"{where or 'a schema'} needs the key `{key}` (required:"
                                  f" {', '.join(f'`{k}`' for k in shape.required)})")
        for key, item in value.items():
            fits(item, shape.keys[key], f"{where}.{key}" if where else str(key))
    elif isinstance(shape, Either):
        if isinstance(value, dict):  # a mapping's own error says more than "neither"
            mapping = next((s for s in shape.shapes if isinstance(s, Mapping)), None)
            if mapping is not None:
                return fits(value, mapping, where)
        for option in shape.shapes:
            try:
                return fits(value, option, where)
            except SchemaError:
                continue
        raise SchemaError(f"{where}: {shown(value)} is neither {shape.describe()}")
    else:  # pragma: no cover - a shape this module does not declare
        raise TypeError(f"unknown shape {shape!r}")


def check_schema(schema: dict, shape: Mapping, path: Path) -> None:
    """`schema` fits `shape` and its keys agree with each other; else SchemaError naming `path` and the key."""
    try:
        fits(schema, shape, "")
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from None
    label = schema.get("label")
    if isinstance(label, dict):
        above, below = label.get("positive_above"), label.get("negative_below")
        if (above is None) != (below is None):
            raise SchemaError(f"{path}: label: give both positive_above and negative_below (rows in between are"
                              " dropped), or neither for a column that holds 0 or 1")
        if above is not None and above < below:
            raise SchemaError(f"{path}: label: positive_above {shown(above)} is below negative_below {shown(below)},"
                              " so the values between them would be both positive and negative; swap them")
    if "label" in schema and "negatives" in schema:
        raise SchemaError(f"{path}: `label` and `negatives` exclude each other: negatives are sampled only for a log"
                          " of positives that has no label; drop one")
    label_column = label.get("column") if isinstance(label, dict) else label
    seen: dict[str, int] = {}
    for i, spec in enumerate(schema.get("fields") or []):
        if spec["name"] == label_column:
            raise SchemaError(f"{path}: fields[{i}] ({spec['name']}) is the label column; a model must not read its"
                              " label as an input: remove it from `fields`")
        if spec["name"] in seen:
            j = seen[spec["name"]]
            sides = {spec.get("side"), schema["fields"][j].get("side")} - {None}
            on = f" (on the {' and the '.join(sorted(sides))} side)" if len(sides) > 1 else ""
            raise SchemaError(f"{path}: fields[{j}] and fields[{i}] both declare {spec['name']!r}{on}; a column is"
                              " one field with one side: keep one of them")
        seen[spec["name"]] = i
    excluded = schema.get("exclude") or []
    twice = sorted({c for c in excluded if excluded.count(c) > 1})
    if twice:
        raise SchemaError(f"{path}: exclude lists {', '.join(map(repr, twice))} twice; list each column once")
