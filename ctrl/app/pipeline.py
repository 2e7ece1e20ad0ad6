"""The main job: stage 1 (alignment) -> stage 2 (fine-tuning) -> test -> export -> score the export.

Each stage is the same LightningCLI run that `ctrl fit --config ...` performs; this module only chains
them, passes the stage-1 checkpoint to stage 2 (`init_from`) and times the phases.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from jsonargparse.typing import PositiveInt
from pytorch_lightning.cli import LightningCLI

from ctrl.app.lightning_cli import lightning_cli, lock_run_folder, refuse_a_used_checkpoint_folder
from ctrl.app.paths import resolve_config_path
from finetune.export import load_scorer
from finetune.module import DefinedAUROC, ExportBest
from tabular2text.prepare import labelled_splits
from tabular2text.sources import read_table
from towers import named_backbone
from towers.checkpoints import ConfigError


@contextmanager
def timed(phases: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - start


def finish_wandb() -> None:
    """Close the open W&B run, so its files are complete and the next stage starts a run of its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def best_checkpoint(trainer) -> str:
    callback = trainer.checkpoint_callback
    path = callback.best_model_path or callback.last_model_path
    if not path:
        raise RuntimeError("the run saved no checkpoint; keep a ModelCheckpoint callback in the config")
    return path


@dataclass
class Stages:
    """The trained stages of one run: their LightningCLIs (each trainer knows its best checkpoint) and the
    wall time per phase so far."""

    align: LightningCLI | None
    finetune: LightningCLI
    phases: dict[str, float]


ALIGNED_OVERLAY = "finetune_aligned.yaml"
STAGE_BASES = "configs/stages"  # the stages' data-set-independent bases, shipped with the package


def stage_configs(config_dir: str | Path, stage: str, backbone: str, aligned: bool = False) -> list[str]:
    """The configs of one stage, in the order LightningCLI merges them (`--config` each):

    1. the stage's base, the same on every data set (`configs/stages/align.yaml` or `finetune.yaml`);
    2. the backbone by name, as a YAML string: its class_path and all of its own defaults (`towers.named_backbone`);
    3. the config directory's `DIR/STAGE.yaml`, when there is one: the data set's data and its values for every
       backbone;
    4. `DIR/STAGE/BACKBONE.yaml`, when there is one: that backbone's own tuned values (it states its class_path and
       all of its init_args);
    5. for a stage 2 that starts from stage 1 (`aligned`): `DIR/finetune_aligned.yaml`, what CTRL's stage 2 changes
       over the baseline's settings, then `DIR/finetune_aligned/BACKBONE.yaml`, the same for that backbone alone
       (what `ctrl bench --tune true` chose), each when there is one.

    A `configs/...` path absent here is the copy shipped with the package."""
    d = Path(resolve_config_path(str(config_dir)))
    if not d.is_dir():
        raise ConfigError(f"--config_dir {config_dir}: no such directory (it holds a data set's configs, e.g."
                          " configs/ml100k)")
    try:
        chosen = named_backbone(backbone)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    choice = yaml.safe_dump({"model": {"init_args": {"backbone": chosen}}}, default_flow_style=True, width=10**4)
    files = [d / f"{stage}.yaml", d / stage / f"{backbone}.yaml"]
    if stage == "finetune" and aligned:
        # the more specific last: the backbone's own aligned overlay overrides the one for all backbones
        files += [d / ALIGNED_OVERLAY, d / Path(ALIGNED_OVERLAY).stem / f"{backbone}.yaml"]
    base = resolve_config_path(f"{STAGE_BASES}/{stage}.yaml")
    return [base, choice.strip(), *(str(p) for p in files if p.is_file())]


def train(*, finetune: Sequence[str], align: Sequence[str] | None = None, out: Path, align_args: Sequence[str] = (),
          finetune_args: Sequence[str] = ()) -> Stages:
    """Stage 1 (when `align` is given), then stage 2 starting from stage 1's best checkpoint.

    Args:
        finetune: stage-2 config files, merged in order (`stage_configs(dir, "finetune", backbone, aligned)`).
        align: stage-1 config files; None trains stage 2 from scratch (the baseline).
        out: directory for checkpoints and W&B files, `out/align` and `out/finetune`.
        align_args: further LightningCLI arguments of stage 1, e.g. ["--seed_everything", "1"]; they come
            last, so they override the config and the output directories (e.g. ["--trainer.logger", "false"]).
        finetune_args: the same for stage 2.
    """

    phases: dict[str, float] = {}
    stage1, init = None, []
    if align:
        stage1 = fit_stage(align, out / "align", align_args, phases, STAGE1_PHASE)
        finish_wandb()
        init = ["--model.init_args.init_from", best_checkpoint(stage1.trainer)]
    stage2 = fit_stage(finetune, out / "finetune", [*init, *finetune_args], phases, STAGE2_PHASE)
    return Stages(stage1, stage2, phases)


