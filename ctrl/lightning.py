"""The Lightning CLI of both stages (`ctrl fit/validate/test/predict`); the model's class_path picks the stage."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

from finetune.guards import STAGE_NAMES, CheckpointError, checkpoint_stage, read_checkpoint
from tabular2text.datamodule import CTRDataModule
from tabular2text.schema import FeatureSpec


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Besides config.yaml in the log directory, send the full resolved config to the run's loggers (W&B)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.loggers:
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in trainer.loggers:
                logger.log_hyperparams({"config": config})


class CTRLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The model gets vocabularies and field kinds from the prepared data, never from repeated YAML.
        # Linked as a plain dict: jsonargparse cannot link into dataclass-typed parameters, and a dict is
        # saved with the checkpoint's hyper-parameters, so a checkpoint knows the data it was trained on.
        parser.link_arguments("data.feature_spec", "model.init_args.feature_spec", compute_fn=FeatureSpec.to_dict,
                              apply_on="instantiate")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # Checkpoints go to <default_root_dir>/checkpoints, not into a folder per logger run: W&B names that
        # folder by a run id that is new on every start, which would hide last.ckpt from `--ckpt_path last`.
        for callback in self.trainer.checkpoint_callbacks:
            if callback.dirpath is None:
                callback.dirpath = os.path.realpath(os.path.join(self.trainer.default_root_dir, "checkpoints"))

    def _parse_ckpt_path(self) -> None:
        # LightningCLI rebuilds the module a --ckpt_path names, whatever the config says: `ctrl test` with a
        # finetune config and an alignment checkpoint would quietly run stage-1 validation. Refuse instead.
        config = self.config.get(self.config.get("subcommand") or "", {})
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            ckpt = read_checkpoint(Path(ckpt_path), "--ckpt_path")
            saved = ckpt.get("hyper_parameters", {}).get("_class_path") if isinstance(ckpt, dict) else None
            wanted = config.get("model", {}).get("class_path")
            if saved and wanted and saved != wanted:
                stage = STAGE_NAMES.get(checkpoint_stage(ckpt), "other")
                raise CheckpointError(f"--ckpt_path {ckpt_path} is a {stage} checkpoint of {saved}, but the config"
                                      f" builds {wanted}; pass a checkpoint written with this config")
        super()._parse_ckpt_path()


def lightning_cli(args: list[str] | None, run: bool = True) -> CTRLCLI:
    """The Lightning CLI of both stages (the model's class_path picks the stage)."""
    return CTRLCLI(datamodule_class=CTRDataModule, subclass_mode_model=True, args=args, run=run,
                   save_config_callback=LoggerSaveConfigCallback, save_config_kwargs={"overwrite": True})
