"""Raw values -> ids -> tensors. Shared by preparation, the data module and the exported scorer, so
training and serving encode a row the same way. Needs pandas and torch only (no Lightning)."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import torch

from tabular2text.schema import PAD, FeatureSpec, Field


def missing_mask(values: pd.Series) -> np.ndarray:
    """`is_missing` of every scalar value, vectorised: None, NaN, "" and "nan" (any case)."""
    mask = values.isna().to_numpy().copy()
    if values.dtype == object:
        text = values[~mask].astype(str)
        mask[~mask] = ((text == "") | (text.str.lower() == "nan")).to_numpy()
    return mask


def flatten_lists(values: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Every element of a column of lists, in order, and the row each came from."""
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    flat = pd.Series(list(itertools.chain.from_iterable(values)), dtype=object)
    return flat, np.repeat(np.arange(len(values)), lengths)


def vocabulary_ids(values: pd.Series, vocabulary: list[str]) -> np.ndarray:
    """Scalar raw values -> ids: 0 missing, 1 unseen, known values from 2 on."""
    ids = pd.Index(vocabulary, dtype=object).get_indexer(values.astype(object)) + 2  # -1 (unseen) -> OOV
    ids[missing_mask(values)] = PAD
    return ids


def encode_column(values: pd.Series, f: Field, spec: FeatureSpec) -> pd.Series | np.ndarray:
    """Raw values -> ids (categorical: 0 missing, 1 unseen) or padded id lists; numbers standardised."""
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
    from_end = np.bincount(row, minlength=len(values))[row] - (np.arange(len(row)) - np.searchsorted(row, row))
    ids, row = ids[from_end <= f.max_len], row[from_end <= f.max_len]
    bounds = np.searchsorted(row, np.arange(1, len(values)))
    return pd.Series([part.tolist() for part in np.split(ids, bounds)], index=values.index, dtype=object)


def pad_lists(values: pd.Series, max_len: int) -> torch.Tensor:
    """Lists of ids -> [N, max_len] LongTensor, 0-padded at the end."""
    out = np.zeros((len(values), max_len), dtype=np.int64)
    for i, v in enumerate(values):
        out[i, : len(v)] = v
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