STAGE1_PHASE = "stage 1 (incl. text encoding)"
STAGE2_PHASE = "stage 2"


def fit_stage(configs: Sequence[str], out: Path, args: Sequence[str], phases: dict[str, float],
              phase: str) -> LightningCLI:
    """Fit one stage's config files with checkpoints (out/checkpoints) and W&B files under `out`; `args` come
    last."""
    # as `ctrl fit` does: one fit, one folder, and no two fits in it at once
    lock_run_folder(out)
    refuse_a_used_checkpoint_folder(out / "checkpoints")
    with timed(phases, "prepare"):
        files = [arg for config in configs for arg in ("--config", config)]
        cli = lightning_cli([*files, "--trainer.default_root_dir", str(out), *args], run=False)
    with timed(phases, phase):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def run(*, backbone: str = "dcn", config_dir: str = "configs/ml100k", baseline: bool = False,
        data_dir: str | None = None, out: str = "runs/main", max_epochs_align: PositiveInt | None = None,
        max_epochs_finetune: PositiveInt | None = None) -> dict[str, float]:
    """Run CTRL end to end and print the exported model's test metrics.

    Args:
        backbone: the collaborative model, by name: wide_deep, deepfm, dcn, autoint, dcnv2, xdeepfm, fibinet, pnn,
            din (towers.BACKBONES; its class and own defaults, then what CONFIG_DIR tuned for it).
        config_dir: a data set's configs, each optional (`stage_configs`): align.yaml and finetune.yaml (its data
            and values for every backbone), finetune/BACKBONE.yaml (one backbone's tuned values),
            finetune_aligned.yaml (CTRL's stage 2 over the baseline's settings) and finetune_aligned/BACKBONE.yaml
            (the same for one backbone, e.g. as `ctrl bench --tune true` writes it).
        baseline: skip stage 1: the backbone trained from scratch.
        data_dir: overrides data.data_dir of both stages.
        out: directory for checkpoints, W&B files and the export.
        max_epochs_align: overrides trainer.max_epochs of stage 1.
        max_epochs_finetune: overrides trainer.max_epochs of stage 2.
    """
    finetune = stage_configs(config_dir, "finetune", backbone, aligned=not baseline)
    align = None if baseline else stage_configs(config_dir, "align", backbone)
    out_dir = Path(out)
    data = ["--data.data_dir", data_dir] if data_dir else []

    def epochs(max_epochs: int | None) -> list[str]:
        return ["--trainer.max_epochs", str(max_epochs)] if max_epochs else []

    stages = train(finetune=finetune, align=align, out=out_dir, align_args=[*data, *epochs(max_epochs_align)],
                   finetune_args=[*data, *epochs(max_epochs_finetune)])
    stage2, phases = stages.finetune, stages.phases
    with timed(phases, "test"):
        (metrics,) = stage2.trainer.test(stage2.model, datamodule=stage2.datamodule, ckpt_path="best")
    exporter = next((c for c in stage2.trainer.callbacks if isinstance(c, ExportBest)), None)
    if exporter:  # it exported at the end of stage 2's fit: its time is not stage 2's
        phases[STAGE2_PHASE] -= exporter.seconds
    else:  # a stage-2 config without the callback: the same export now
        exporter = ExportBest()
        exporter.on_fit_end(stage2.trainer, stage2.model)
    phases["export"] = exporter.seconds
    export_dir = exporter.export_dir
    with timed(phases, "score export"):
        # A fresh load of the export scores the raw test rows, as a serving system would: the rows of the split
        # the trainer tested, from the raw table read with the data module's options.
        data = stage2.datamodule.hparams
        test_rows = labelled_splits(read_table(Path(data.data_dir), data.history_length), data.val_fold,
                                    data.split)["test"]
        probs = torch.as_tensor(load_scorer(export_dir)(test_rows))
        labels = torch.tensor(test_rows["label"].to_numpy(), dtype=torch.float32)
        auc = DefinedAUROC()
        auc.update(probs, labels.long())
        exported = {"auc": float(auc.compute()),
                    "logloss": float(F.binary_cross_entropy(probs.double(), labels.double()))}

    print(f"\nexported model: {export_dir}")
    shown = "undefined (the test rows hold one class)" if math.isnan(exported["auc"]) else f"{exported['auc']:.4f}"
    print(f"test AUC {shown}  logloss {exported['logloss']:.4f}  (exported model, "
          f"{len(test_rows)} raw test rows)")
    readings = (f"{k} {v:,.0f}" if k.endswith(("/rows", "/positives")) else f"{k} {v:.4f}" for k, v in metrics.items())
    print(f"trainer test: {', '.join(readings)}")
    print("\nwall time per phase:")
    for name, seconds in phases.items():
        print(f"  {name:<32} {seconds:8.1f} s")
    return {"test/auc": exported["auc"], "test/logloss": exported["logloss"], **metrics}
