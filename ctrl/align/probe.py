"""A transfer signal for stage 1: how much of the click label the aligned collaborative tower already knows.

Stage 1's own loss and retrieval top-1 say how well rows match their texts, not whether stage 2 will gain;
a retrieval task solved by matching row identity keeps improving while transfer stops. After every stage-1
validation this callback fits a logistic regression on the tower's output features of train rows and logs
its AUC on the validation rows as `val/probe_auc` (a linear probe, as in representation learning). It
draws from no global random generator, so a run with the probe trains exactly as one without it. It reads
its rows from the trainer's own train and validation loaders (each a `TensorDictDataset` of one split), not
from a data module by split name.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc


class TransferProbe(pl.Callback):
    """Logs `val/probe_auc` after each stage-1 validation (not during the sanity check) and keeps every
    validation's metrics in `history` (the stage-1 curve `ctrl bench` records).

    Args:
        train_rows: train rows the probe is fit on, evenly spaced over the split (all when fewer).
        l2: L2 penalty of the logistic regression, on standardised features.
        steps: L-BFGS iterations.
        batch_size: rows per tower forward pass.
    """

    def __init__(self, train_rows: int = 20000, l2: float = 1e-3, steps: int = 100, batch_size: int = 8192) -> None:
        self.train_rows, self.l2, self.steps, self.batch_size = train_rows, l2, steps, batch_size
        self.history: list[dict[str, float]] = []  # per validation: epoch, global step and every val/ metric

    @torch.no_grad()
    def features(self, module: pl.LightningModule, tensors: dict[str, Tensor], rows: Tensor) -> Tensor:
        out = []
        for chunk in rows.split(self.batch_size):
            batch = {k: v[chunk].to(module.device) for k, v in tensors.items()}
            out.append(module.tower(batch).float().cpu())
        return torch.cat(out)

    def probe_auc(self, train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor) -> float:
        mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
        train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
        weight = torch.zeros(train_x.shape[1], requires_grad=True)
        bias = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=self.steps, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(train_x @ weight + bias, train_y)
            loss = loss + self.l2 * weight.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        with torch.no_grad():
            return float(binary_auroc(val_x @ weight + bias, val_y.long()))

    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # The rows the trainer fits and validates on, whole and in split order (a loader's sampler only orders
        # or shards them): every DDP rank probes the same rows, at any step of an epoch.
        train, val = trainer.train_dataloader.dataset.tensors, trainer.val_dataloaders.dataset.tensors
        n = len(train["label"])
        rows = torch.linspace(0, n - 1, min(n, self.train_rows)).round().long().unique()
        auc = self.probe_auc(self.features(module, train, rows), train["label"][rows].float(),
                             self.features(module, val, torch.arange(len(val["label"]))), val["label"].float())
        module.log("val/probe_auc", auc, on_step=False, on_epoch=True)

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})
