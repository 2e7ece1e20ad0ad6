"""The `ctrl` command.

    ctrl prepare --data_dir DIR          prepare a data set; print split sizes, positive rates and texts
    ctrl run --align A.yaml --finetune F.yaml   the main job: stage 1 -> stage 2 -> test -> export
    ctrl bench --config configs/bench/ml100k.yaml   base vs CTRL over backbones and seeds -> RESULTS.md
    ctrl fit --config C.yaml             train one stage (Lightning CLI; the model's class_path picks it)
    ctrl validate --config C.yaml --ckpt_path P   validation metrics of a checkpoint
    ctrl test --config C.yaml --ckpt_path P       test metrics of a checkpoint (all rows and cold start)
    ctrl predict --config C.yaml --ckpt_path P    test-split probabilities -> predictions.parquet
    ctrl COMMAND --help                  every option of one command

W&B runs offline unless WANDB_API_KEY is set (no prompt, no network).

Data errors print one clear line and exit with status 2; nothing is half-written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import yaml
from jsonargparse import CLI
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

from ctrl.bench import bench
from ctrl.data.datamodule import CTRDataModule
from ctrl.data.sources import DataError
from ctrl.guards import STAGE_NAMES, CheckpointError, ConfigError, NonFiniteLossError, checkpoint_stage
from ctrl.pipeline import finish_wandb, run
from tabular2text.schema import FeatureSpec


def prepare(*, data_dir: str, download: bool = False, history_length: int = 10,
            template: str | dict[str, str] = "natural", cache_dir: str | None = None, show: int = 3) -> None:
    """Prepare a data set once (cached by fingerprint) and summarise it.

    Args:
        data_dir: MovieLens-100K / -1M or RecBole directory, or a schema YAML for generic data.
        download: fetch MovieLens-100K into data_dir when it is absent.
        history_length: number of most recent items in the behavior sequence.
        template: text template preset (natural, dash, colon, masked or values) or a mapping of
            template names to format strings that replace those of natural.
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
    for user, item in zip(*(texts[:show] for texts in dm.texts("train")), strict=True):
        print(f"\n{user} {item}")


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
            try:
                ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
            except Exception as e:
                raise CheckpointError(f"--ckpt_path {ckpt_path} is not a readable checkpoint ({e}); it may be"
                                      " truncated: pass another one (e.g. the previous last.ckpt or best.ckpt)") from e
            saved = ckpt.get("hyper_parameters", {}).get("_class_path") if isinstance(ckpt, dict) else None
            wanted = config.get("model", {}).get("class_path")
            if saved and wanted and saved != wanted:
                stage = STAGE_NAMES.get(checkpoint_stage(ckpt.get("state_dict", {})), "other")
                raise CheckpointError(f"--ckpt_path {ckpt_path} is a {stage} checkpoint of {saved}, but the config"
                                      f" builds {wanted}; pass a checkpoint written with this config")
        super()._parse_ckpt_path()


def lightning_cli(args: list[str] | None, run: bool = True) -> CTRLCLI:
    """The Lightning CLI of both stages (the model's class_path picks the stage)."""
    return CTRLCLI(datamodule_class=CTRDataModule, subclass_mode_model=True, args=args, run=run,
                   save_config_callback=LoggerSaveConfigCallback, save_config_kwargs={"overwrite": True})


USER_ERRORS = (DataError, ConfigError, FileNotFoundError, CheckpointError, NonFiniteLossError)


def user_error(error: BaseException | None) -> BaseException | None:
    """The error a user can fix, if `error` is one or was caused by one (jsonargparse wraps errors raised while
    it instantiates a class in an error of its own)."""
    while error is not None and not isinstance(error, USER_ERRORS):
        error = error.__cause__
    return error


COMMANDS = {"prepare": prepare, "run": run, "bench": bench}


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    if argv in ([], ["-h"], ["--help"]):
        usage = "usage: ctrl COMMAND ...\n\n" + __doc__.split("\n\n")[1].replace("    ctrl", "ctrl").rstrip()
        print(usage, file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    try:
        if argv and argv[0] in COMMANDS:
            CLI(COMMANDS, args=argv)
        else:
            lightning_cli(args)
    except Exception as e:
        problem = user_error(e)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        finish_wandb()


if __name__ == "__main__":
    main()
