"""The Lightning CLI of both stages (`ctrl fit/validate/test/predict`); the model's class_path picks the stage."""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from pytorch_lightning import Callback
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger

from ctrl.app.paths import resolve_config_args, resolve_config_path
from ctrl.app.renamed import refuse_renamed_checkpoint, refuse_renamed_in_args
from tabular2text.atomic import process_alive
from tabular2text.datamodule import CTRDataModule
from tabular2text.oserrors import origin
from tabular2text.schema import FeatureSpec
from towers import backbone_name
from towers.checkpoints import STAGE_NAMES, CheckpointError, ConfigError, checkpoint_stage, read_checkpoint

# Lightning calls a mid-epoch resume unreliable unless the DataLoader itself is stateful; here the data module
# restores its position within the epoch (CTRDataModule.state_dict) and RandomState the random states.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")


class RandomState(Callback):
    """Keeps the torch, numpy, Python (and CUDA) random states in every checkpoint and restores them on resume:
    with the data module's position, a fit resumed mid-epoch (`--ckpt_path last`) replays the uninterrupted
    run, down to the dropout masks."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
        if torch.cuda.is_available():  # dropout on a GPU draws from its own generator
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class WandbRunId(Callback):
    """Records the W&B run id in every checkpoint; `ctrl fit --ckpt_path` of it continues that run."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        ids = [logger.version for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if ids:
            checkpoint["wandb_run_id"] = ids[0]


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Besides config.yaml in the log directory, send the full resolved config to the run's loggers (W&B)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.loggers:
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in trainer.loggers:
                logger.log_hyperparams({"config": config})


def refuse_a_used_checkpoint_folder(folder: Path) -> None:
    """One fit, one folder: a second fit into a folder that holds checkpoints would write best-v1.ckpt beside
    the first fit's best.ckpt, and `--ckpt_path .../best.ckpt` would then load the first fit's model."""
    used = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
    if used:
        raise ConfigError(f"{folder} already holds the checkpoints of an earlier fit ({', '.join(used[:3])}); pass"
                          " another --trainer.default_root_dir (ctrl run: --out), remove that folder, or resume"
                          " the earlier fit with --ckpt_path last")


def lock_run_folder(folder: Path) -> None:
    """Two fits writing into one folder at once would interleave their files: a fit holds `.fit.lock` (its
    process id) until it exits; a lock whose process no longer runs is taken over."""
    if int(os.environ.get("LOCAL_RANK", 0)) or int(os.environ.get("NODE_RANK", 0)):
        return  # DDP's other ranks belong to rank 0's run
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".fit.lock"
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        holder = lock.read_text().strip()
        if holder.isdigit() and int(holder) != os.getpid() and process_alive(int(holder)):
            raise ConfigError(f"{folder} is in use by another fit (process {holder}); pass another"
                              " --trainer.default_root_dir (ctrl run: --out) or wait for it to end") from None
    lock.write_text(str(os.getpid()))
    atexit.register(lock.unlink, missing_ok=True)


STAGES = {"AlignmentModule": "align", "CTRModule": "finetune"}  # a stage's name, by its LightningModule's class


def name_the_run(config) -> Path:
    """What a run is called and where it writes follow from what it trains, derived here, in one place; no
    shipped config sets them. Unless given: its folder (`trainer.default_root_dir`) is runs/DATASET/STAGE_BACKBONE
    and a W&B logger's run name DATASET-STAGE-BACKBONE; DATASET is the data directory's name (a schema file's
    folder's), STAGE align or finetune, BACKBONE the backbone's `towers.BACKBONES` name. So `ctrl fit` of another
    backbone or data set never lands in the same folder. Then every logger whose save_dir is not set (or is the
    logger's default ".") writes under that folder, so W&B files and config.yaml (written to the first logger's
    save_dir) of two runs in one working directory never meet. Returns the run's folder."""
    model, data, trainer = config.get("model"), config.get("data"), config.get("trainer")
    backbone = model.get("init_args", {}).get("backbone") if model else None
    if data and data.get("data_dir") and getattr(backbone, "class_path", None):
        data_dir = Path(data.data_dir)
        dataset = data_dir.parent.name if data_dir.suffix in (".yaml", ".yml") else data_dir.name
        module = model.class_path.rpartition(".")[2]
        parts = (dataset or "data", STAGES.get(module, module.lower()), backbone_name(backbone.class_path))
        if not trainer.get("default_root_dir"):
            trainer.default_root_dir = str(Path("runs", parts[0], "_".join(parts[1:])))
        logger = trainer.get("logger")
        if str(getattr(logger, "class_path", "")).endswith("WandbLogger") and not logger.init_args.get("name"):
            logger.init_args.name = "-".join(parts)
    root = origin(trainer.default_root_dir or ".", "--trainer.default_root_dir")
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and init_args.get("save_dir") in (None, "", ".", "./"):
            init_args.save_dir = str(root)
    return root


def refuse_training_nothing(trainer) -> None:
    """A fit of zero epochs or steps trains nothing, and its untrained model would be exported as if trained."""
    for option in ("max_epochs", "max_steps"):
        if trainer.get(option) == 0:
            raise ConfigError(f"--trainer.{option} 0 trains nothing, and nothing untrained is checkpointed or"
                              f" exported; pass --trainer.{option} 1 or more (to evaluate a checkpoint: ctrl test"
                              " --ckpt_path)")


class CTRLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The model gets vocabularies and field kinds from the prepared data, never from repeated YAML.
        # Linked as a plain dict: jsonargparse cannot link into dataclass-typed parameters, and a dict is
        # saved with the checkpoint's hyper-parameters, so a checkpoint knows the data it was trained on.
        parser.link_arguments("data.feature_spec", "model.init_args.feature_spec", compute_fn=FeatureSpec.to_dict,
                              apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        # Not super(): it warns whenever `args` is given while sys.argv holds arguments, and ctrl always gives them
        # (`lightning_cli` passes sys.argv's own; `ctrl run` and `ctrl bench` build each stage's).
        self.config = parser.parse_args(args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        if config.get("data") and config.data.get("data_dir"):  # the README's examples name configs/generic/...
            config.data.data_dir = resolve_config_path(config.data.data_dir)
        ckpt_path = config.get("ckpt_path") if config else None
        # run=False (ctrl run) parses without a subcommand: `config` is then the whole config
        if config is not None and "trainer" in config:
            root = name_the_run(config)
        if subcommand == "fit":
            refuse_training_nothing(config.trainer)
            lock_run_folder(root)
            if not ckpt_path:
                refuse_a_used_checkpoint_folder(root / "checkpoints")
        if ckpt_path in ("best", "hpc", "registry"):
            return  # Lightning's own names
        if ckpt_path == "last":  # Lightning starts afresh when a fit was killed before its first checkpoint
            ckpt_path = Path(config.trainer.default_root_dir or ".") / "checkpoints" / "last.ckpt"
            if not ckpt_path.is_file():
                return
        if not ckpt_path:
            return
        if not Path(ckpt_path).is_file():
            raise CheckpointError(f"--ckpt_path: no checkpoint at {ckpt_path}; pass a .ckpt file of `ctrl fit`"
                                  " (e.g. <default_root_dir>/checkpoints/best.ckpt) or `last`")
        ckpt = read_checkpoint(Path(ckpt_path), "--ckpt_path")
        if not isinstance(ckpt, dict):
            return  # the stage's own guard names what is wrong with it
        # LightningCLI rebuilds the module a --ckpt_path names, whatever the config says: `ctrl test` with a
        # finetune config and an alignment checkpoint would quietly run stage-1 validation. Refuse instead.
        saved = ckpt.get("hyper_parameters", {}).get("_class_path")
        refuse_renamed_checkpoint(saved, ckpt_path)
        wanted = config.get("model", {}).get("class_path")
        if saved and wanted and saved != wanted:
            stage = STAGE_NAMES.get(checkpoint_stage(ckpt), "other")
            raise CheckpointError(f"--ckpt_path {ckpt_path} is a {stage} checkpoint of {saved}, but the config"
                                  f" builds {wanted}; pass a checkpoint written with this config")
        # A resumed fit continues the checkpoint's W&B run rather than starting a new one.
        logger, run_id = config.trainer.get("logger"), ckpt.get("wandb_run_id")
        if (subcommand == "fit" and run_id and getattr(logger, "class_path", "").endswith("WandbLogger")
                and not logger.init_args.get("id")):
            logger.init_args.id = run_id

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # Checkpoints go to <default_root_dir>/checkpoints, not into a folder per logger run: W&B names that
        # folder by a run id that is new on every start, which would hide last.ckpt from `--ckpt_path last`.
        for callback in self.trainer.checkpoint_callbacks:
            if callback.dirpath is None:
                callback.dirpath = os.path.realpath(os.path.join(self.trainer.default_root_dir, "checkpoints"))
        if self.subcommand == "fit" and self.trainer.checkpoint_callbacks and self.trainer.is_global_zero:
            print(f"checkpoints: {self.trainer.checkpoint_callbacks[0].dirpath}", file=sys.stderr)
        # Before the checkpoint callbacks, which Lightning keeps last.
        self.trainer.callbacks[:0] = [RandomState(), WandbRunId()]
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                quiet_wandb_init(logger)


def quiet_wandb_init(logger: WandbLogger) -> None:
    """What WandbLogger hands wandb.init, without two causes of a warning on every run: `anonymous` (always
    passed, None unless asked for; wandb >= 0.19 warns that the setting has no effect whenever it is passed) and a
    run folder that does not exist yet (wandb looks for the git repository from there before creating it, and warns
    "git root ... does not exist" instead of recording the commit)."""
    init = getattr(logger, "_wandb_init", None)  # WandbLogger keeps wandb.init's arguments there until it starts
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    if logger.save_dir:
        Path(logger.save_dir).mkdir(parents=True, exist_ok=True)


def lightning_cli(args: list[str] | None, run: bool = True) -> CTRLCLI:
    """The Lightning CLI of both stages (the model's class_path picks the stage); `args` default to sys.argv's.
    Config files under `configs/` are read from the copy shipped with the package when absent here."""
    args = resolve_config_args(sys.argv[1:] if args is None else args)
    refuse_renamed_in_args(args)
    return CTRLCLI(datamodule_class=CTRDataModule, subclass_mode_model=True, args=args, run=run,
                   save_config_callback=LoggerSaveConfigCallback, save_config_kwargs={"overwrite": True})


def merged_config(args: list[str]) -> dict:
    """The config `ctrl fit ARGS` trains with, as `--print_config` shows it: every class's init_args filled in,
    nothing built or run."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            lightning_cli(["fit", *args, "--print_config"])
        except SystemExit as e:
            if e.code:
                raise ConfigError(f"these configs and options do not parse: {' '.join(args)}") from None
    return yaml.safe_load(printed.getvalue())
