"""The Lightning data module: prepared parquet -> in-memory tensors -> batches (see tabular2text/schema.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tabular2text.download import ensure_movielens_100k
from tabular2text.encode import frame_to_tensors
from tabular2text.prepare import SPLITS, prepare
from tabular2text.schema import FeatureSpec


class TensorDictDataset(Dataset):
    """Rows of a dict of equally long tensors. `__getitems__` lets the DataLoader slice a whole batch at
    once instead of collating thousands of single rows."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["row"])

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices)
        return {k: v[index] for k, v in self.tensors.items()}


class ResumableSampler(DistributedSampler):
    """DistributedSampler's order (a permutation seeded by seed + epoch, one shard per rank; with one
    process, all rows) that can start an epoch after the batches an interrupted run already trained on.
    Being a DistributedSampler, Lightning uses it as is under DDP instead of wrapping it."""

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.resume_at = (-1, 0)  # (epoch, batches of it already trained)

    def __iter__(self):
        indices = list(super().__iter__())
        epoch, batches = self.resume_at
        return iter(indices[batches * self.batch_size:] if epoch == self.epoch else indices)


def keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


class CTRDataModule(pl.LightningDataModule):
    """CTR samples of one data set, prepared once (cached by fingerprint) and served as tensor batches.

    Args:
        data_dir: a MovieLens-100K / -1M or RecBole directory, or a schema YAML for generic data.
        download: fetch MovieLens-100K into `data_dir` when it is absent.
        history_length: K, the number of most recent items in the behavior sequence.
        template: a text template preset (natural, dash, colon, masked, values), or a mapping of
            template names to format strings that replace those of natural (tabular2text/templates.py).
        batch_size: training batch size (evaluation uses `eval_batch_size`).
        eval_batch_size: batch size for validation, test and predict.
        num_workers: DataLoader workers (0 is fastest here: batches are tensor slices).
        cache_dir: where prepared data lives (default $CTRL_CACHE_DIR or ~/.cache/ctrl-rec).
        val_fold: the time block that validates: 0 (the paper's: the 10% just before test), or k > 0 for the
            block k blocks earlier, trained on everything before it (a rolling-origin fold for choosing
            hyper-parameters on more than one validation period; test is the same in every fold).
    """

    def __init__(self, data_dir: str, download: bool = False, history_length: PositiveInt = 10,
                 template: str | dict[str, str] = "natural", batch_size: PositiveInt = 2048,
                 eval_batch_size: PositiveInt = 8192, num_workers: NonNegativeInt = 0, cache_dir: str | None = None,
                 val_fold: NonNegativeInt = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        if download:
            ensure_movielens_100k(Path(data_dir).expanduser())
        # Prepared here, not in prepare_data(): the CLI links `feature_spec` into the model right after
        # this constructor. Preparation is cached and atomic, so every DDP rank may call it.
        self.prepared_dir = prepare(data_dir, cache_dir, history_length, template, val_fold)
        self.feature_spec = FeatureSpec.load(self.prepared_dir / "feature_spec.json")
        self._frames: dict[str, pd.DataFrame] = {}
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._resume_at = (-1, 0)

    @property
    def text_splits(self) -> tuple[str, ...]:
        """The splits before test, in time order: together the same rows in every val_fold, so the text
        vectors of stage 1 are encoded once for all folds."""
        return ("train", "val", "gap") if self.hparams.val_fold else ("train", "val")

    def frame(self, split: str) -> pd.DataFrame:
        """The prepared split as stored: encoded ids, label, timestamp, user_text, item_text, user_profile_text."""
        if split not in (*SPLITS, *self.text_splits):
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if split not in self._frames:
            self._frames[split] = pd.read_parquet(self.prepared_dir / f"{split}.parquet")
        return self._frames[split]

    def texts(self, split: str) -> tuple[list[str], list[str]]:
        """(user sentence, item sentence) per row of `split`; `batch["row"]` indexes these lists."""
        frame = self.frame(split)
        return frame["user_text"].tolist(), frame["item_text"].tolist()

    def profile_texts(self, split: str) -> list[str]:
        """The user sentence without the behavior sequence, per row of `split` (entity-level text)."""
        return self.frame(split)["user_profile_text"].tolist()

    def item_catalog(self) -> tuple[np.ndarray, list[str]]:
        """The item ids of the vocabulary and their item sentences (entity-level text of history items)."""
        items = pd.read_parquet(self.prepared_dir / "items.parquet")
        return items["id"].to_numpy(np.int64), items["item_text"].tolist()

    def tensors(self, split: str) -> dict[str, torch.Tensor]:
        if split not in self._tensors:
            self._tensors[split] = frame_to_tensors(self.frame(split), self.feature_spec)
        return self._tensors[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = TensorDictDataset(self.tensors(split))
        batch_size = self.hparams.batch_size if shuffle else self.hparams.eval_batch_size
        sampler = None
        if shuffle:
            # Seeded like Lightning seeds its own distributed samplers: by seed_everything.
            trainer = self.trainer
            sampler = ResumableSampler(dataset, batch_size, trainer.world_size if trainer else 1,
                                       trainer.global_rank if trainer else 0, int(os.environ.get("PL_GLOBAL_SEED", 0)))
            sampler.resume_at = self._resume_at
        # An own generator: the loader then never draws from the global RNG, which dropout uses.
        return DataLoader(dataset, sampler=sampler, collate_fn=keep_batch, batch_size=batch_size,
                          generator=torch.Generator(), num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    # --- resuming: every checkpoint records where training stands in the data -------------------------------
    def state_dict(self) -> dict:
        """Saved by Lightning in every checkpoint. With it (and ctrl.lightning.RandomState for the random
        states), a fit resumed from a mid-epoch checkpoint (`--ckpt_path last`) trains the remaining batches
        of that epoch, as the uninterrupted run does."""
        if self.trainer is None or self.trainer.state.fn != "fit":
            return {}
        loop = self.trainer.fit_loop
        return {"epoch": loop.epoch_progress.current.processed,
                "batches": loop.epoch_loop.batch_progress.current.ready}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume_at = (state["epoch"], state["batches"])

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
