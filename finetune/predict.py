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
        # predictions: one dict per batch, as CTRModule.predict_step returns them
        columns = {}
        for key in predictions[0] if predictions else ("row", "probability"):
            values = torch.cat([p[key] for p in predictions]) if predictions else torch.zeros(0)
            columns[key] = (values.float() if values.is_floating_point() else values).numpy()
        path = Path(trainer.default_root_dir) / self.output_path
        with atomic_path(path) as tmp:
            pd.DataFrame(columns).to_parquet(tmp, index=False)
        print(f"wrote {len(columns['row'])} predictions to {path}")
