"""Readers: every supported layout becomes one `Table` (raw values + field list), so all routes share
the same preparation code.

Layouts: MovieLens-100K (u.data, u.user, u.item), MovieLens-1M (ratings.dat, users.dat, movies.dat),
RecBole atomic files (<name>.inter, .user, .item with `name:type` headers) and generic data (a parquet or
CSV file plus a YAML schema).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from tabular2text.schema import KINDS, Field, vocab_key


class DataError(ValueError):
    """Bad input data; the message names the file, line, field or value and what to do."""


@dataclass(frozen=True)
class LabelRule:
    """How a label is made. `column` already in {0, 1} when both thresholds are None; otherwise
    value > positive_above -> 1, value < negative_below -> 0, anything between is dropped."""

    column: str
    positive_above: float | None = None
    negative_below: float | None = None


@dataclass(frozen=True)
class HistoryRule:
    """Build a behavior sequence: per `user`, the `length` most recent `item`s with a strictly earlier
    timestamp (every interaction counts, also the ones later dropped for their label)."""

    user: str
    item: str
    length: int = 10


@dataclass
class Table:
    """Raw interactions, one row each, joined with user and item features.

    List-valued fields (multi_valued) hold Python lists of strings; categorical fields hold strings.
    """

    name: str
    frame: pd.DataFrame
    fields: tuple[Field, ...]
    label: LabelRule
    timestamp: str | None
    history: HistoryRule | None
    item_noun: str
    history_action: str
    sources: tuple[Path, ...]
    user_field: str | None = None
    item_field: str | None = None


# --- MovieLens ------------------------------------------------------------------------------------------
ML_GENDER = {"F": "female", "M": "male"}
ML1M_AGE = {"1": "under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49", "50": "50-55",
            "56": "56+"}
ML1M_OCCUPATION = dict(enumerate([
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer"]))
YEAR_IN_TITLE = re.compile(r"\s*\((\d{4})\)\s*$")
# MovieLens files titles as "English Patient, The"; a language model reads "The English Patient".
TRAILING_ARTICLE = re.compile(r"^(?P<title>.+), (?P<article>The|A|An)(?P<alt> \(.*\))?$")


def movielens_fields(history_length: int, age_text: dict[str, str] | None = None,
                     occupation_text: dict[str, str] | None = None) -> tuple[Field, ...]:
    return (
        Field("user_id", "categorical", "user"),
        Field("gender", "categorical", "user", text_name="gender", value_text=ML_GENDER),
        Field("age", "categorical", "user", text_name="age", value_text=age_text or {}),
        Field("occupation", "categorical", "user", text_name="occupation", value_text=occupation_text or {}),
        Field("zip_code", "categorical", "user", text_name="zip code"),
        Field("history", "sequence", "user", text_name="history", max_len=history_length,
              shares_embedding="item_id", text_field="title"),
        Field("item_id", "categorical", "item"),
        Field("title", "categorical", "item", text_name="title"),
        Field("genres", "multi_valued", "item", text_name="genre", max_len=6),
        Field("release_year", "categorical", "item", text_name="release year"),
    )


def movielens_table(name: str, ratings: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame,
                    history_length: int, sources: tuple[Path, ...], age_text: dict[str, str] | None = None,
                    occupation_text: dict[str, str] | None = None) -> Table:
    ratings = ratings.astype({"rating": "float64", "timestamp": "int64"})
    # Movie 267 has no title or date: "unknown" in u.item, "unkonwn" in RecBole's copy. Both are missing.
    for column in ("title", "release_year"):
        items[column] = items[column].where(~items[column].isin(["unknown", "unkonwn", ""]), None)
    frame = ratings.merge(users, on="user_id", how="left", validate="many_to_one")
    frame = frame.merge(items, on="item_id", how="left", validate="many_to_one")
    return Table(name=name, frame=frame, fields=movielens_fields(history_length, age_text, occupation_text),
                 label=LabelRule("rating", positive_above=3, negative_below=3), timestamp="timestamp",
                 history=HistoryRule("user_id", "item_id", history_length), item_noun="movie",
                 history_action="watched", sources=sources, user_field="user_id", item_field="item_id")


def split_title(title: str) -> tuple[str, str | None]:
    """'English Patient, The (1996)' -> ('The English Patient', '1996'); the year is its own field."""
    m = YEAR_IN_TITLE.search(title)
    title, year = (title[: m.start()], m.group(1)) if m else (title.strip(), None)
    a = TRAILING_ARTICLE.match(title)
    if a:
        title = f"{a['article']} {a['title']}{a['alt'] or ''}"
    return title, year


def read_lines(path: Path, sep: str, ncols: int) -> list[list[str]]:
    """Read a delimited text file strictly: every line must have `ncols` columns."""
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # MovieLens ships latin-1 movie titles in some releases
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(sep)
        if len(parts) != ncols:
            raise DataError(f"{path}:{lineno}: expected {ncols} {sep!r}-separated columns, found {len(parts)}"
                            f" in {line[:80]!r}; is this the right file and format?")
        rows.append(parts)
    return rows


def numeric_column(values: pd.Series, path: Path, column: str, first_line: int = 1) -> pd.Series:
    out = pd.to_numeric(values, errors="coerce")
    bad = out.isna() & values.notna()
    if bad.any():
        i = int(bad.to_numpy().argmax())
        raise DataError(f"{path}:{i + first_line}: {column} {values.iloc[i]!r} is not a number; fix or remove"
                        " the line")
    return out


def ratings_frame(rows: list[list[str]], path: Path, first_line: int = 1) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    frame["user_id"] = frame["user_id"].str.strip()
    frame["item_id"] = frame["item_id"].str.strip()
    frame["rating"] = numeric_column(frame["rating"], path, "rating", first_line)
    frame["timestamp"] = numeric_column(frame["timestamp"], path, "timestamp", first_line)
    return frame


def read_movielens_100k(directory: Path, history_length: int = 10) -> Table:
    d = Path(directory)
    ratings = ratings_frame(read_lines(d / "u.data", "\t", 4), d / "u.data")
    users = pd.DataFrame(read_lines(d / "u.user", "|", 5),
                         columns=["user_id", "age", "gender", "occupation", "zip_code"])
    genre_rows = read_lines(d / "u.genre", "|", 2)
    genre_names = {int(i): g for g, i in genre_rows}
    item_rows = read_lines(d / "u.item", "|", 5 + len(genre_names))
    items = []
    for r in item_rows:
        title, year = split_title(r[1])
        flags = r[5:]
        genres = [genre_names[i] for i, flag in enumerate(flags) if flag == "1"]
        items.append((r[0], title, genres, year))
    items = pd.DataFrame(items, columns=["item_id", "title", "genres", "release_year"])
    return movielens_table("ml-100k", ratings, users, items, history_length,
                           (d / "u.data", d / "u.user", d / "u.item", d / "u.genre"))


def read_movielens_1m(directory: Path, history_length: int = 10) -> Table:
    d = Path(directory)
    ratings = ratings_frame(read_lines(d / "ratings.dat", "::", 4), d / "ratings.dat")
    users = pd.DataFrame(read_lines(d / "users.dat", "::", 5),
                         columns=["user_id", "gender", "age", "occupation", "zip_code"])
    items = []
    for item_id, raw_title, genres in read_lines(d / "movies.dat", "::", 3):
        title, year = split_title(raw_title)
        items.append((item_id, title, genres.split("|") if genres else [], year))
    items = pd.DataFrame(items, columns=["item_id", "title", "genres", "release_year"])
    occupations = {str(k): v for k, v in ML1M_OCCUPATION.items()}
    return movielens_table("ml-1m", ratings, users, items, history_length,
                           (d / "ratings.dat", d / "users.dat", d / "movies.dat"),
                           age_text=ML1M_AGE, occupation_text=occupations)


# --- RecBole atomic files -------------------------------------------------------------------------------
def read_atomic(path: Path) -> pd.DataFrame:
    """A RecBole atomic file: tab-separated, header `name:type`; token_seq columns are space-separated."""
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    with path.open(encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
    columns, types = [], {}
    for h in header:
        name, _, kind = h.partition(":")
        if kind not in ("token", "token_seq", "float", "float_seq"):
            raise DataError(f"{path}:1: header {h!r} is not `name:type` with type token, token_seq, float or"
                            " float_seq; is this a RecBole atomic file?")
        columns.append(name)
        types[name] = kind
    rows = read_lines(path, "\t", len(columns))[1:]
    frame = pd.DataFrame(rows, columns=columns)
    for name, kind in types.items():
        if kind == "float":
            frame[name] = numeric_column(frame[name], path, name, first_line=2)
        elif kind.endswith("_seq"):
            frame[name] = frame[name].str.split()
    return frame


def read_recbole_movielens(directory: Path, history_length: int = 10) -> Table:
    """RecBole's ml-100k / ml-1m atomic files, mapped to the same fields as the raw MovieLens readers."""
    d = Path(directory)
    inters = sorted(d.glob("*.inter"))
    if not inters:
        raise DataError(f"no *.inter file in {d}; expected RecBole atomic files (<name>.inter/.user/.item)")
    stem = inters[0].with_suffix("")
    inter = read_atomic(stem.with_suffix(".inter"))
    ratings = inter[["user_id", "item_id", "rating", "timestamp"]]
    users = read_atomic(stem.with_suffix(".user"))[["user_id", "age", "gender", "occupation", "zip_code"]]
    item = read_atomic(stem.with_suffix(".item"))
    items = []
    for item_id, words, year, genres in item[["item_id", "movie_title", "release_year", "class"]].itertuples(
            index=False):
        # RecBole's converter took the last "(...)" of the title as the year ("... (1995) (V)" -> "V"):
        # rebuild the original title and split it the same way as the raw MovieLens readers do.
        raw_title = " ".join(words) if isinstance(words, list) else ""
        year = "" if year == "unkonwn" else year
        title, year = split_title(f"{raw_title} ({year})" if year else raw_title)
        items.append((item_id, title, genres if isinstance(genres, list) else [], year))
    items = pd.DataFrame(items, columns=["item_id", "title", "genres", "release_year"])
    return movielens_table(stem.name, ratings, users, items, history_length,
                           tuple(stem.with_suffix(s) for s in (".inter", ".user", ".item")))


