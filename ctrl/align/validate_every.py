"""How often stage 1 validates, and so how near its threshold the retrieval-top-1 stop fires."""

from __future__ import annotations

import pytorch_lightning as pl

from towers.checkpoints import ConfigError


class ValidateEvery(pl.Callback):
    """Validates every `steps` training steps, counted over the whole run, or at each epoch's end when an
    epoch is shorter; it replaces `Trainer(val_check_interval, check_val_every_n_epoch)`. A stop tested at
    each epoch's end can fire far past its threshold on a large table (hundreds of steps an epoch); a fixed
    step interval alone would never validate a table whose whole run is shorter than it. An `EarlyStopping`
    beside it needs `check_on_train_epoch_end=False`, so that it tests its metric after each validation.
    """

    def __init__(self, steps: int = 25) -> None:
        if steps < 1:
            raise ConfigError(f"ValidateEvery: steps must be at least 1, got {steps}")
        self.steps = steps

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # read by the training loop at each batch; the fit loop set them from the trainer's options just before
        trainer.check_val_every_n_epoch = None  # count steps over the run, not within an epoch
        trainer.val_check_batch = min(self.steps, trainer.num_training_batches)
