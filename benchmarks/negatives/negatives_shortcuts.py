"""How much of a sampled label an item's non-personal traits give away, per negative-sampling rule.

For a log of positives only (Amazon Beauty), the AUC on validation and test of two scores that know nothing
of the user: an item's review count in the train period (popularity) and the time since its first review
(age). Near 0.5 on both splits, a model must learn preference; far from it, or different on the two, it can
learn the shortcut, which then fails to carry from validation to test (README, "A log of positives only").

    python -m benchmarks negatives --data_dir ../shared/data/amazon-beauty
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional.classification import binary_auroc

from tabular2text.prepare import labelled_splits
from tabular2text.sources import read_generic


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(binary_auroc(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels)))


def main(data_dir: str = "../shared/data/amazon-beauty", rules: tuple[str, ...] = ("popularity", "uniform")) -> None:
    """Print, per sampling rule (`by`), the val and test AUC of item popularity and item age as scores."""
    data = Path(data_dir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        for by in rules:
            schema = Path(tmp) / f"{by}.yaml"
            schema.write_text(f"data: {data}\nnegatives: {{by: {by}}}\n")
            parts = labelled_splits(read_generic(schema))
            positives = pd.concat(parts.values()).query("label == 1")
            counts = parts["train"].query("label == 1").item_id.value_counts()
            first = positives.groupby("item_id").timestamp.min()
            shown = []
            for split in ("val", "test"):
                rows = parts[split]
                popularity = rows.item_id.map(counts).fillna(0).to_numpy()
                age = (rows.timestamp - rows.item_id.map(first)).to_numpy()
                labels = rows.label.to_numpy()
                shown.append(f"{split}: popularity AUC {auc(labels, popularity):.3f}, age AUC {auc(labels, age):.3f}")
            print(f"{by:<10} | " + " | ".join(shown))

