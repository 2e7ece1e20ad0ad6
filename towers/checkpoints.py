"""Checks shared by both training stages (ctrl.align and finetune), below both of them and Lightning-free:
the checkpoint stamp and its checks, the finite-loss guard, the errors the `ctrl` command prints as one line, and
which hyper-parameters a stage hands its loggers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from tabular2text.schema import FeatureSpec

STAGE_NAMES = {1: "stage-1 (alignment)", 2: "stage-2 (fine-tuned)"}


class CheckpointError(ValueError):
    """A checkpoint that cannot serve the requested purpose; the message says why and what to pass."""


class ExportError(CheckpointError):
    """An export folder that cannot be loaded (damaged, modified or incomplete); the message says which file."""


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and what to pass instead."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; continuing would only write a broken checkpoint."""


class SpecLeftOutOfLoggers:
    """Mixed in before `pl.LightningModule` by both stages: what Lightning sends the loggers (W&B's run config) is
    every hyper-parameter but the feature spec, whose vocabularies grow with the catalog (1.4 MB of each Amazon
    Beauty run's config, and wandb's size warnings on the console). The checkpoint keeps the whole spec."""

    @property
    def hparams_initial(self):
        initial = super().hparams_initial  # Lightning's AttributeDict
        return type(initial)({k: v for k, v in initial.items() if k != "feature_spec"})


def require_finite(loss: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
    """Return `loss`, or stop training with a message that says where it broke and what to try."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"the training loss became {loss.item()} at epoch {epoch}, step {step}; training stopped before"
            " saving it. Lower the learning rate (model.init_args.lr), raise the temperature, or check the"
            " input data for extreme numeric values")
    return loss


def read_checkpoint(path: Path, option: str) -> dict:
    """A checkpoint file read on the CPU without unpickling code; `option` names the setting that gave it."""
    if not path.is_file():
        raise FileNotFoundError(f"{option}: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{option} {path} is not a readable checkpoint ({e}); it may be truncated: pass"
                              " another one (e.g. the previous last.ckpt or best.ckpt)") from e
    saved = checkpoint.get("state_sha256") if isinstance(checkpoint, dict) else None
    if saved is not None and state_sha256(checkpoint.get("state_dict", {})) != saved:
        raise CheckpointError(f"{option} {path}: its weights do not match the checksum saved with them (the file was"
                              " damaged or modified); pass another checkpoint or train again")
    return checkpoint


def state_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and bytes of a state dict's tensors: the zip inside a .ckpt checks no data, so a
    flipped byte would otherwise load as a slightly different model."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        h.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            h.update(str(tensor.dtype).encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stamp_checkpoint(checkpoint: dict, stage: int) -> None:
    """What each stage's module adds to every checkpoint it saves: its stage (read by checkpoint_stage) and the
    checksum of its weights (verified by read_checkpoint)."""
    checkpoint["stage"] = stage
    checkpoint["state_sha256"] = state_sha256(checkpoint["state_dict"])


def checkpoint_stage(checkpoint: dict) -> int | None:
    """The stage that wrote a Lightning checkpoint (its top-level `stage`, set by each stage's module: 1
    alignment, 2 fine-tuning), or None when it is not a ctrl-rec checkpoint. Not a hyper-parameter: the
    Lightning CLI passes those back to the constructor when it reloads a checkpoint."""
    stage = checkpoint.get("stage") if isinstance(checkpoint, dict) else None
    return stage if stage in STAGE_NAMES else None


def spec_mismatch(expected: FeatureSpec, found: dict) -> str | None:
    """Describe the first field whose kind or vocabulary differs between two specs, or None."""
    theirs = {f["name"]: f for f in found.get("fields", [])}
    for f in expected.fields:
        other = theirs.get(f.name)
        if other is None:
            return f"field {f.name!r} is missing from the checkpoint's data"
        if (other["kind"], other["vocab_size"], other["max_len"]) != (f.kind, f.vocab_size, f.max_len):
            return (f"field {f.name!r}: checkpoint has {other['kind']} with vocabulary {other['vocab_size']}, the data"
                    f" has {f.kind} with vocabulary {f.vocab_size}")
    return None


def check_resumed_checkpoint(checkpoint: dict, stage: int, feature_spec: dict) -> None:
    """Refuse a `--ckpt_path` of the other stage or of other data, before Lightning loads its weights."""
    found = checkpoint_stage(checkpoint)
    if found != stage:
        hint = ("a stage-1 alignment checkpoint starts stage 2 through --model.init_args.init_from instead"
                if stage == 2 else "evaluate a fine-tuned checkpoint with a finetune_*.yaml config")
        raise CheckpointError(f"--ckpt_path is not a {STAGE_NAMES[stage]} checkpoint; {hint}")
    saved = checkpoint.get("hyper_parameters", {}).get("feature_spec")
    problem = spec_mismatch(FeatureSpec.from_dict(feature_spec), saved) if isinstance(saved, dict) else None
    if problem:
        raise CheckpointError(f"--ckpt_path was trained on other data: {problem}; pass --data.data_dir (and"
                              " history_length) of the data it was trained on, or train on this data")
