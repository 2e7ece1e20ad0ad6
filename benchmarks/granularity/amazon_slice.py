"""A seeded user slice of Amazon Beauty (RecBole atomic files), for the text-granularity rule's row-text arm.

    python -m benchmarks amazon_slice ../shared/data/amazon-beauty /work/runs/amazon-beauty-15 --fraction 0.15

Keeps every interaction of a seeded `fraction` of the users and the items they touched (titles unchanged), and
writes the same two files, so `ctrl prepare` samples negatives on it as on the full data. Row text on the full data
means encoding ~278k texts (hours on a 2-core CPU without native bf16); a slice keeps both arms on the same rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def main(data_dir: str, out: str, fraction: float = 0.15, seed: int = 0) -> None:
    """Write the slice and print its size.

    Args:
        data_dir: the Amazon Beauty folder (`amazon_beauty.inter`, `amazon_beauty.item`).
        out: the folder to write (created).
        fraction: share of users kept, with all their interactions.
        seed: the user sample's seed.
    """
    source, target = Path(data_dir), Path(out)
    inter = pd.read_csv(source / "amazon_beauty.inter", sep="\t", dtype=str)
    item = pd.read_csv(source / "amazon_beauty.item", sep="\t", dtype=str, keep_default_na=False)
    users = np.sort(inter["user_id:token"].unique())
    kept = set(np.random.default_rng(seed).choice(users, size=round(fraction * len(users)), replace=False))
    inter = inter[inter["user_id:token"].isin(kept)]
    item = item[item["item_id:token"].isin(set(inter["item_id:token"]))]
    target.mkdir(parents=True, exist_ok=True)
    inter.to_csv(target / "amazon_beauty.inter", sep="\t", index=False)
    item.to_csv(target / "amazon_beauty.item", sep="\t", index=False)
    print(f"{target}: {len(inter):,} interactions, {len(kept):,} users, {len(item):,} items "
          f"({fraction:.0%} of {len(users):,} users, seed {seed})")
