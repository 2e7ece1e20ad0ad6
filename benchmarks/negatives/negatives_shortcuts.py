"""How much of a sampled label the item alone gives away, per negative-sampling rule (benchmarks/negatives/RULE.md).

For a log of positives only, the AUC on validation and test of scores that know nothing of the user:
- item bias: the train rows' per-item label log-odds, log((positives + 1) / (negatives + 1)), what an item-id
  embedding can memorise;
- unseen: 1 for an item never seen in train (27% of Amazon Beauty's test reviews are of such products);
- popularity: the item's positive count in train; age: the time since the item's first positive.
Near 0.5 on both splits, a model must learn preference; far from it, or different on the two, it can learn the
shortcut, which then fails to carry from validation to test (README, "A log of positives only"). Data sets:
Amazon Beauty as it is, and MovieLens-100K read as a log of positives (every rating a positive).

    python -m benchmarks negatives --amazon_dir ../shared/data/amazon-beauty --ml100k_dir ../shared/data/ml-100k
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from torchmetrics.functional.classification import binary_auroc

from benchmarks.common import command
from tabular2text.prepare import labelled_splits
from tabular2text.sources import read_generic

OUT = Path(__file__).parent / "shortcuts.md"
SCORES = ("item bias", "unseen", "popularity", "age")


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC of raw scores (counts, seconds): passed as their ranks in [0, 1], since torchmetrics takes values
    outside [0, 1] for logits and squashes them with a sigmoid, which ties every large count or age at 1."""
    ranks = torch.as_tensor(rankdata(scores) / len(scores), dtype=torch.float64)
    return float(binary_auroc(ranks, torch.as_tensor(labels).long()))


def shortcut_aucs(parts: dict[str, pd.DataFrame]) -> dict[str, dict[str, float]]:
    """split -> score name -> AUC of that item-only score on the split's rows."""
    train = parts["train"]
    positives, negatives = (train.query(f"label == {y}").item_id.value_counts() for y in (1, 0))
    items = positives.index.union(negatives.index)
    bias = np.log((positives.reindex(items).fillna(0) + 1) / (negatives.reindex(items).fillna(0) + 1))
    first = pd.concat(parts.values()).query("label == 1").groupby("item_id").timestamp.min()
    out = {}
    for split in ("val", "test"):
        rows = parts[split]
        scores = {"item bias": rows.item_id.map(bias).fillna(0),
                  "unseen": (~rows.item_id.isin(items)).astype(float),
                  "popularity": rows.item_id.map(positives).fillna(0),
                  "age": rows.timestamp - rows.item_id.map(first)}
        out[split] = {name: auc(rows.label.to_numpy(), s.to_numpy()) for name, s in scores.items()}
    return out


def ml100k_as_positives(ml100k_dir: Path, tmp: Path) -> Path:
    """ML-100K's ratings as a table of positives (user, item, time), for a schema with `negatives:`."""
    ratings = pd.read_csv(ml100k_dir / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    path = tmp / "ml100k_positives.csv"
    ratings[["user_id", "item_id", "timestamp"]].to_csv(path, index=False)
    return path


def main(amazon_dir: str = "../shared/data/amazon-beauty", ml100k_dir: str = "../shared/data/ml-100k",
         windows: tuple[int, ...] = (300, 1000, 3000, 10000), seed: int = 0, out: str = str(OUT)) -> None:
    """Write, per data set and `by: popularity` window (and `by: uniform`), the validation and test AUC of the
    item-only scores, and the shortcut of RULE.md step 1 (the largest |AUC - 0.5| of item bias and unseen on
    validation).

    Args:
        amazon_dir: Amazon Beauty's RecBole folder.
        ml100k_dir: MovieLens-100K's folder (u.data), read as a log of positives.
        windows: the popularity windows to compare.
        seed: the negatives' seed.
        out: the markdown file to write.
    """
    lines = [f"# Item-only shortcuts of sampled negatives, per rule\n\nWritten by `{command()}`; rule: `RULE.md`.",
             f"One negative per positive, seed {seed}; AUC of each item-only score on the split's rows (module"
             " docstring of `negatives_shortcuts.py`). Shortcut: the largest |AUC - 0.5| of item bias and unseen"
             " on validation.\n",
             "| data set | rule | shortcut (val) | " + " | ".join(f"{s} val / test" for s in SCORES) + " |",
             "|---|---|---|" + "---|" * len(SCORES)]
    rules = [f"{{by: popularity, window: {w}, seed: {seed}}}" for w in windows] + [f"{{by: uniform, seed: {seed}}}"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tables = {"Amazon Beauty": f"data: {Path(amazon_dir).resolve()}\n",
                  "ML-100K as positives": (f"data: {ml100k_as_positives(Path(ml100k_dir), tmp)}\ntimestamp: timestamp\n"
                                           "user: user_id\nitem: item_id\nfields:\n"
                                           "  - {name: user_id, kind: categorical, side: user}\n"
                                           "  - {name: item_id, kind: categorical, side: item}\n")}
        for name, schema_text in tables.items():
            for rule in rules:
                schema = tmp / "schema.yaml"
                schema.write_text(f"{schema_text}negatives: {rule}\n")
                aucs = shortcut_aucs(labelled_splits(read_generic(schema)))
                shortcut = max(abs(aucs["val"][s] - 0.5) for s in ("item bias", "unseen"))
                cells = " | ".join(f"{aucs['val'][s]:.3f} / {aucs['test'][s]:.3f}" for s in SCORES)
                lines.append(f"| {name} | `{rule}` | {shortcut:.3f} | {cells} |")
                print(lines[-1], flush=True)
    Path(out).write_text("\n".join(lines) + "\n")
