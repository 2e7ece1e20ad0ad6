"""Stage 2: supervised fine-tuning of the collaborative tower (plain CTR training).

Run through Lightning, e.g. `pl.Trainer().fit(CTRModule(spec, DeepFM), datamodule=...)`; see
`benchmarks/backbones_ml100k.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC

from tabular2text.schema import FeatureSpec
from towers.collaborative import Batch, CollaborativeTower, CTRModel

EVAL_SPLITS = ("val", "test")


class CTRModule(pl.LightningModule):
    """Tower + fresh linear head trained with binary cross-entropy and Adam.

    Logs `train/loss` and, per evaluation split, the epoch-level `{split}/auc` and `{split}/logloss`
    (computed over all rows of the epoch, never averaged over batches).

    Args:
        feature_spec: the data's feature spec (linked from the data module).
        backbone: builds the collaborative tower from the spec, e.g. a class from `towers.BACKBONES`.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(
        self,
        feature_spec: FeatureSpec,
        backbone: Callable[[FeatureSpec], CollaborativeTower],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "feature_spec"])
        self.model = CTRModel(backbone(feature_spec))
        self.auc = nn.ModuleDict({split: BinaryAUROC() for split in EVAL_SPLITS})
        self.logloss = nn.ModuleDict({split: MeanMetric() for split in EVAL_SPLITS})

    def forward(self, batch: Batch) -> torch.Tensor:
        """B logits."""
        return self.model(batch)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(self(batch), batch["label"])
        self.log("train/loss", loss, batch_size=len(batch["label"]))
        return loss

    def _evaluate(self, batch: Batch, split: str) -> None:
        logits, labels = self(batch), batch["label"]
        self.auc[split].update(torch.sigmoid(logits), labels.long())
        self.logloss[split].update(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"))
        # Passing the metric objects makes Lightning compute them once per epoch over all rows.
        self.log(f"{split}/auc", self.auc[split], on_step=False, on_epoch=True)
        self.log(f"{split}/logloss", self.logloss[split], on_step=False, on_epoch=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """B click probabilities."""
        return torch.sigmoid(self(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
