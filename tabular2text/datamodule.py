"""The Lightning data module: prepared parquet -> in-memory tensors -> batches (see tabular2text/schema.py),
and, once a language tower is handed in (`serve_text`), each batch's text side as `batch["text"]`."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tabular2text.download import ensure_movielens_100k
from tabular2text.encode import frame_to_tensors
from tabular2text.oserrors import origin
from tabular2text.prepare import SPLITS, SplitRule, default_cache_dir, prepare, read_split
from tabular2text.schema import FeatureSpec
from tabular2text.sources import DataError
from tabular2text.text_side import TextSide
from tabular2text.text_vectors import (
    FrozenText,
    TextEncoder,
    TextVectorCache,
    Tokenize,
    TokenizedText,
    TokenStates,
    with_text,
)


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
        text_cache_dir: where a frozen language tower's text vectors are cached (default: `text-vectors` in
            `cache_dir`).
        split: `time` (the paper's 8:1:1 in time order) or `last_per_user` (each user's last interaction is
            test, the one before it validation: DIN's protocol, Amazon Beauty's; benchmarks/protocol/).
    """

    def __init__(self, data_dir: str, download: bool = False, history_length: PositiveInt = 10,
                 template: str | dict[str, str] = "natural", batch_size: PositiveInt = 2048,
                 eval_batch_size: PositiveInt = 8192, num_workers: NonNegativeInt = 0, cache_dir: str | None = None,
                 val_fold: NonNegativeInt = 0, text_cache_dir: str | None = None,
                 split: SplitRule = "time") -> None:
        super().__init__()
        self.save_hyperparameters()
        if download:
            ensure_movielens_100k(Path(data_dir).expanduser())
        # Prepared here, not in prepare_data(): the CLI links `feature_spec` into the model right after
        # this constructor. Preparation is cached and atomic, so every DDP rank may call it.
        self.prepared_dir = prepare(data_dir, cache_dir, history_length, template, val_fold,
                                    cache_option="--data.cache_dir", split=split)
        self.feature_spec = FeatureSpec.load(self.prepared_dir / "feature_spec.json")
        data_cache = Path(cache_dir or default_cache_dir()).expanduser()
        self.text_cache_dir = (origin(Path(text_cache_dir).expanduser(), "--data.text_cache_dir") if text_cache_dir
                               else data_cache / "text-vectors")
        self.text: FrozenText | TokenizedText | TokenStates | None = None  # fills batch["text"]; set by serve_text
        self._frames: dict[str, pd.DataFrame] = {}
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._resume_at = (-1, 0)

    @property
    def text_splits(self) -> tuple[str, ...]:
        """The splits other than test (before it in time under `split: time`): together the same rows in every
        val_fold, so the text vectors of stage 1 are encoded once for all folds."""
        return ("train", "val", "gap") if self.hparams.val_fold else ("train", "val")

    def setup(self, stage: str) -> None:
        """A fit needs clicks and non-clicks in train and in val: with one class the loss learns a constant
        and val/auc, which chooses the best checkpoint, is undefined. (A one-class test is reported as an
        undefined AUC instead.)"""
        if stage != "fit":
            return
        for split in ("train", "val"):
            labels = self.frame(split)["label"]
            if labels.nunique() < 2:
                raise DataError(f"{self.hparams.data_dir}: the {split} split ({len(labels)} rows) holds only label"
                                f" {int(labels.iloc[0])}: its AUC is undefined and no checkpoint can be chosen on"
                                " it; the data needs clicks and non-clicks in every time block (more rows, another"
                                " label rule or another val_fold)")

    def frame(self, split: str) -> pd.DataFrame:
        """The prepared split as stored: encoded ids, label, timestamp, user_text, item_text, user_profile_text."""
        if split not in (*SPLITS, *self.text_splits):
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if split not in self._frames:
            self._frames[split] = read_split(self.prepared_dir / f"{split}.parquet")
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

    # --- the text side ------------------------------------------------------------------------------------
    def serve_text(self, side: TextSide, encoder: TextEncoder | None = None, tokenize: Tokenize | None = None
                   ) -> None:
        """From now on each batch of the splits before test carries `batch["text"]` next to its features, as
        `side` says (tabular2text/text_side.py): a trainable tower's token ids (given `tokenize`), or what a
        frozen encoder wrote into the on-disk cache (given `encoder`): each row's vector, its entity vectors,
        or the hidden states of its (user, item) text. Cached texts are read, missing ones encoded; under DDP
        every rank encodes its share, so call this on every rank.

        Args:
            side: what to serve, e.g. `TextSide.from_settings(spec, "entity")`.
            encoder: what encodes texts into the cache, e.g. `towers.encoder.FrozenEncoder` (with
                `lower_blocks` for "states").
            tokenize: the trainable tower's tokenizer call, e.g. `LanguageTower.tokenize`.
        """
        needs = "tokenize" if side.serves == "tokens" else "encoder"
        given = [name for name, value in (("encoder", encoder), ("tokenize", tokenize)) if value is not None]
        if given != [needs]:
            raise ValueError(f"serving {side.serves} takes {needs} alone (an encoder of a frozen tower, tokenize of a"
                             f" trainable one); given: {', '.join(given) or 'neither'}")
        if side.serves == "tokens":
            self.text = TokenizedText({split: self.texts(split) for split in self.text_splits}, tokenize)
        elif side.serves == "vectors":
            self.text = self._row_vectors(encoder)
        elif side.serves == "states":
            self.text = self._row_states(encoder)
        else:
            self.text = self._entity_vectors(encoder, side.history_field)

    def _row_vectors(self, encoder: TextEncoder) -> FrozenText:
        """Row text: one vector per row, of its (user sentence, item sentence) pair."""
        table, index = self._cached(encoder, self.before_test("user_text"), self.before_test("item_text"))
        return FrozenText({split: [(table, index[rows])] for split, rows in self._split_rows().items()})

    def _row_states(self, encoder: TextEncoder) -> TokenStates:
        """Row text through the frozen lower blocks: each row's hidden states and its number of tokens."""
        users, items = self.before_test("user_text"), self.before_test("item_text")
        table, index = self._cached(encoder, users, items)
        lengths = encoder.token_lengths(users, items)
        return TokenStates({split: (table, index[rows], lengths[rows]) for split, rows in self._split_rows().items()},
                           encoder.hidden_size)

    def _entity_vectors(self, encoder: TextEncoder, history_field: str | None) -> FrozenText:
        """Entity text: each user's sentence without the behavior sequence and each item's sentence, encoded
        once per entity; per row [user vector, item vector, mean of its history items' vectors]."""
        spec = self.feature_spec
        ids, catalog = self.item_catalog()
        users, items = self.before_test("user_profile_text"), self.before_test("item_text")
        # One cache entry for all of them: the catalog and the rows' items are mostly the same sentences, and
        # each distinct sentence is encoded once.
        table, index = self._cached(encoder, [*catalog, *users, *items])
        catalog_index, user_index, item_index = np.split(index, [len(catalog), len(catalog) + len(users)])
        item_vectors = torch.zeros(spec[spec.item_field].vocab_size, encoder.output_dim)
        item_vectors[torch.from_numpy(ids)] = torch.from_numpy(table[catalog_index])
        return FrozenText({split: [(table, user_index[rows]), (table, item_index[rows])]
                           for split, rows in self._split_rows().items()}, item_vectors, history_field)

    def _cached(self, encoder: TextEncoder, first: list[str], second: list[str] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """The cached vectors of the distinct texts (encoding the missing ones) and, per text, an index into them."""
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return TextVectorCache(self.text_cache_dir).vectors(
            encoder, first, second, rank=rank, world_size=world_size,
            barrier=trainer.strategy.barrier if trainer else lambda: None)

    def before_test(self, column: str) -> list[str]:
        """A text column of all rows before test, in time order: one cache entry for them in every val_fold."""
        return [text for split in self.text_splits for text in self.frame(split)[column].tolist()]

    def _split_rows(self) -> dict[str, slice]:
        """Each split's rows within the rows before test (`before_test`)."""
        sizes = [len(self.frame(split)) for split in self.text_splits]
        starts = np.cumsum([0, *sizes]).tolist()
        return {split: slice(start, start + size)
                for split, start, size in zip(self.text_splits, starts, sizes, strict=False)}

    def collate(self, split: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """The DataLoader's collate function: the sliced batch, plus `batch["text"]` once text is served."""
        if self.text is None or split not in self.text_splits:
            return keep_batch
        return partial(with_text, self.text, split)

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
        return DataLoader(dataset, sampler=sampler, collate_fn=self.collate(split), batch_size=batch_size,
                          generator=torch.Generator(), num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    # --- resuming: every checkpoint records where training stands in the data -------------------------------
    def state_dict(self) -> dict:
        """Saved by Lightning in every checkpoint. With it (and ctrl.app.lightning_cli.RandomState for the random
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
