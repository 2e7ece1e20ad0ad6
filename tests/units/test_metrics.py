"""Metrics agree with an independent AUC, are computed per epoch, and CTRModule runs end to end."""

import dataclasses
from functools import partial

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import synthetic_batch
from pytorch_lightning.callbacks import ModelCheckpoint
from scipy.stats import rankdata
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAUROC

from finetune.module import CTRModule
from tabular2text.datamodule import TensorDictDataset, keep_batch
from towers import DIN, DeepFM
from towers.checkpoints import NonFiniteLossError


def rank_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos n_neg); tied scores share their average rank (count one half)."""
    ranks = rankdata(scores)  # average ranks for ties
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    return (ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def test_binary_auroc_matches_rank_auc_with_ties():
    scores = np.array([0.1, 0.4, 0.4, 0.35, 0.8, 0.8, 0.8, 0.2, 0.5, 0.5, 0.9, 0.1, 0.4, 0.65])
    labels = np.array([0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0])
    expected = rank_auc(scores, labels)
    # ties matter here: breaking them in favour of the positives would give another value
    assert abs(expected - rank_auc(scores + labels * 1e-9, labels)) > 1e-3
    got = BinaryAUROC()(torch.tensor(scores, dtype=torch.float64), torch.tensor(labels)).item()
    assert got == pytest.approx(expected, abs=1e-6)


def trainer(**overrides) -> pl.Trainer:
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False}
    return pl.Trainer(**{**options, **overrides})


def loader(spec, sizes, seed=0) -> DataLoader:
    """Ready-made batches following the batch contract (batch_size=None: no re-collation)."""
    batches = [synthetic_batch(spec, size, seed + i) for i, size in enumerate(sizes)]
    return DataLoader(batches, batch_size=None)


TINY_DEEPFM = partial(DeepFM, embed_dim=8, mlp_dims=(16,))


@pytest.mark.parametrize("backbone", [TINY_DEEPFM, partial(DIN, embed_dim=8)], ids=["deepfm", "din"])
def test_ctr_module_fast_dev_run(spec, backbone):
    torch.manual_seed(0)
    module = CTRModule(spec.to_dict(), backbone)
    before = [p.detach().clone() for p in module.parameters()]
    data = loader(spec, [32, 32])
    fit = trainer(fast_dev_run=True)
    fit.fit(module, train_dataloaders=data, val_dataloaders=data)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))

    (results,) = fit.test(module, data, verbose=False)
    assert set(results) == {"test/auc", "test/logloss", "test/rows", "test/positives"}
    assert 0 <= results["test/auc"] <= 1 and results["test/logloss"] > 0

    probabilities = torch.cat([p["probability"] for p in fit.predict(module, data)])
    assert probabilities.shape == (32,)  # fast_dev_run: one batch
    assert torch.all((probabilities > 0) & (probabilities < 1))


def test_validation_metrics_are_epoch_level(spec):
    """AUC and logloss over all rows of the epoch, not means of per-batch values (batch sizes differ)."""
    torch.manual_seed(0)
    module = CTRModule(spec.to_dict(), TINY_DEEPFM)
    data = loader(spec, [40, 6, 10], seed=3)
    (results,) = trainer().validate(module, data, verbose=False)

    module.eval()
    with torch.no_grad():
        logits = [module(batch) for batch in data]
    labels = [batch["label"] for batch in data]
    scores, targets = torch.cat(logits).numpy(), torch.cat(labels).numpy()
    epoch_auc = rank_auc(scores, targets)
    epoch_logloss = F.binary_cross_entropy_with_logits(torch.cat(logits), torch.cat(labels)).item()
    assert results["val/auc"] == pytest.approx(epoch_auc, abs=1e-6)
    assert results["val/logloss"] == pytest.approx(epoch_logloss, abs=1e-6)
    assert (results["val/rows"], results["val/positives"]) == (56, targets.sum())

    batch_mean_auc = np.mean([rank_auc(s.numpy(), y.numpy()) for s, y in zip(logits, labels, strict=True)])
    assert abs(batch_mean_auc - epoch_auc) > 1e-3  # the data tells the two apart


def test_the_cold_start_slice_is_test_rows_with_an_unseen_user_or_item_and_reports_its_size(spec):
    """test_cold: the rows whose user or item id is out of vocabulary; its AUC, rows and clicks are theirs."""
    spec = dataclasses.replace(spec, user_field="user_id", item_field="item_id")
    torch.manual_seed(0)
    module = CTRModule(spec.to_dict(), TINY_DEEPFM)
    data = [synthetic_batch(spec, size, seed) for seed, size in enumerate([40, 24])]
    for batch in data:
        batch[spec.user_field][::3] = 1  # OOV
        batch[spec.item_field][1::5] = 1
    (results,) = trainer().test(module, DataLoader(data, batch_size=None), verbose=False)

    module.eval()
    with torch.no_grad():
        scores = torch.cat([module(batch) for batch in data]).numpy()
    labels = torch.cat([batch["label"] for batch in data]).numpy()
    cold = torch.cat([(b[spec.user_field] == 1) | (b[spec.item_field] == 1) for b in data]).numpy()
    assert results["test_cold/rows"] == cold.sum() and results["test_cold/positives"] == labels[cold].sum()
    assert results["test_cold/auc"] == pytest.approx(rank_auc(scores[cold], labels[cold]), abs=1e-6)
    assert (results["test/rows"], results["test/positives"]) == (64, labels.sum())


def test_non_finite_loss_stops_training_without_a_checkpoint(spec, tmp_path):
    rows = synthetic_batch(spec, 64)
    rows["age"][5] = float("nan")  # one broken numeric value poisons the batch's loss
    loader = DataLoader(TensorDictDataset(rows), batch_size=64, collate_fn=keep_batch)
    trainer = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                         callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    with pytest.raises(NonFiniteLossError, match="loss became nan at epoch 0, step 0.*Lower the learning rate"):
        trainer.fit(CTRModule(spec.to_dict(), TINY_DEEPFM), train_dataloaders=loader)
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_an_epoch_of_one_class_has_an_undefined_auc_not_zero():
    from finetune.module import DefinedAUROC

    auc = DefinedAUROC()
    auc.update(torch.tensor([0.2, 0.9, 0.4]), torch.tensor([1, 1, 1]))
    assert torch.isnan(auc.compute())
    auc.reset()
    with pytest.warns(UserWarning, match="before the ``update`` method"):  # torchmetrics' own notice
        assert torch.isnan(auc.compute())  # no rows at all
    scores, labels = torch.tensor([0.2, 0.9, 0.4, 0.3]), torch.tensor([0, 1, 1, 0])
    auc.update(scores, labels)
    assert auc.compute().item() == pytest.approx(rank_auc(scores.numpy(), labels.numpy()))
