"""Raw values -> ids -> tensors. Shared by preparation, the data module and the exported scorer, so
training and serving encode a row the same way. Needs pandas and torch only (no Lightning)."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tabular2text.schema import PAD, FeatureSpec, Field


def missing_mask(values: pd.Series) -> np.ndarray:
    """`is_missing` of every scalar value, vectorised: None, NaN, "" and "nan" (any case)."""
    mask = values.isna().to_numpy().copy()
    if not pd.api.types.is_numeric_dtype(values.dtype):
        text = values[~mask].astype(str)
        mask[~mask] = ((text == "") | (text.str.lower() == "nan")).to_numpy()
    return mask


def is_list_type(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def is_arrow_list(values: pd.Series) -> bool:
    kind = getattr(values.dtype, "pyarrow_dtype", None)
    return kind is not None and is_list_type(kind)


def arrow_lists(offsets: np.ndarray, flat: pa.Array | np.ndarray) -> pa.Array:
    """A column of lists without a Python list per row: row k holds flat[offsets[k]:offsets[k + 1]]."""
    kind = pa.ListArray if len(flat) < 2**31 else pa.LargeListArray
    return kind.from_arrays(offsets, flat)


def list_series(offsets: np.ndarray, flat: pa.Array | np.ndarray, index: pd.Index) -> pd.Series:
    return pd.Series(pd.arrays.ArrowExtensionArray(arrow_lists(offsets, flat)), index=index)


def flatten_lists(values: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Every element of a column of lists (Python lists or an Arrow list column), in order, and the row
    each came from."""
    if is_arrow_list(values):
        lists = pa.array(values)
        lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
        rows = pc.list_parent_indices(lists).to_numpy()
        return pd.Series(pd.arrays.ArrowExtensionArray(lists.flatten())), rows
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    flat = pd.Series(list(itertools.chain.from_iterable(values)), dtype=object)
    return flat, np.repeat(np.arange(len(values)), lengths)


def row_offsets(rows: np.ndarray, n: int) -> np.ndarray:
    """Where each of n rows starts in a flat array whose elements' (sorted) rows are `rows`, and the end."""
    return np.searchsorted(rows, np.arange(n + 1))


def position_in_row(rows: np.ndarray) -> np.ndarray:
    """Each element's position within its row, for elements whose (sorted) rows are `rows`."""
    return np.arange(len(rows)) - np.searchsorted(rows, rows)


def vocabulary_ids(values: pd.Series, vocabulary: list[str]) -> np.ndarray:
    """Scalar raw values -> ids: 0 missing, 1 unseen, known values from 2 on. Each distinct value is
    looked up once."""
    codes, uniques = pd.factorize(values)  # missing values: code -1
    uniques = pd.Series(uniques)
    ids = pd.Index(vocabulary, dtype=object).get_indexer(uniques.astype(object)) + 2  # -1 (unseen) -> OOV
    ids[missing_mask(uniques)] = PAD
    return np.append(ids, PAD)[codes]


def encode_column(values: pd.Series, f: Field, spec: FeatureSpec) -> pd.Series | np.ndarray:
    """Raw values -> ids (categorical: 0 missing, 1 unseen) or id lists (an Arrow list column); numbers
    standardised."""
    if f.kind == "numeric":
        mean, std = spec.numeric_stats[f.name]
        return ((values.astype("float64") - mean) / std).fillna(0.0).to_numpy(np.float32)
    vocabulary = spec.vocabulary_of(f.name)
    if f.kind == "categorical":
        return vocabulary_ids(values, vocabulary).astype(np.int32)
    # Lists drop their missing entries and keep their newest (last) max_len ones.
    flat, row = flatten_lists(values)
    ids = vocabulary_ids(flat, vocabulary)
    keep = ids != PAD
    ids, row = ids[keep], row[keep]
    from_end = np.bincount(row, minlength=len(values))[row] - position_in_row(row)
    ids, row = ids[from_end <= f.max_len], row[from_end <= f.max_len]
    return list_series(row_offsets(row, len(values)), ids.astype(np.int64), values.index)


def pad_lists(values: pd.Series, max_len: int) -> torch.Tensor:
    """Lists of ids -> [N, max_len] LongTensor, 0-padded at the end."""
    flat, row = flatten_lists(values)
    out = np.zeros((len(values), max_len), dtype=np.int64)
    out[row, position_in_row(row)] = flat.to_numpy(np.int64)
    return torch.from_numpy(out)


def frame_to_tensors(frame: pd.DataFrame, spec: FeatureSpec) -> dict[str, torch.Tensor]:
    """Encoded columns -> the batch dict of the whole split (label only when the frame has one)."""
    tensors: dict[str, torch.Tensor] = {}
    for f in spec.fields:
        if f.is_list:
            tensors[f.name] = pad_lists(frame[f.name], f.max_len)
            tensors[f.name + "_mask"] = tensors[f.name] != 0
        elif f.kind == "numeric":
            tensors[f.name] = torch.tensor(frame[f.name].to_numpy(np.float32))
        else:
            tensors[f.name] = torch.tensor(frame[f.name].to_numpy(np.int64))
    if "label" in frame:
        tensors["label"] = torch.tensor(frame["label"].to_numpy(np.float32))
    tensors["row"] = torch.arange(len(frame))
    return tensors
