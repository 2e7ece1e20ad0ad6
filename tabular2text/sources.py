"""Readers: every supported layout becomes one `Table` (raw values + field list), so all routes share
the same preparation code.

Layouts: MovieLens-100K (u.data, u.user, u.item), MovieLens-1M (ratings.dat, users.dat, movies.dat),
RecBole atomic files (<name>.inter, .user, .item with `name:type` headers) and generic data (a parquet or
CSV file plus a YAML schema).
"""

from __future__ import annotations

import csv
import re
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from tabular2text.schema import SIDES, Field, LabelRule, vocab_key
from tabular2text.shapes import RECBOLE_SCHEMA, TABLE_SCHEMA, SchemaError, check_schema


class DataError(ValueError):
    """Bad input data; the message names the file, line, field or value and what to do."""


def plain(value: object) -> object:
    """A value as Python writes it: a number read by pandas is a numpy scalar, which prints as np.int64(2)."""
    return value.item() if isinstance(value, np.generic) else value


@dataclass(frozen=True)
class HistoryRule:
    """Build a behavior sequence: per `user`, the `length` most recent `item`s with a strictly earlier
    timestamp (every interaction counts, also the ones later dropped for their label)."""

    user: str
    item: str
    length: int = 10


@dataclass(frozen=True)
class NegativeRule:
    """Labels for a log of positives only (every row a choice the user made): each row is a positive, and
    `per_positive` negatives are sampled for it once, with `seed`, among the items interacted with strictly
    before the row's time that the user never interacts with in the whole log. `by`: `popularity` draws one
    of the `window` most recent earlier interactions and takes its item (items in proportion to their recent
    interactions); `uniform` draws evenly among the items that existed then (`window` unused). The window's
    default, 3,000, is what benchmarks/negatives/RULE.md chose (decision.md there): a longer one lags behind
    what sells, so an item on the rise is a positive more often than a negative in train and the opposite later."""

    per_positive: int = 1
    seed: int = 0
    by: str = "popularity"
    window: int = 3_000


@dataclass
class Table:
    """Raw interactions, one row each, joined with user and item features.

    List-valued fields (multi_valued) hold Python lists of strings; categorical fields hold strings.
    """

    name: str
    frame: pd.DataFrame
    fields: tuple[Field, ...]
    label: LabelRule | None
    timestamp: str | None
    history: HistoryRule | None
    item_noun: str
    history_action: str
    sources: tuple[Path, ...]
    user_field: str | None = None
    item_field: str | None = None
    negatives: NegativeRule | None = None  # set exactly when `label` is None
    origin: dict[str, Path] = field(default_factory=dict)  # column -> the file its values come from
    note: str | None = None  # one line a user should read, e.g. which defaults stand in for a missing label


# --- MovieLens ------------------------------------------------------------------------------------------
ML_GENDER = {"F": "female", "M": "male"}
ML1M_AGE = {"1": "under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49", "50": "50-55",
            "56": "56+"}
