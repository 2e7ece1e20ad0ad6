"""Class paths that moved when stage 1 went to `ctrl/align/`, the application to `ctrl/app/` and the checkpoint
guards to `towers/checkpoints.py`. A config, a command line or a checkpoint that names an old path is refused
with one line naming the new one, instead of an import error deep in jsonargparse.

An old stage-1 checkpoint still starts stage 2 (`--model.init_args.init_from` reads its weights, not its class
path); only `--ckpt_path` of it, which makes Lightning rebuild the module from the saved class path, is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import yaml

from ctrl.app.paths import CONFIG_OPTIONS
from towers.checkpoints import CheckpointError, ConfigError

RENAMED_MODULES = {
    "ctrl.module": "ctrl.align.module",
    "ctrl.heads": "ctrl.align.heads",
    "ctrl.losses": "ctrl.align.losses",
    "ctrl.probe": "ctrl.align.probe",
    "ctrl.cli": "ctrl.app.cli",
    "ctrl.lightning": "ctrl.app.lightning_cli",
    "ctrl.pipeline": "ctrl.app.pipeline",
    "ctrl.bench": "ctrl.app.bench",
    "ctrl.report": "ctrl.app.report",
    "finetune.guards": "towers.checkpoints",
}
MOVED_CLASSES = {"ctrl.probe.ValidateEvery": "ctrl.align.validate_every.ValidateEvery"}


def new_name(path: str) -> str | None:
    """The current name of a renamed class path (`ctrl.module.AlignmentModule` -> `ctrl.align.module.
    AlignmentModule`), or None when `path` was never renamed."""
    if path in MOVED_CLASSES:
        return MOVED_CLASSES[path]
    module, _, name = path.rpartition(".")
    return f"{RENAMED_MODULES[module]}.{name}" if module in RENAMED_MODULES else None


def strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from strings(item)


def refuse_renamed_in_args(args: list[str]) -> None:
    """Refuse a command line, or a config file it names (`--config`, `-c`), that names a renamed class path."""
    for i, arg in enumerate(args):
        option, _, value = arg.partition("=")
        if option in CONFIG_OPTIONS:  # the options resolve_config_args reads as config files (-c too)
            config = value or (args[i + 1] if i + 1 < len(args) else "")
            path = Path(config)
            if path.is_file():
                refuse_renamed(yaml.safe_load(path.read_text()), str(path))
        if "=" in arg:  # --trainer.callbacks+=ctrl.probe.TransferProbe
            refuse_renamed(value, option)
        refuse_renamed(arg, "the command line")


def refuse_renamed(config: object, where: str) -> None:
    for value in strings(config):
        new = new_name(value)
        if new:
            raise ConfigError(f"{where} names {value}, which is now {new}; write the new name")


def refuse_renamed_checkpoint(class_path: str | None, ckpt_path: str) -> None:
    """Refuse a `--ckpt_path` written by a class that has moved: Lightning would rebuild it from its old path."""
    new = new_name(class_path) if class_path else None
    if new:
        raise CheckpointError(f"--ckpt_path {ckpt_path} was written by {class_path}, which is now {new}, and Lightning"
                              " rebuilds a module from the class path its checkpoint saved: resume or evaluate it with"
                              " the ctrl-rec it was trained with; a stage-1 checkpoint still starts stage 2 through"
                              " --model.init_args.init_from")