# --- Generic: parquet or CSV + YAML schema --------------------------------------------------------------
def read_generic(schema_path: Path, history_length: int = 10) -> Table:
    """Read data described by a YAML schema: `configs/generic/schema.yaml` is a complete example (with its
    clicks.csv) of every key: data, label, timestamp, user, item, history, item_noun, history_action and
    fields (name, kind, side, text, values, separator, max_len)."""
    schema_path = Path(schema_path)
    if not schema_path.is_file():
        raise DataError(f"missing schema file: {schema_path}")
    try:
        schema = yaml.safe_load(schema_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{schema_path}: not valid YAML ({e})") from e
    if not isinstance(schema, dict) or "data" not in schema or "fields" not in schema or "label" not in schema:
        raise DataError(f"{schema_path}: a schema needs the keys `data`, `label` and `fields`")
    data_path = (schema_path.parent / schema["data"]).resolve()
    if not data_path.is_file():
        raise DataError(f"{schema_path}: data file {data_path} does not exist")
    if data_path.suffix == ".parquet":
        frame = pd.read_parquet(data_path)
    else:
        try:
            frame = pd.read_csv(data_path, dtype=str, keep_default_na=True)
        except pd.errors.ParserError as e:
            raise DataError(f"{data_path}: malformed CSV ({e})") from e

    label = schema["label"]
    label = LabelRule(label) if isinstance(label, str) else LabelRule(**label)
    user, item = schema.get("user"), schema.get("item")
    history, text_field = schema.get("history"), None
    if history is not None:
        if not (user and item):
            raise DataError(f"{schema_path}: `history` needs the top-level keys `user` and `item` (id columns)")
        text_field = history.get("text_field")
        history = HistoryRule(user, item, history_length)
    fields = []
    for i, spec in enumerate(schema["fields"]):
        where = f"{schema_path}: fields[{i}]"
        if not isinstance(spec, dict) or "name" not in spec:
            raise DataError(f"{where}: each field needs at least `name`, `kind` and `side`")
        if spec.get("kind") not in KINDS:
            raise DataError(f"{where} ({spec['name']}): unknown kind {spec.get('kind')!r}; use one of"
                            f" {', '.join(KINDS)}")
        if spec.get("kind") == "sequence":
            raise DataError(f"{where} ({spec['name']}): sequences are built from the interactions; declare them"
                            " with a top-level `history:` block instead")
        try:
            fields.append(Field(name=spec["name"], kind=spec["kind"], side=spec.get("side", "context"),
                                text_name=spec.get("text"), separator=str(spec.get("separator", "|")),
                                value_text={str(k): str(v) for k, v in (spec.get("values") or {}).items()},
                                max_len=int(spec.get("max_len", 1))))
        except ValueError as e:
            raise DataError(f"{where}: {e}") from e
    declared = {f.name: f for f in fields}
    for key, column in (("user", user), ("item", item)):
        if column and (column not in declared or declared[column].kind != "categorical"):
            raise DataError(f"{schema_path}: `{key}: {column}` names no categorical field; declare it under"
                            f" `fields`, e.g. - {{name: {column}, kind: categorical, side: {key}}}")
    if text_field and text_field not in declared:
        raise DataError(f"{schema_path}: `history: {{text_field: {text_field}}}` names no field; declare it under"
                        f" `fields` (the item-side column whose value names a history item in text)")
    if history is not None:
        fields.insert(sum(f.side != "item" for f in fields), Field(
            "history", "sequence", "user", text_name="history", max_len=history.length,
            shares_embedding=history.item, text_field=text_field))

    needed = [f.name for f in fields if f.kind != "sequence"] + [label.column] + [c for c in (user, item) if c]
    needed += [schema["timestamp"]] if schema.get("timestamp") else []
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"{schema_path}: column(s) {', '.join(map(repr, missing))} named in the schema are not in"
                        f" {data_path.name} (its columns: {', '.join(map(str, frame.columns))})")
    for f in fields:
        if f.kind == "multi_valued":
            frame[f.name] = frame[f.name].map(
                lambda v, sep=f.separator: [] if pd.isna(v) else [s for s in str(v).split(sep) if s])
        elif f.kind == "numeric":
            frame[f.name] = numeric_column(frame[f.name], data_path, f.name, first_line=2)
        elif f.kind == "categorical":
            # the scorer's rule too: a float id column (37.0, from one missing value) keys as a raw 37 does
            frame[f.name] = frame[f.name].astype(object).map(vocab_key)
    frame[label.column] = numeric_column(frame[label.column], data_path, label.column, first_line=2)
    ts = schema.get("timestamp")
    if ts:
        frame[ts] = numeric_column(frame[ts], data_path, ts, first_line=2)
    return Table(name=data_path.stem, frame=frame, fields=tuple(fields), label=label, timestamp=ts,
                 history=history, item_noun=schema.get("item_noun", "item"),
                 history_action=schema.get("history_action", "interacted with"), sources=(schema_path, data_path),
                 user_field=user, item_field=item)


def detect_format(path: Path) -> str:
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        return "generic"
    if not path.exists():
        raise DataError(f"data directory {path} does not exist; pass an existing directory, or use"
                        " `ctrl prepare --download true` to fetch MovieLens-100K")
    if (path / "u.data").exists():
        return "ml-100k"
    if (path / "ratings.dat").exists():
        return "ml-1m"
    if any(path.glob("*.inter")):
        return "recbole"
    raise DataError(f"{path}: cannot tell the data layout: expected u.data (MovieLens-100K), ratings.dat"
                    " (MovieLens-1M), *.inter (RecBole) or a schema .yaml file")


READERS = {"ml-100k": read_movielens_100k, "ml-1m": read_movielens_1m, "recbole": read_recbole_movielens,
           "generic": read_generic}


def read_table(path: Path, history_length: int = 10) -> Table:
    return READERS[detect_format(path)](Path(path), history_length)
