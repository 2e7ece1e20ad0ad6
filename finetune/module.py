"""Stage 2: supervised fine-tuning of the collaborative tower alone (or, without `init_from`, the plain
from-scratch CTR baseline: the module is the same; what CTRL's stage 2 sets differently lives in
configs/ml100k/finetune_aligned.yaml).

    ctrl fit --config configs/stages/finetune.yaml --config configs/ml100k/finetune.yaml \
        --config configs/ml100k/finetune_aligned.yaml \
        --model.init_args.init_from runs/.../align.ckpt

The language model is never loaded here: a stage-1 checkpoint contributes only its `tower.` weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveFloat
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.utilities import dim_zero_cat

from finetune.export import export_model
from tabular2text.oserrors import origin
from tabular2text.schema import OOV, FeatureSpec
from towers.checkpoints import (
    CheckpointError,
    ConfigError,
    SpecLeftOutOfLoggers,
    check_resumed_checkpoint,
    checkpoint_stage,
    read_checkpoint,
    require_finite,
    spec_mismatch,
    stamp_checkpoint,
)
from towers.collaborative import CollaborativeTower, CTRModel, backbone_config, make_tower

Batch = dict[str, torch.Tensor]
# test_cold: test rows whose user or item never appears in train (their id is out-of-vocabulary).
EVAL_SLICES = ("val", "test", "test_cold")


def load_aligned_tower(path: str | Path, tower: CollaborativeTower, spec: FeatureSpec,
                       keep: Literal["tower", "embeddings"] = "tower") -> None:
    """Copy the collaborative tower of a stage-1 (alignment) checkpoint into `tower`: all of it, or with
    keep="embeddings" only its field embeddings (`tower.embedding`), the backbone keeping its fresh weights."""
    path = Path(path)
    ckpt = read_checkpoint(path, "init_from")
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    if checkpoint_stage(ckpt) == 2:
        raise CheckpointError(f"init_from: {path} is a stage-2 (fine-tuned) checkpoint; init_from takes a stage-1"
                              " alignment checkpoint (to evaluate a stage-2 checkpoint, pass it as --ckpt_path)")
    tower_state = {k.removeprefix("tower."): v for k, v in state.items() if k.startswith("tower.")}
    if not tower_state:
        raise CheckpointError(f"init_from: {path} holds no collaborative tower (no 'tower.' weights); pass the"
                              " checkpoint written by stage 1 (ctrl fit with an align_*.yaml config)")
    saved_spec = ckpt.get("hyper_parameters", {}).get("feature_spec")
    problem = spec_mismatch(spec, saved_spec) if isinstance(saved_spec, dict) else None
    if problem:
        raise CheckpointError(f"init_from: {path} was trained on other data: {problem}; run stage 1 on this data")
    target, prefix = (tower.embedding, "embedding.") if keep == "embeddings" else (tower, "")
    try:
        target.load_state_dict({k.removeprefix(prefix): v for k, v in tower_state.items() if k.startswith(prefix)})
    except RuntimeError as e:
        raise CheckpointError(f"init_from: {path} holds a different backbone or backbone settings than this"
                              f" config ({str(e).splitlines()[0]}); use the same backbone in both stages") from e


class DefinedAUROC(BinaryAUROC):
    """torchmetrics' AUC, except that an epoch whose labels are all one class gives NaN (undefined), not the
    0.0 torchmetrics returns: "test AUC 0.0000" of a one-class slice would read as a real, terrible score."""

    def compute(self) -> Tensor:
        target = dim_zero_cat(self.target) if self.target else torch.zeros(0)
        if target.numel() == 0 or bool(target.min() == target.max()):
            return torch.tensor(float("nan"))
        return super().compute()


class CTRModule(SpecLeftOutOfLoggers, pl.LightningModule):
    """Tower + fresh linear head trained with binary cross-entropy and Adam.

    Logs `train/loss` and, per evaluation slice (val, test, test_cold), the epoch-level `{slice}/auc` and
    `{slice}/logloss`, computed over all rows of the epoch, never averaged over batches.

    Args:
        feature_spec: the data's feature spec as a dict (linked from the data module by the CLI).
        backbone: builds the collaborative tower from the spec, e.g. a class from `towers.BACKBONES`.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        init_from: a stage-1 checkpoint whose collaborative tower initialises this one (CTRL); None
            trains from scratch (the baseline). The output layer is always fresh.
        init_keep: what init_from initialises: the whole tower ("tower": field embeddings and backbone) or
            only the field embeddings ("embeddings"; the backbone starts fresh, as in the baseline).
        init_lr_scale: the learning rate of the weights init_from initialises is lr x init_lr_scale (the fresh
            output layer and any fresh weights keep lr): below 1, stage 2 moves away from the aligned start
            more slowly. No effect without init_from.
        proximal: pulls the weights init_from initialises back to their aligned values during stage 2 (L2-SP):
            the loss gains proximal / 2 x their squared distance from the aligned start. 0 (default) is plain
            fine-tuning. No effect without init_from.
    """

    def __init__(
        self,
        feature_spec: dict,
        backbone: Callable[[FeatureSpec], CollaborativeTower],
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.0,
        init_from: str | None = None,
        init_keep: Literal["tower", "embeddings"] = "tower",
        init_lr_scale: PositiveFloat = 1.0,
        proximal: NonNegativeFloat = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.hparams.backbone = backbone_config(backbone)  # what rebuilds the tower (load_from_checkpoint, export)
        self.spec = FeatureSpec.from_dict(feature_spec)
        self.model = CTRModel(make_tower(backbone, self.spec))
        self.auc = nn.ModuleDict({s: DefinedAUROC() for s in EVAL_SLICES})
        self.logloss = nn.ModuleDict({s: MeanMetric() for s in EVAL_SLICES})
        # each slice's size beside its metrics: a cold-start AUC of a dozen rows is not a result
        self.rows = nn.ModuleDict({s: SumMetric() for s in EVAL_SLICES})
        self.positives = nn.ModuleDict({s: SumMetric() for s in EVAL_SLICES})
        self.anchor: dict[str, torch.Tensor] = {}  # the aligned start of the proximal term (not saved)

    def setup(self, stage: str) -> None:
        # Only when fitting: test/predict load a stage-2 checkpoint, and a resumed fit's checkpoint is
        # restored after this hook, so it overrides the aligned start as it should.
        if stage == "fit" and self.hparams.init_from:
            load_aligned_tower(self.hparams.init_from, self.model.tower, self.spec, self.hparams.init_keep)
            if self.hparams.proximal:
                self.anchor = {name: p.detach().clone() for name, p in self.aligned_parameters()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        stamp_checkpoint(checkpoint, 2)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_resumed_checkpoint(checkpoint, 2, self.hparams.feature_spec)

    def forward(self, batch: Batch) -> torch.Tensor:
        """B logits."""
        return self.model(batch)

    def aligned_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The weights init_from initialises: the whole tower, or its field embeddings (init_keep)."""
        tower = self.model.tower
        return list((tower.embedding if self.hparams.init_keep == "embeddings" else tower).named_parameters())

    def proximal_loss(self) -> torch.Tensor:
        """proximal / 2 x the squared distance of the aligned weights from their stage-1 values."""
        total = torch.zeros((), device=self.device)
        for name, p in self.aligned_parameters():
            if self.anchor[name].device != p.device:
                self.anchor[name] = self.anchor[name].to(p.device)
            total = total + (p - self.anchor[name]).pow(2).sum()
        return 0.5 * self.hparams.proximal * total

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(self(batch), batch["label"])
        self.log("train/loss", loss, batch_size=len(batch["label"]))
        if self.anchor:
            proximal = self.proximal_loss()
            self.log("train/proximal", proximal, batch_size=len(batch["label"]))
            loss = loss + proximal
        return require_finite(loss, self.current_epoch, self.global_step)

    def cold_rows(self, batch: Batch) -> torch.Tensor:
        """B booleans: the row's user or item id was never seen in training."""
        cold = torch.zeros_like(batch["label"], dtype=torch.bool)
        for name in (self.spec.user_field, self.spec.item_field):
            if name:
                cold |= batch[name] == OOV
        return cold

    def _update(self, name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.auc[name].update(torch.sigmoid(logits), labels.long())
        self.logloss[name].update(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"))
        self.rows[name].update(torch.ones_like(labels))
        self.positives[name].update(labels)
        # Passing the metric objects makes Lightning compute them once per epoch over all rows.
        for metric, values in (("auc", self.auc), ("logloss", self.logloss), ("rows", self.rows),
                               ("positives", self.positives)):
            self.log(f"{name}/{metric}", values[name], on_step=False, on_epoch=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._update("val", self(batch), batch["label"])

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        logits, labels = self(batch), batch["label"]
        self._update("test", logits, labels)
        cold = self.cold_rows(batch)
        if cold.any():
            self._update("test_cold", logits[cold], labels[cold])

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Per row of the batch: `row` (its index in the split), `probability` and, when the batch has it, `label`."""
        out = {"row": batch["row"], "probability": torch.sigmoid(self(batch))}
        if "label" in batch:
            out["label"] = batch["label"]
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if not hp.init_from or hp.init_lr_scale == 1.0:
            return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        aligned = {id(p) for _, p in self.aligned_parameters()}
        groups = [{"params": [p for p in self.parameters() if id(p) in aligned], "lr": hp.lr * hp.init_lr_scale},
                  {"params": [p for p in self.parameters() if id(p) not in aligned], "lr": hp.lr}]
        return torch.optim.Adam(groups, lr=hp.lr, weight_decay=hp.weight_decay)


def load_stage2(ckpt_path: str | Path, what: str = "export", option: str = "--ckpt_path") -> CTRModule:
    """The CTRModule of a stage-2 checkpoint (of `ctrl fit` with a finetune config); a stage-1 checkpoint or
    another file is refused with a CheckpointError saying what to pass (`option` names where it came from)."""
    path = Path(ckpt_path)
    stage = checkpoint_stage(read_checkpoint(path, option))
    if stage != 2:
        kind = "a stage-1 (alignment) checkpoint" if stage == 1 else "not a ctrl-rec checkpoint"
        raise CheckpointError(f"{path} is {kind}; {what} takes a stage-2 checkpoint: fine-tune first"
                              " (ctrl run, or ctrl fit of a stage-2 config with --model.init_args.init_from"
                              " ALIGN.ckpt) and pass its best.ckpt")
    return CTRModule.load_from_checkpoint(path, map_location="cpu")


def export_checkpoint(ckpt_path: str | Path, out: str | Path) -> Path:
    """Export a stage-2 checkpoint for serving (finetune/export.py)."""
    module = load_stage2(ckpt_path)
    return export_model(module.model, module.spec, module.hparams.backbone, out, ckpt_path)


def log_export_artifact(trainer: pl.Trainer, export_dir: Path) -> None:
    """Attach an export directory to the trainer's W&B run as a model artifact, when it logs to W&B."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            artifact = wandb.Artifact(name=f"ctrl-model-{logger.experiment.id}", type="model")
            artifact.add_dir(str(export_dir))
            logger.experiment.log_artifact(artifact)


class ExportBest(pl.Callback):
    """At the end of a stage-2 fit, export the best checkpoint (weights, feature spec, model.pt2, model.onnx)
    and log the export to the W&B run as a model artifact.

    Args:
        dirpath: the export directory; None puts it at `<trainer.default_root_dir>/export`.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.export_dir: Path | None = None
        self.seconds = 0.0  # the export's wall time

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.fast_dev_run:  # a smoke run checkpoints nothing: nothing to ship
            return
        start = time.perf_counter()
        root = Path(trainer.default_root_dir)
        out = origin(self.dirpath, "ExportBest's dirpath") if self.dirpath else root / "export"
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best and trainer.checkpoint_callback:  # nothing was chosen: the model may be untrained
            raise ConfigError("the fit chose no checkpoint (no validation epoch ended: e.g. --trainer.max_epochs 0,"
                              " --trainer.limit_val_batches 0, --trainer.max_steps below one epoch), so there is no"
                              " trained model to export; fit at least one epoch with validation")
        module = load_stage2(best) if best else pl_module
        self.export_dir = export_model(module.model, module.spec, module.hparams.backbone, out, best or None)
        log_export_artifact(trainer, self.export_dir)
        self.seconds = time.perf_counter() - start
