"""Train every registered backbone from scratch on MovieLens-100K; print and save a markdown table.

    python -m benchmarks backbones [--data_dir ../shared/data/ml-100k] [--max_epochs 20]

Each backbone: paper defaults (embed 32, MLP 256-128-64, BatchNorm, dropout), Adam lr 1e-3, batch 2048,
seed 0, early stopping on val/auc (patience 2); the best checkpoint (by val/auc) is tested. The split is
the data module's 8:1:1 by time. Seconds per epoch include the validation pass.
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, Timer

from benchmarks.common import command
from finetune.module import CTRModule
from tabular2text.datamodule import CTRDataModule
from towers import BACKBONES

SEED = 0


def run(name: str, datamodule: CTRDataModule, max_epochs: int, checkpoint_dir: str) -> dict[str, float]:
    pl.seed_everything(SEED, verbose=False)
    module = CTRModule(datamodule.feature_spec.to_dict(), BACKBONES[name])
    checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, filename=name, monitor="val/auc", mode="max")
    timer = Timer()
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=[EarlyStopping(monitor="val/auc", mode="max", patience=2), checkpoint, timer],
        logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )
    trainer.fit(module, datamodule=datamodule)
    (result,) = trainer.test(module, datamodule=datamodule, ckpt_path="best", verbose=False)
    best_epoch = torch.load(checkpoint.best_model_path, weights_only=False)["epoch"] + 1
    return {
        "auc": result["test/auc"],
        "logloss": result["test/logloss"],
        "val_auc": checkpoint.best_model_score.item(),
        "epochs": trainer.current_epoch,
        "best_epoch": best_epoch,
        "seconds_per_epoch": timer.time_elapsed("train") / trainer.current_epoch,
        "parameters": sum(p.numel() for p in module.model.parameters()),
    }


def markdown(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "| backbone | test AUC | test logloss | best val AUC | epochs (best) | s / epoch | parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['auc']:.4f} | {r['logloss']:.4f} | {r['val_auc']:.4f}"
            f" | {r['epochs']} ({r['best_epoch']}) | {r['seconds_per_epoch']:.1f} | {r['parameters']:,} |"
        )
    return "\n".join(lines)


def main(data_dir: str = "../shared/data/ml-100k", max_epochs: int = 20,
         out: str = str(Path(__file__).with_suffix(".md"))) -> None:
    """Train every registered backbone from scratch and write the markdown table.

    Args:
        data_dir: the MovieLens-100K folder.
        max_epochs: epochs at most (early stopping on val/auc, patience 2).
        out: the markdown file to write.
    """
    args = SimpleNamespace(data_dir=data_dir, max_epochs=max_epochs, out=Path(out))

    datamodule = CTRDataModule(data_dir=args.data_dir, batch_size=2048)
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        results = {name: run(name, datamodule, args.max_epochs, checkpoint_dir) for name in BACKBONES}

    table = markdown(results)
    print(table)
    header = (
        f"# Backbones on MovieLens-100K, trained from scratch (seed {SEED})\n\n"
        f"Produced by `{command()}` (torch {torch.__version__}, Lightning"
        f" {pl.__version__}, {platform.machine()} CPU, {torch.get_num_threads()} threads)."
        f" Data: `{datamodule.prepared_dir.name}`, 8:1:1 split by time. Test AUC and logloss of the"
        " best-val-AUC checkpoint; epochs = epochs"
        " trained before early stopping (best epoch in brackets). Seconds per epoch (train + validation) are"
        " wall time on a machine shared with other jobs: compare them loosely.\n\n"
    )
    args.out.write_text(header + table + "\n")

