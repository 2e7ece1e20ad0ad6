"""The `ctrl` command.

    ctrl prepare --data_dir DIR          prepare a data set; print split sizes, positive rates and texts
    ctrl run --align A.yaml --finetune F.yaml   the main job: stage 1 -> stage 2 -> test -> export
    ctrl fit|validate|test|predict ...   Lightning CLI; the model's class_path picks the stage

W&B runs offline unless WANDB_API_KEY is set (no prompt, no network).

Data errors print one clear line and exit with status 2; nothing is half-written.
"""

from __future__ import annotations

import os
import sys

import yaml
from jsonargparse import CLI
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

from ctrl.data.datamodule import CTRDataModule
from ctrl.data.sources import DataError
from ctrl.guards import CheckpointError, NonFiniteLossError
from ctrl.pipeline import finish_wandb, run
from tabular2text.schema import FeatureSpec


def prepare(*, data_dir: str, download: bool = False, history_length: int = 10, template: str = "natural",
            cache_dir: str | None = None, show: int = 3) -> None:
    """Prepare a data set once (cached by fingerprint) and summarise it.

    Args:
        data_dir: MovieLens-100K / -1M or RecBole directory, or a schema YAML for generic data.
        download: fetch MovieLens-100K into data_dir when it is absent.
        history_length: number of most recent items in the behavior sequence.
        template: text template preset: natural, dash, colon, masked or values.
        cache_dir: where prepared data lives (default $CTRL_CACHE_DIR or ~/.cache/ctrl-rec).
        show: how many rendered texts of the train split to print.
    """
    dm = CTRDataModule(data_dir, download=download, history_length=history_length, template=template,
                       cache_dir=cache_dir)
    print(f"prepared: {dm.prepared_dir}")
    print(f"{'split':<6} {'rows':>8} {'positive rate':>14}")
    for split in ("train", "val", "test"):
        labels = dm.frame(split)["label"]
        print(f"{split:<6} {len(labels):>8} {labels.mean():>14.4f}")
    for text in dm.frame("train")["text"].head(show):
        print(f"\n{text}")


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


def lightning_cli(args: list[str] | None, run: bool = True) -> CTRLCLI:
    """The Lightning CLI of both stages (the model's class_path picks the stage)."""
    return CTRLCLI(datamodule_class=CTRDataModule, subclass_mode_model=True, args=args, run=run,
                   save_config_callback=LoggerSaveConfigCallback, save_config_kwargs={"overwrite": True})


COMMANDS = {"prepare": prepare, "run": run}


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    try:
        if argv and argv[0] in COMMANDS:
            CLI(COMMANDS, args=argv)
        else:
            lightning_cli(args)
    except (DataError, FileNotFoundError, CheckpointError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        finish_wandb()


if __name__ == "__main__":
    main()
