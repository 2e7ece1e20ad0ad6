"""Raw values -> ids -> tensors. Shared by preparation, the data module and the exported scorer, so
training and serving encode a row the same way. Needs pandas and torch only (no Lightning)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from tabular2text.schema import OOV, PAD, FeatureSpec, Field
from tabular2text.templates import is_missing


def encode_column(values: pd.Series, f: Field, spec: FeatureSpec) -> pd.Series | np.ndarray:
    """Raw values -> ids (categorical: 0 missing, 1 unseen) or padded id lists; numbers standardised."""
    if f.kind == "numeric":
        mean, std = spec.numeric_stats[f.name]
        return ((values.astype("float64") - mean) / std).fillna(0.0).to_numpy(np.float32)
    index = {v: i + 2 for i, v in enumerate(spec.vocabulary_of(f.name))}
    if f.kind == "categorical":
        return np.array([PAD if is_missing(v) else index.get(v, OOV) for v in values], dtype=np.int32)
    # Lists keep their newest (last) max_len entries.
    return pd.Series([[index.get(x, OOV) for x in v if not is_missing(x)][-f.max_len:] for v in values],
                     index=values.index)


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