ML1M_OCCUPATION = dict(enumerate([
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer"]))
MAX_LINE_CHARS = 1 << 20  # one line of a delimited file
MOVIELENS_RATINGS = (0.5, 5.0)  # the scale of every MovieLens release (half stars since 10M)
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
    origin = {**dict.fromkeys(items, sources[2]), **dict.fromkeys(users, sources[1]),
              **dict.fromkeys(ratings, sources[0])}
    return Table(name=name, frame=frame, fields=movielens_fields(history_length, age_text, occupation_text),
                 label=LabelRule("rating", positive_above=3, negative_below=3), timestamp="timestamp",
                 history=HistoryRule("user_id", "item_id", history_length), item_noun="movie",
                 history_action="watched", sources=sources, user_field="user_id", item_field="item_id",
                 origin=origin)


def split_title(title: str) -> tuple[str, str | None]:
    """'English Patient, The (1996)' -> ('The English Patient', '1996'); the year is its own field."""
    m = YEAR_IN_TITLE.search(title)
    title, year = (title[: m.start()], m.group(1)) if m else (title.strip(), None)
    a = TRAILING_ARTICLE.match(title)
    if a:
        title = f"{a['article']} {a['title']}{a['alt'] or ''}"
    return title, year


def decode(raw: bytes, path: Path) -> str:
    """UTF-8 (a byte-order mark is not part of the first column); a line that is not UTF-8 is read as latin-1,
    as MovieLens ships some titles, and the file's other lines keep their UTF-8: one latin-1 line must not
    turn every title into mojibake. A file mixing both is named in a warning."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    lines, fallback, utf8 = [], [], 0
    for lineno, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            lines.append(line.decode("utf-8"))
            utf8 += not line.isascii()
        except UnicodeDecodeError:
            lines.append(line.decode("latin-1"))
            fallback.append(lineno)
    if utf8:  # a latin-1 file (every non-ASCII line latin-1) is a known layout; a mix is worth a warning
        print(f"warning: {path}: {len(fallback)} line(s) are not UTF-8 (first: line {fallback[0]}) but {utf8} are;"
              " the former were read as latin-1. Save the file as UTF-8 if their text looks wrong",
              file=sys.stderr)
    return "\n".join(lines)


def read_lines(path: Path, sep: str, columns: list[str]) -> pd.DataFrame:
    """Read a delimited text file strictly: every line must have one value per column. The frame's index is
    each row's 0-based line position (line number - 1), so errors found later still name the line. Lines are
    checked and split by Arrow, all at once."""
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    lines = decode(path.read_bytes(), path).splitlines()
    positions = np.flatnonzero([bool(line.strip()) for line in lines])
    lines = pa.array([lines[i] for i in positions], type=pa.large_string())
    too_long = pc.utf8_length(lines).to_numpy() > MAX_LINE_CHARS
    wrong = pc.count_substring(lines, sep).to_numpy() != len(columns) - 1
    if too_long.any() or wrong.any():
        i = int((too_long | wrong).argmax())
        line, position = lines[i].as_py(), positions[i]
        if too_long[i]:
            raise DataError(f"{path}:{position + 1}: the line is {len(line):,} characters long, more than the"
                            f" {MAX_LINE_CHARS:,} a line may hold; is this the right file? Shorten or remove it")
        raise DataError(f"{path}:{position + 1}: expected {len(columns)} {sep!r}-separated columns, found"
                        f" {len(line.split(sep))} in {line[:80]!r}; is this the right file and format?")
    values = pc.split_pattern(lines, sep).flatten()
    step = np.arange(0, len(values), len(columns))
    return pd.DataFrame({c: pd.Series(values.take(step + j), dtype="str", index=positions)
                         for j, c in enumerate(columns)}, index=positions)


def unique_ids(frame: pd.DataFrame, key: str, path: Path, first_line: int = 1) -> None:
    """Refuse a user or item table that lists an id twice (which line's features would count?)."""
    duplicated = frame[key].duplicated()
    if duplicated.any():
        i = int(duplicated.to_numpy().argmax())
        raise DataError(f"{path}:{frame.index[i] + first_line}: {key} {plain(frame[key].iloc[i])!r} appears twice;"
                        " each id needs one line")


def drop_unknown(ratings: pd.DataFrame, table: pd.DataFrame, key: str, ratings_path: Path, path: Path
                 ) -> pd.DataFrame:
    """MovieLens ratings whose user or movie has no line in its table are dropped, with a count: they have no
    features to render (the tables of a released MovieLens set list every id)."""
    unknown = ~ratings[key].isin(table[key])
    if unknown.any():
        i = int(unknown.to_numpy().argmax())
        print(f"warning: {int(unknown.sum())} rating(s) in {ratings_path} have a {key} with no line in {path}"
              f" (first: line {ratings.index[i] + 1}, {key} {plain(ratings[key].iloc[i])!r}); they are dropped",
              file=sys.stderr)
    return ratings[~unknown]


# Every number read (labels, timestamps, numeric features; in preparation and in serving) must be finite and
# at most 2^53 in size, the largest range in which float64 holds every integer: beyond it a timestamp loses
# its order (1e30 became INT64_MIN) and a feature's variance overflows (1e308 made its std inf).
NUMBER_LIMIT = float(2**53)


def out_of_range(numbers: pd.Series) -> pd.Series:
    """True where a parsed number is infinite or larger in size than NUMBER_LIMIT (NaN is missing, not bad)."""
    return numbers.abs() > NUMBER_LIMIT


def numeric_column(values: pd.Series, path: Path, column: str, first_line: int = 1,
                   allowed: tuple[float, float] | None = None) -> pd.Series:
    """`values` as numbers, or a DataError naming the file, line and value that is not a number, is not
    finite, is out of range, or lies outside `allowed` (inclusive). A row's line is its index + first_line."""
    out = pd.to_numeric(values, errors="coerce")
    bad = out.isna() & values.notna()
    if bad.any():
        i = int(bad.to_numpy().argmax())
        raise DataError(f"{path}:{values.index[i] + first_line}: {column} {plain(values.iloc[i])!r} is not a number;"
                        " fix or remove the line")
    low, high = allowed or (-NUMBER_LIMIT, NUMBER_LIMIT)
    bad = out.notna() & ((out < low) | (out > high))
    if bad.any():
        i = int(bad.to_numpy().argmax())
        limits = f"{low:g} to {high:g}" if allowed else "finite, at most 2^53 in size"
        raise DataError(f"{path}:{values.index[i] + first_line}: {column} {plain(values.iloc[i])!r} is out of range"
                        f" ({limits}); fix or remove the line")
    return out


RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


def ratings_frame(path: Path, sep: str) -> pd.DataFrame:
    frame = read_lines(path, sep, RATING_COLUMNS)
    frame["user_id"] = frame["user_id"].str.strip()
    frame["item_id"] = frame["item_id"].str.strip()
    frame["rating"] = numeric_column(frame["rating"], path, "rating", allowed=MOVIELENS_RATINGS)
    frame["timestamp"] = numeric_column(frame["timestamp"], path, "timestamp")
    return frame


def movielens_tables(ratings_path: Path, ratings: pd.DataFrame, users_path: Path, users: pd.DataFrame,
                     items_path: Path, items: pd.DataFrame) -> pd.DataFrame:
    """Check the user and movie tables (one line per id) and keep the ratings whose ids they list."""
    unique_ids(users, "user_id", users_path)
    unique_ids(items, "item_id", items_path)
    ratings = drop_unknown(ratings, users, "user_id", ratings_path, users_path)
    return drop_unknown(ratings, items, "item_id", ratings_path, items_path)


def movielens_items(rows: pd.DataFrame, genres: pd.Series) -> pd.DataFrame:
    """item_id, title (the year split off, a trailing article moved to the front), genres, release_year."""
    titles, years = zip(*map(split_title, rows["raw_title"]), strict=True) if len(rows) else ((), ())
    return pd.DataFrame({"item_id": rows["item_id"], "title": list(titles), "genres": genres,
                         "release_year": list(years)}, index=rows.index)


def read_movielens_100k(directory: Path, history_length: int = 10) -> Table:
    d = Path(directory)
    ratings = ratings_frame(d / "u.data", "\t")
    users = read_lines(d / "u.user", "|", ["user_id", "age", "gender", "occupation", "zip_code"])
    genre_rows = read_lines(d / "u.genre", "|", ["genre", "flag"])
    genre_names = list(genre_rows["genre"])
    items = read_lines(d / "u.item", "|", ["item_id", "raw_title", "release_date", "video_release_date", "url",
                                            *genre_names])
    flags = items[genre_names]
    bad = ~flags.isin(["0", "1"]).to_numpy()
    if bad.any():  # any other value used to drop the genre from the text without a word
        row, column = np.argwhere(bad)[0]
        raise DataError(f"{d / 'u.item'}:{items.index[row] + 1}: genre flag {genre_names[column]!r} is"
                        f" {flags.iat[row, column]!r}; a genre flag is 0 or 1, fix the line")
    genres = (flags == "1").apply(lambda f: [g for g in genre_names if f[g]], axis=1)
    items = movielens_items(items, genres)
    ratings = movielens_tables(d / "u.data", ratings, d / "u.user", users, d / "u.item", items)
    return movielens_table("ml-100k", ratings, users, items, history_length,
                           (d / "u.data", d / "u.user", d / "u.item", d / "u.genre"))


def read_movielens_1m(directory: Path, history_length: int = 10) -> Table:
    d = Path(directory)
    ratings = ratings_frame(d / "ratings.dat", "::")
    users = read_lines(d / "users.dat", "::", ["user_id", "gender", "age", "occupation", "zip_code"])
    items = read_lines(d / "movies.dat", "::", ["item_id", "raw_title", "genres"])
    items = movielens_items(items, items["genres"].map(lambda g: g.split("|") if g else []))
    ratings = movielens_tables(d / "ratings.dat", ratings, d / "users.dat", users, d / "movies.dat", items)
    occupations = {str(k): v for k, v in ML1M_OCCUPATION.items()}
    return movielens_table("ml-1m", ratings, users, items, history_length,
                           (d / "ratings.dat", d / "users.dat", d / "movies.dat"),
                           age_text=ML1M_AGE, occupation_text=occupations)


# --- RecBole atomic files -------------------------------------------------------------------------------
RECBOLE_KINDS = {"token": "categorical", "token_seq": "multi_valued", "float": "numeric"}


def atomic_header(path: Path) -> list[str]:
    """The first line of a RecBole atomic file, split at tabs; decoded as `read_lines` decodes every line."""
    with path.open("rb") as fh:
        return decode(fh.readline(), path).rstrip("\r\n").split("\t")


def read_atomic(path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """A RecBole atomic file -> (frame, column -> RecBole type). Tab-separated with a `name:type` header;
    token_seq and float_seq values are space-separated; an empty value is missing."""
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    columns, types = [], {}
    for h in atomic_header(path):
        name, _, kind = h.partition(":")
        if kind not in ("token", "token_seq", "float", "float_seq"):
            raise DataError(f"{path}:1: header {h!r} is not `name:type` with type token, token_seq, float or"
                            " float_seq; is this a RecBole atomic file?")
        if name in types:
            raise DataError(f"{path}:1: column {name!r} appears twice in the header")
        columns.append(name)
        types[name] = kind
    frame = read_lines(path, "\t", columns).iloc[1:]
    for name, kind in types.items():
        values = frame[name].where(frame[name].str.strip() != "", None)
        if kind == "float":
            frame[name] = numeric_column(values, path, name)
        elif kind.endswith("_seq"):
            frame[name] = values.map(lambda v: v.split() if isinstance(v, str) else [])
        else:
            frame[name] = values
    return frame, types


def atomic_files(directory: Path) -> tuple[Path, Path | None, Path | None]:
    """The .inter file of a RecBole data set directory and its optional .user and .item files."""
    inters = sorted(directory.glob("*.inter"))
    if len(inters) != 1:
        found = ", ".join(p.name for p in inters) or "none"
        raise DataError(f"{directory}: expected one RecBole <name>.inter file, found {found}")
    stem = inters[0].with_suffix("")
    extra = [stem.with_suffix(s) for s in (".user", ".item")]
    return inters[0], *(p if p.is_file() else None for p in extra)


def is_movielens_atomic(directory: Path) -> bool:
    """RecBole's own ml-100k / ml-1m conversion (its .item has movie_title and class)."""
    _, user, item = atomic_files(directory)
    if user is None or item is None:
        return False
    return {"movie_title", "class"} <= {h.partition(":")[0] for h in atomic_header(item)}


def read_recbole_movielens(directory: Path, history_length: int = 10) -> Table:
    """RecBole's ml-100k / ml-1m atomic files, mapped to the same fields as the raw MovieLens readers."""
    inter_path, user_path, item_path = atomic_files(Path(directory))
    ratings = read_atomic(inter_path)[0][["user_id", "item_id", "rating", "timestamp"]]
    users = read_atomic(user_path)[0][["user_id", "age", "gender", "occupation", "zip_code"]]
    item = read_atomic(item_path)[0]
    items = []
    for item_id, words, year, genres in item[["item_id", "movie_title", "release_year", "class"]].itertuples(
            index=False):
        # RecBole's converter took the last "(...)" of the title as the year ("... (1995) (V)" -> "V"):
        # rebuild the original title and split it the same way as the raw MovieLens readers do.
        raw_title = " ".join(words)
        year = "" if year in (None, "unkonwn") else year
        title, year = split_title(f"{raw_title} ({year})" if year else raw_title)
        items.append((item_id, title, genres, year))
    items = pd.DataFrame(items, columns=["item_id", "title", "genres", "release_year"])
    return movielens_table(inter_path.stem, ratings, users, items, history_length,
                           (inter_path, user_path, item_path))


TITLE_COLUMNS = ("title", "movie_title", "name", "item_name", "product_name")


def label_rule(value: str | dict) -> LabelRule:
    """A schema's `label:` (its shape checked by `check_schema`): a column name, or {column, positive_above,
    negative_below}."""
    return LabelRule(value) if isinstance(value, str) else LabelRule(**value)


def with_history(fields: list[Field], user: str, item: str, length: int, text_field: str | None
                 ) -> tuple[list[Field], HistoryRule]:
    """`fields` with the behavior sequence closing the user side (before the item fields), and its rule."""
    history = Field("history", "sequence", "user", text_name="history", max_len=length, shares_embedding=item,
                    text_field=text_field)
    at = sum(f.side != "item" for f in fields)
    return [*fields[:at], history, *fields[at:]], HistoryRule(user, item, length)


def default_negatives(inter_path: Path) -> tuple[NegativeRule, str]:
    rule = NegativeRule()
    return rule, (f"note: {inter_path.name} has no label or rating column: each row counts as a positive, with"
                  f" {rule.per_positive} negative per positive sampled by {rule.by} (seed {rule.seed}); to change"
                  " it, set `negatives:` in a schema YAML whose `data:` is this directory")


def read_recbole(directory: Path, history_length: int = 10, schema: dict | None = None,
                 schema_path: Path | None = None) -> Table:
    """Any RecBole atomic data set: <name>.inter plus optional <name>.user and <name>.item.

    Column types map to kinds: token -> categorical, token_seq -> multi_valued, float -> numeric (float_seq
    is refused: drop the column with `exclude`). Columns of .user are user-side, of .item item-side, other
    columns of .inter context. A field's words in text are its column name with spaces for underscores.

    Without a schema: `user_id` and `item_id` are the ids, `timestamp` orders time when present, and the
    label is `label` ({0, 1}) when present, else `rating` with the paper's rule (above 3 positive, below 3
    negative, 3 dropped), else every row is a positive with sampled negatives (`NegativeRule()`, said in
    `Table.note`). A schema YAML whose `data:` names the directory changes any of it; its keys are those of
    `shapes.RECBOLE_SCHEMA`, checked before this is called.
    """
    d = Path(directory)
    schema = schema or {}
    where = schema_path or d
    inter_path, user_path, item_path = atomic_files(d)
    exclude = list(schema.get("exclude") or [])
    user, item = schema.get("user", "user_id"), schema.get("item", "item_id")
    overrides = {spec["name"]: spec for spec in schema.get("fields") or []}
    inter, inter_types = read_atomic(inter_path)
    files = [(inter_path, inter, inter_types, "context", None)]
    columns = set(inter.columns)
    for path, key, side in ((user_path, user, "user"), (item_path, item, "item")):
        if path is None:
            continue
        extra, extra_types = read_atomic(path)
        if key not in extra.columns:
            raise DataError(f"{path}:1: no {side}-id column {key!r} to join on (columns: {', '.join(extra.columns)});"
                            f" name it with `{side}:` in a schema YAML whose `data:` is this directory")
        if key not in inter.columns:
            raise DataError(f"{inter_path}:1: no {key!r} column to join {path.name} on")
        unique_ids(extra, key, path)
        columns.update(extra.columns)
        files.append((path, extra.drop(columns=[c for c in exclude if c in extra.columns and c != key]),
                      extra_types, side, key))
    origin, types, sides = {}, {}, {}
    for path, frame, file_types, side, key in files:
        for column in frame.columns:
            if column == key:
                continue
            if column in origin:
                raise DataError(f"{path}:1: column {column!r} is also in {origin[column].name}; rename it in one of"
                                f" them, or drop one with `exclude: [{column}]` in a schema YAML whose `data:` is"
                                " this directory")
            origin[column], types[column], sides[column] = path, file_types[column], side
    for key, side in ((user, "user"), (item, "item")):
        if key not in inter.columns:
            raise DataError(f"{inter_path}:1: no {side}-id column {key!r} (columns: {', '.join(inter.columns)});"
                            f" name it with `{side}:` in a schema YAML whose `data:` is this directory")
        sides[key] = side
    unknown = [c for c in [*exclude, *overrides] if c not in columns]
    if unknown:
        raise DataError(f"{where}: {unknown[0]!r} (in `exclude` or `fields`) is not a column of {d.name} (columns:"
                        f" {', '.join(origin)})")
    both = sorted(set(exclude) & set(overrides))
    if both:
        raise DataError(f"{where}: {both[0]!r} is both excluded and described under `fields`; keep one")

    label, negatives, note = None, None, None
    if "negatives" in schema:
        negatives = NegativeRule(**schema["negatives"])
    elif "label" in schema:
        label = label_rule(schema["label"])
    elif "label" in origin:
        label = LabelRule("label")
    elif "rating" in origin:
        label = LabelRule("rating", positive_above=3, negative_below=3)
    else:
        negatives, note = default_negatives(inter_path)
    timestamp = schema.get("timestamp", "timestamp" if "timestamp" in origin else None)
    numeric = [c for c in (label and label.column, timestamp) if c]
    for column in numeric:
        if column not in origin:
            raise DataError(f"{where}: column {column!r} is not a column of {d.name} (columns: {', '.join(origin)})")
    numeric += [c for c, spec in overrides.items() if spec.get("kind") == "numeric"]
    for path, frame, file_types, _, _ in files:  # in each file, so an error names its file and line
        for column in numeric:
            if column in frame.columns and file_types[column] != "float":
                frame[column] = numeric_column(frame[column], path, column)

    frame = inter
    for _, extra, _, _, key in files[1:]:
        frame = frame.merge(extra, on=key, how="left")
    fields = []
    for column in frame.columns:
        if column in exclude or column in (label and label.column, timestamp):
            continue
        spec = overrides.get(column, {})
        if types.get(column) == "float_seq" and "kind" not in spec:
            raise DataError(f"{where}: column {column!r} is float_seq, which ctrl-rec cannot embed; drop it with"
                            f" `exclude: [{column}]` in a schema YAML whose `data:` is this directory")
        kind = spec.get("kind", RECBOLE_KINDS.get(types.get(column, "token")))
        if kind == "categorical" and types.get(column, "").endswith("_seq"):  # e.g. a title stored as words
            frame[column] = frame[column].map(lambda v: " ".join(v) if v else None)
        is_id = column in (user, item)
        text = spec.get("text", None if is_id else column.replace("_", " "))
        try:
            fields.append(Field(column, kind, sides[column], text_name=text, separator=str(spec.get("separator", " ")),
                                value_text={str(k): str(v) for k, v in (spec.get("values") or {}).items()}))
        except ValueError as e:
            raise DataError(f"{where}: {e}") from e
    fields.sort(key=lambda f: SIDES.index(f.side))  # user, then context, then item fields
    history = schema.get("history", {})
    if history is not False:
        item_fields = {f.name for f in fields if f.side == "item" and f.kind == "categorical" and f.text_name}
        text_field = (history or {}).get("text_field") or next((c for c in TITLE_COLUMNS if c in item_fields), None)
        if text_field not in item_fields | {None}:
            raise DataError(f"{where}: `history: {{text_field: {text_field}}}` names no item-side categorical field")
        fields, history = with_history(fields, user, item, history_length, text_field)
    else:
        history = None
    sources = tuple(p for p in (schema_path, inter_path, user_path, item_path) if p is not None)
    origin.update({user: inter_path, item: inter_path})
    return Table(name=inter_path.stem, frame=frame, fields=tuple(fields), label=label, timestamp=timestamp,
                 history=history, item_noun=schema.get("item_noun", "item"),
                 history_action=schema.get("history_action", "interacted with"), sources=sources,
                 user_field=user, item_field=item, negatives=negatives, origin=origin, note=note)


def read_recbole_dir(directory: Path, history_length: int = 10) -> Table:
    """A RecBole directory: MovieLens conversions get the raw MovieLens readers' fields, any other data set
    the generic atomic mapping (`read_recbole`)."""
    if is_movielens_atomic(Path(directory)):
        return read_recbole_movielens(directory, history_length)
    return read_recbole(directory, history_length)


# --- Generic: parquet or CSV + YAML schema --------------------------------------------------------------
def refuse_short_rows(path: Path, frame: pd.DataFrame) -> None:
    """pandas fills a CSV line with fewer values than the header with missing ones; refuse it, as `read_lines`
    does. Such a line leaves the last column missing, so only a file with a missing last value is read again,
    by Python's csv module (which splits lines as pandas does), to find the line."""
    if not frame.iloc[:, -1].isna().any():
        return
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        rows = (row for row in reader if len(row) > 1 or (row and row[0].strip()))  # pandas skips blank lines
        try:
            expected = len(next(rows))  # the header
            for row in rows:
                if len(row) < expected:
                    raise DataError(f"{path}:{reader.line_num}: expected {expected} ','-separated columns, found"
                                    f" {len(row)} in {','.join(row)[:80]!r}; give every column a value (an empty"
                                    " one between commas is missing) or remove the line")
        except csv.Error:  # a field over the csv module's size limit, which pandas read: leave the file as read
            return


def list_keys(value: object, separator: str) -> list[str]:
    """A multi-valued cell's vocabulary keys, one rule for preparation and serving: a string split at
    `separator`, a list (parquet's list type) as it is, a single value as one; each keyed as categorical values
    are (`vocab_key`), missing values and empty entries dropped."""
    if isinstance(value, str):
        values = value.split(separator)
    elif isinstance(value, list | tuple | np.ndarray):
        values = list(value)
    else:
        values = [value]
    return [k for v in values if (k := vocab_key(v))]


def first_bad(bad: pd.Series) -> int:
    """The position of the first True of a boolean column: the row an error names."""
    return int(bad.to_numpy().argmax())


def refuse_lists(values: pd.Series, path: Path) -> None:
    """A single-valued column of a parquet file holds no list (parquet's list type), as in `ctrl score`."""
    listed = values.map(lambda v: isinstance(v, list | tuple | np.ndarray))
    if listed.any():
        i = first_bad(listed)
        raise DataError(f"{path}: row {i + 1}, column {values.name!r}: a list ({list(values.iloc[i])!r:.80}) where a"
                        " categorical field takes one value; declare the field `kind: multi_valued` or store one value"
                        " per row")


def read_generic(schema_path: Path, history_length: int = 10) -> Table:
    """Read data described by a YAML schema: `configs/generic/schema.yaml` is a complete example (with its
    clicks.csv) of every key: data, label (or negatives), timestamp, user, item, history, item_noun,
    history_action and fields (name, kind, side, text, values, separator, max_len). Every schema is checked
    against its declared shape (`shapes.TABLE_SCHEMA`, or `shapes.RECBOLE_SCHEMA` when `data:` is a RecBole
    directory) first: an unknown key, a wrong type or a field declared twice stops here."""
    schema_path = Path(schema_path)
    if not schema_path.is_file():
        raise DataError(f"missing schema file: {schema_path}")
    try:
        schema = yaml.safe_load(schema_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{schema_path}: not valid YAML ({e})") from e
    if not isinstance(schema, dict) or "data" not in schema:
        raise DataError(f"{schema_path}: a schema needs the key `data` (a parquet or CSV file, or a RecBole directory)")
    if not isinstance(schema["data"], str):
        raise DataError(f"{schema_path}: data: {schema['data']!r} is not a string (a file or directory path)")
    data_path = (schema_path.parent / schema["data"]).resolve()
    try:
        check_schema(schema, RECBOLE_SCHEMA if data_path.is_dir() else TABLE_SCHEMA, schema_path)
    except SchemaError as e:
        raise DataError(str(e)) from None
    if data_path.is_dir():
        return read_recbole(data_path, history_length, schema, schema_path)
    if not data_path.is_file():
        raise DataError(f"{schema_path}: data file {data_path} does not exist")
    if "label" not in schema and "negatives" not in schema:
        raise DataError(f"{schema_path}: a schema of a table needs `label` (a 0/1 column, or a rating with"
                        " thresholds) or, for a log of positives only, `negatives` (e.g. {per_positive: 1})")
    if data_path.suffix == ".parquet":
        try:
            frame = pd.read_parquet(data_path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError do not name the file
            raise DataError(f"{data_path}: not a readable parquet file ({e}); write it again or give a CSV") from e
    else:
        try:
            frame = pd.read_csv(data_path, dtype=str, keep_default_na=True, encoding="utf-8-sig")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise DataError(f"{data_path}: malformed CSV ({e}); save it as UTF-8 with a header line") from e
        refuse_short_rows(data_path, frame)

    label = label_rule(schema["label"]) if "label" in schema else None
    negatives = NegativeRule(**schema["negatives"]) if "negatives" in schema else None
    user, item = schema.get("user"), schema.get("item")
    history, text_field = schema.get("history") or None, None
    if negatives and not (user and item):
        raise DataError(f"{schema_path}: `negatives` needs the top-level keys `user` and `item` (id columns): a"
                        " negative is an item that user did not interact with")
    if history is not None:
        if not (user and item):
            raise DataError(f"{schema_path}: `history` needs the top-level keys `user` and `item` (id columns)")
        text_field = history.get("text_field")
    fields = []
    for i, spec in enumerate(schema["fields"]):
        where = f"{schema_path}: fields[{i}] ({spec['name']})"
        if spec["kind"] == "sequence":
            raise DataError(f"{where}: sequences are built from the interactions; declare them with a top-level"
                            " `history:` block instead")
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
        fields, history = with_history(fields, user, item, history_length, text_field)

    needed = [f.name for f in fields if f.kind != "sequence"] + [c for c in (user, item) if c]
    needed += ([label.column] if label else []) + ([schema["timestamp"]] if schema.get("timestamp") else [])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"{schema_path}: column(s) {', '.join(map(repr, missing))} named in the schema are not in"
                        f" {data_path.name} (its columns: {', '.join(map(str, frame.columns))})")
    for f in fields:
        if f.kind == "multi_valued":
            frame[f.name] = frame[f.name].map(partial(list_keys, separator=f.separator))
        elif f.kind == "numeric":
            frame[f.name] = numeric_column(frame[f.name], data_path, f.name, first_line=2)
        elif f.kind == "categorical":
            if data_path.suffix == ".parquet":  # a list's key would be its repr, "['coat']"
                refuse_lists(frame[f.name], data_path)
            # the scorer's rule too: a float id column (37.0, from one missing value) keys as a raw 37 does
            frame[f.name] = frame[f.name].astype(object).map(vocab_key)
    if label:
        frame[label.column] = numeric_column(frame[label.column], data_path, label.column, first_line=2)
    ts = schema.get("timestamp")
    if ts:
        frame[ts] = numeric_column(frame[ts], data_path, ts, first_line=2)
    return Table(name=data_path.stem, frame=frame, fields=tuple(fields), label=label, timestamp=ts,
                 history=history, item_noun=schema.get("item_noun", "item"),
                 history_action=schema.get("history_action", "interacted with"), sources=(schema_path, data_path),
                 user_field=user, item_field=item, negatives=negatives, origin=dict.fromkeys(frame.columns, data_path))


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


READERS = {"ml-100k": read_movielens_100k, "ml-1m": read_movielens_1m, "recbole": read_recbole_dir,
           "generic": read_generic}


def read_table(path: Path, history_length: int = 10) -> Table:
    table = READERS[detect_format(path)](Path(path), history_length)
    for f in table.fields:  # an interaction whose user or item has no line in its table: no values, not NaN
        if f.kind == "multi_valued":
            table.frame[f.name] = table.frame[f.name].map(lambda v: v if isinstance(v, list) else [])
    return table
