"""The Lightning data module: prepared parquet -> in-memory tensors -> batches (see tabular2text/schema.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ctrl.data.download import ensure_movielens_100k
from ctrl.data.encode import frame_to_tensors
from ctrl.data.prepare import SPLITS, prepare
from tabular2text.schema import FeatureSpec
from tabular2text.templates import Rendered


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


def keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


class CTRDataModule(pl.LightningDataModule):
    """CTR samples of one data set, prepared once (cached by fingerprint) and served as tensor batches.

    Args:
        data_dir: a MovieLens-100K / -1M or RecBole directory, or a schema YAML for generic data.
        download: fetch MovieLens-100K into `data_dir` when it is absent.
        history_length: K, the number of most recent items in the behavior sequence.
        template: the text template preset (natural, dash, colon, masked, values).
        batch_size: training batch size (evaluation uses `eval_batch_size`).
        eval_batch_size: batch size for validation, test and predict.
        num_workers: DataLoader workers (0 is fastest here: batches are tensor slices).
        cache_dir: where prepared data lives (default $CTRL_CACHE_DIR or ~/.cache/ctrl-rec).
    """

    def __init__(self, data_dir: str, download: bool = False, history_length: int = 10, template: str = "natural",
                 batch_size: int = 2048, eval_batch_size: int = 8192, num_workers: int = 0,
                 cache_dir: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        if download:
            ensure_movielens_100k(Path(data_dir).expanduser())
        # Prepared here, not in prepare_data(): the CLI links `feature_spec` into the model right after
        # this constructor. Preparation is cached and atomic, so every DDP rank may call it.
        self.prepared_dir = prepare(data_dir, cache_dir, history_length, template)
        self.feature_spec = FeatureSpec.load(self.prepared_dir / "feature_spec.json")
        self._frames: dict[str, pd.DataFrame] = {}
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}

    def frame(self, split: str) -> pd.DataFrame:
        """The prepared split as stored: encoded ids, label, timestamp, text and item_start."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if split not in self._frames:
            self._frames[split] = pd.read_parquet(self.prepared_dir / f"{split}.parquet")
        return self._frames[split]

    def texts(self, split: str) -> tuple[list[str], list[str]]:
        """(user sentence, item sentence) per row of `split`; `batch["row"]` indexes these lists."""
        frame = self.frame(split)
        rendered = [Rendered(t, s) for t, s in zip(frame["text"], frame["item_start"], strict=True)]
        return [r.user_text for r in rendered], [r.item_text for r in rendered]

    def tensors(self, split: str) -> dict[str, torch.Tensor]:
        if split not in self._tensors:
            self._tensors[split] = frame_to_tensors(self.frame(split), self.feature_spec)
        return self._tensors[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(TensorDictDataset(self.tensors(split)), shuffle=shuffle, collate_fn=keep_batch,
                          batch_size=self.hparams.batch_size if shuffle else self.hparams.eval_batch_size,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
