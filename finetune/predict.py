"""`ctrl predict` output: click probabilities written to parquet."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from tabular2text.atomic import atomic_path


class ParquetPredictionWriter(BasePredictionWriter):
    """Writes one parquet file with `row` (index in the predicted split) and `probability` per row
    (and `label` when the split has labels), replacing the file only once it is complete.

    Args:
        output_path: the parquet file to write; relative paths are under the trainer's root directory.
    """

    def __init__(self, output_path: str = "predictions.parquet") -> None:
        super().__init__(write_interval="epoch")
        self.output_path = output_path

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        dataloader = trainer.predict_dataloaders
        tensors = dataloader.dataset.tensors
        columns = {"row": tensors["row"].numpy(), "probability": torch.cat(predictions).float().numpy()}
        if "label" in tensors:
            columns["label"] = tensors["label"].numpy()
        path = Path(trainer.default_root_dir) / self.output_path
        with atomic_path(path) as tmp:
            pd.DataFrame(columns).to_parquet(tmp, index=False)
        print(f"wrote {len(columns['row'])} predictions to {path}")
