"""Inference cost on the MovieLens-100K test split: CTRL's exported model vs the plain backbone vs a language model.

    python -m benchmarks cost [--data_dir ../shared/data/ml-100k] [--ctrl_export '[runs/main/export,...]']

(a) The four paper backbones (wide_deep, deepfm, dcn, autoint, as configured in configs/ml100k/finetune.yaml
    + finetune/BACKBONE.yaml) are trained from scratch (stage 2 only, early stopping on val AUC, as
    `ctrl run --baseline true` does) and exported with `finetune.export.export_model`. Each `--ctrl_export`
    directory (written by `ctrl run --backbone ...`) joins them as "CTRL (backbone)". Every
    export is timed on the whole test split at batch 4096 on two paths:
      torch:  `load_model(dir)` under `torch.inference_mode`, rows already encoded to tensors;
      Scorer: `load_scorer(dir)` on the raw test rows (encoding of raw values to ids included).
    The models are timed in turn, `--repeats` times over, and the median is kept, so every model sees
    the same load on a shared machine and the ratio is the figure.
(b) A CTR-BERT-style semantic baseline: the frozen default language tower (all-MiniLM-L6-v2, mean pooling,
    max_length 128) embeds each row's text (the rendering CTRL uses: `CTRDataModule.texts(split)`), and an
    MLP head 384 -> 256 -> 64 -> 1 (ReLU, dropout 0.1) is trained on the train split with BCE and Adam
    (lr 1e-3, batch 2048, early stopping on val AUC, patience 2). The train/val/test vectors come from
    the text cache under the keys stage 1 uses (fp32). Its test AUC is over all test rows; its end-to-end
    rate (render the raw rows to text, tokenize, encode with MiniLM, head) is timed on a seeded sample of
    `--semantic_rows` test rows, in the same interleaved loop.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.functional.classification import binary_auroc

from ctrl.app.cli import wandb_mode
from ctrl.app.pipeline import finish_wandb, run
from ctrl.app.report import cpu_model
from finetune.export import Scorer, encode_rows, load_model
from tabular2text.datamodule import CTRDataModule, TensorDictDataset, keep_batch
from tabular2text.encode import frame_to_tensors
from tabular2text.prepare import default_cache_dir, labelled_splits, render_texts
from tabular2text.sources import read_table
from tabular2text.text_vectors import TextVectorCache
from towers.collaborative import CTRModel
from towers.encoder import FrozenEncoder
from towers.language import LanguageTower
from towers.mlp import MLP

SEED = 0
BACKBONES = ("wide_deep", "deepfm", "dcn", "autoint")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "ml100k"


class SemanticHead(pl.LightningModule):
    """MLP over frozen language-model vectors: B x H -> B logits, BCE, Adam; val/test AUC and logloss.

    Args:
        input_dim: H, the language tower's output width.
        hidden: hidden sizes of the MLP.
        dropout: dropout after each hidden layer.
        lr: Adam learning rate.
    """

    def __init__(self, input_dim: int, hidden: tuple[int, ...] = (256, 64), dropout: float = 0.1,
                 lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.mlp = MLP(input_dim, hidden, dropout)
        self.out = nn.Linear(self.mlp.output_dim, 1)
        self.auc = nn.ModuleDict({s: BinaryAUROC() for s in ("val", "test")})
        self.logloss = nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(vectors)).squeeze(-1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(self(batch["x"]), batch["label"])
        self.log("train/loss", loss, batch_size=len(batch["label"]))
        return loss

    def _evaluate(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        logits, labels = self(batch["x"]), batch["label"]
        self.auc[split].update(torch.sigmoid(logits), labels.long())
        self.logloss[split].update(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"))
        self.log(f"{split}/auc", self.auc[split], on_epoch=True)
        self.log(f"{split}/logloss", self.logloss[split], on_epoch=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def vector_loader(vectors: torch.Tensor, labels: torch.Tensor, shuffle: bool) -> DataLoader:
    tensors = {"x": vectors, "label": labels, "row": torch.arange(len(labels))}
    return DataLoader(TensorDictDataset(tensors), batch_size=2048, shuffle=shuffle, collate_fn=keep_batch)


def train_semantic_head(vectors: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                        checkpoint_dir: str) -> tuple[SemanticHead, dict[str, float]]:
    """Fit the head on train (early stopping on val AUC); return the best-val-AUC head and its test metrics."""
    pl.seed_everything(SEED, verbose=False)
    head = SemanticHead(vectors["train"].shape[1])
    checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, filename="semantic-head", monitor="val/auc", mode="max")
    trainer = pl.Trainer(max_epochs=100, callbacks=[EarlyStopping(monitor="val/auc", mode="max", patience=2),
                                                     checkpoint],
                         logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    loaders = {s: vector_loader(vectors[s], labels[s], shuffle=s == "train") for s in vectors}
    trainer.fit(head, loaders["train"], loaders["val"])
    (result,) = trainer.test(head, loaders["test"], ckpt_path="best", verbose=False)
    head = SemanticHead.load_from_checkpoint(checkpoint.best_model_path).eval()
    return head, {"auc": result["test/auc"], "logloss": result["test/logloss"], "epochs": trainer.current_epoch}


def semantic_scorer(encoder: FrozenEncoder, head: SemanticHead, table, datamodule: CTRDataModule
                    ) -> Callable[[pd.DataFrame], np.ndarray]:
    """Raw rows -> click probabilities: render to text, encode with the frozen tower, apply the head."""
    spec, template = datamodule.feature_spec, datamodule.hparams.template

    def score(rows: pd.DataFrame) -> np.ndarray:
        texts = render_texts(rows, table, spec, template)
        vectors = encoder.encode(texts["user_text"].tolist(), texts["item_text"].tolist())
        with torch.inference_mode():
            return torch.sigmoid(head(vectors)).numpy()

    return score


def train_plain_backbones(data_dir: str, run_dir: Path, max_epochs: int | None) -> dict[str, Path]:
    """Each backbone from scratch, as `ctrl run --baseline true --backbone X` does; the exports."""
    exports = {}
    for name in BACKBONES:
        out = run_dir / name
        run(backbone=name, config_dir=str(CONFIGS), baseline=True, data_dir=data_dir, out=str(out),
            max_epochs_finetune=max_epochs)
        finish_wandb()
        exports[name] = out / "export"
    return exports


def torch_path(model: CTRModel, tensors: dict[str, torch.Tensor], batch_size: int) -> None:
    """Score pre-encoded tensors in batches, as a serving loop that already holds ids would."""
    n = len(tensors["row"])
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            model({k: v[start:start + batch_size] for k, v in tensors.items()})


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def metrics(probs: np.ndarray, labels: torch.Tensor) -> dict[str, float]:
    p = torch.as_tensor(probs, dtype=torch.float64)
    return {"auc": float(binary_auroc(p, labels.long())), "logloss": float(F.binary_cross_entropy(p, labels.double()))}


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def markdown(rows: list[dict], semantic: dict) -> str:
    lines = ["| model | params | test AUC | test logloss | samples/s, torch path | samples/s, Scorer (raw rows)"
             " | ratio to plain, torch | ratio to plain, Scorer |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['params']:,} | {r['auc']:.4f} | {r['logloss']:.4f}"
                     f" | {r['torch']:,.0f} | {r['scorer']:,.0f} | {r['ratio_torch']:.2f} | {r['ratio_scorer']:.2f} |")
    s = semantic
    lines.append(f"| CTR-BERT-style (frozen MiniLM + MLP) | {s['tower_params']:,} + {s['head_params']:,}"
                 f" | {s['auc']:.4f} | {s['logloss']:.4f} | n/a | {s['rate']:,.1f} (render + encode + head)"
                 f" | n/a | {s['ratio']:.5f} (vs plain dcn) |")
    return "\n".join(lines)


def main(data_dir: str = "../shared/data/ml-100k", ctrl_export: list[str] | None = None, batch_size: int = 4096,
         repeats: int = 5, semantic_rows: int = 1000, max_epochs: int | None = None,
         text_cache_dir: str = str(default_cache_dir() / "text-vectors"), run_dir: str | None = None, threads: int = 1,
         out: str = str(Path(__file__).with_suffix(".md"))) -> None:
    """Serving cost of the exported models and of a semantic (language-model) scorer, on one machine.

    Args:
        data_dir: the MovieLens-100K folder.
        ctrl_export: export directories of CTRL runs (`ctrl run` writes one).
        batch_size: rows per scoring call.
        repeats: timed repeats per model (the rate is their median).
        semantic_rows: test rows timed end to end for the semantic scorer.
        max_epochs: stage-2 epochs cap (default: the configs').
        text_cache_dir: the text-vector cache.
        run_dir: runs and exports (default: a temporary folder).
        threads: torch threads; on a shared machine more threads than free cores stall every op.
        out: the markdown file to write.
    """
    args = SimpleNamespace(data_dir=data_dir, ctrl_export=[Path(p) for p in ctrl_export or []], batch_size=batch_size,
                           repeats=repeats, semantic_rows=semantic_rows, max_epochs=max_epochs,
                           text_cache_dir=text_cache_dir, run_dir=Path(run_dir) if run_dir else None, threads=threads,
                           out=Path(out))
    torch.set_num_threads(args.threads)
    wandb_mode()  # offline without a key, as `ctrl` runs
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="cost-ml100k-"))

    # (a) the exports: plain backbones trained here, CTRL exports given
    exports = {("plain", name): path for name, path in train_plain_backbones(args.data_dir, run_dir,
                                                                              args.max_epochs).items()}
    for path in args.ctrl_export:
        exports["CTRL", json.loads((path / "model.json").read_text())["backbone"]] = path
    table = read_table(Path(args.data_dir))
    raw_test = labelled_splits(table)["test"]
    labels = torch.tensor(raw_test["label"].to_numpy(), dtype=torch.float32)
    models, scorers, tensors = {}, {}, {}
    for key, path in exports.items():
        model, spec = load_model(path)
        models[key], scorers[key] = model, Scorer(model, spec, args.batch_size)
        tensors[key] = frame_to_tensors(encode_rows(raw_test, spec), spec)

    # (b) the semantic baseline: vectors from the cache (test encoded once), head trained on train
    datamodule = CTRDataModule(args.data_dir)
    tower = LanguageTower("default", "mean", 0, 128)
    encoder, cache = FrozenEncoder(tower, precision="fp32"), TextVectorCache(args.text_cache_dir)
    vectors, split_labels, encode_seconds = {}, {}, {}
    for split in ("train", "val", "test"):
        start = time.perf_counter()
        distinct_vectors, index = cache.vectors(encoder, *datamodule.texts(split))
        vectors[split] = torch.from_numpy(distinct_vectors[index])
        encode_seconds[split] = time.perf_counter() - start
        split_labels[split] = torch.tensor(datamodule.frame(split)["label"].to_numpy(), dtype=torch.float32)
    head, semantic = train_semantic_head(vectors, split_labels, str(run_dir / "semantic"))
    score_text = semantic_scorer(encoder, head, table, datamodule)
    pick = np.sort(torch.randperm(len(raw_test), generator=torch.Generator().manual_seed(SEED))[
        :args.semantic_rows].numpy())
    sample = raw_test.iloc[pick]
    first, second = datamodule.texts("test")
    texts = render_texts(sample, table, datamodule.feature_spec, datamodule.hparams.template)
    if texts["user_text"].tolist() != [first[i] for i in pick] or texts["item_text"].tolist() != [
            second[i] for i in pick]:
        raise RuntimeError("rendering raw test rows does not reproduce the data module's texts")

    # timing: warm-up, then every model in turn, --repeats times
    for key in exports:
        torch_path(models[key], tensors[key], args.batch_size)
        scorers[key](raw_test)
    score_text(sample.head(32))
    times: dict[tuple[str, str], list[float]] = {}
    load = [os.getloadavg()[0]]
    for r in range(args.repeats):
        for key in exports:
            times.setdefault((*key, "torch"), []).append(
                seconds(lambda k=key: torch_path(models[k], tensors[k], args.batch_size)))
            times.setdefault((*key, "scorer"), []).append(seconds(lambda k=key: scorers[k](raw_test)))
        times.setdefault(("semantic", "", "e2e"), []).append(seconds(lambda: score_text(sample)))
        print(f"repeat {r + 1}/{args.repeats} done")
    load.append(os.getloadavg()[0])
    rate = {k: (args.semantic_rows if k[0] == "semantic" else len(raw_test)) / statistics.median(v)
            for k, v in times.items()}

    rows = []
    for kind in ("plain", "CTRL"):
        for name in BACKBONES:
            key = (kind, name)
            if key not in exports:
                continue
            rows.append({"label": f"{name} from scratch" if kind == "plain" else f"CTRL ({name})",
                         "params": parameters(models[key]), **metrics(scorers[key](raw_test), labels),
                         "torch": rate[(*key, "torch")], "scorer": rate[(*key, "scorer")],
                         "ratio_torch": rate[(*key, "torch")] / rate[("plain", name, "torch")],
                         "ratio_scorer": rate[(*key, "scorer")] / rate[("plain", name, "scorer")]})
    e2e = rate[("semantic", "", "e2e")]
    semantic.update(rate=e2e, ratio=e2e / rate[("plain", "dcn", "scorer")], tower_params=parameters(tower),
                    head_params=parameters(head))
    text = markdown(rows, semantic)
    print(text)
    write_report(args, text, semantic, encode_seconds, raw_test, rate, times, load)


def write_report(args: SimpleNamespace, table: str, semantic: dict, encode_seconds: dict[str, float],
                 raw_test: pd.DataFrame, rate: dict, times: dict, load: list[float]) -> None:
    command = f"python -m benchmarks cost --data_dir {args.data_dir} --threads {args.threads}"
    command += " --ctrl_export '[" + ",".join(map(str, args.ctrl_export)) + "]'" if args.ctrl_export else ""
    plain_scorer = [rate[("plain", n, "scorer")] for n in BACKBONES]
    spread = {k: (min(v) / statistics.median(v), max(v) / statistics.median(v)) for k, v in times.items()}
    worst = max(spread.values(), key=lambda s: s[1] - s[0])
    ctrl_note = ("CTRL exports: " + ", ".join(f"`{p}`" for p in args.ctrl_export) if args.ctrl_export else
                 "**No CTRL export was given** (`--ctrl_export`), so the table has no CTRL row. CTRL ships only the"
                 " collaborative tower + head, so its export is architecturally the plain backbone: same parameter"
                 " count and the same cost; rerun with `--ctrl_export '[runs/main/export]'` to measure it.")
    text = (
        "# Inference cost on MovieLens-100K (test split)\n\n"
        f"Produced on {date.today().isoformat()} by\n\n    {command}\n\n"
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()};"
        f" torch {torch.__version__}, Lightning {pl.__version__}. The machine is shared with other jobs; every"
        f" rate is the median of {args.repeats} repeats taken in turn (the largest spread of one model's repeats"
        f" was {worst[0]:.2f}x to {worst[1]:.2f}x its median; 1-minute load average {load[0]:.1f} when timing"
        f" began, {load[1]:.1f} when it ended), so ratios are fairer than absolute rates. One torch thread"
        " (`--threads`): with 2 threads on these 2 cores while other jobs held one, each op waits for a"
        " descheduled OpenMP thread, and one pass over the test split took 0.65-0.87 s instead of 0.02-0.05 s"
        " (Wide&Deep, DCN; measured beside this run), which times the neighbours, not the models.\n\n"
        f"{ctrl_note}\n\n"
        f"Test split: {len(raw_test):,} rows. Plain backbones: trained from scratch in this run (stage 2 only,"
        " early stopping on val AUC, configs/ml100k/finetune.yaml + finetune/BACKBONE.yaml) and exported with"
        " `finetune.export.export_model`. Test AUC / logloss: the Scorer's probabilities on the raw test rows"
        " (torchmetrics).\n\n"
        f"{table}\n\n"
        "- torch path: `load_model(dir)`, `torch.inference_mode`, batches of"
        f" {args.batch_size} over the whole test split, rows already encoded to id tensors.\n"
        "- Scorer: `load_scorer(dir)` (batch"
        f" {args.batch_size}) on the raw test rows, encoding raw values to ids included.\n"
        "- CTR-BERT-style: frozen all-MiniLM-L6-v2 (mean pooling, max_length 128, fp32) + MLP 384-256-64-1,"
        f" trained {semantic['epochs']} epochs (early stopping on val AUC). Its AUC is over all test rows; its"
        f" rate is end to end from raw rows on a seeded sample of {args.semantic_rows} test rows: render to"
        " text (the same rendering as CTRL's, checked against `CTRDataModule.texts`), tokenize, encode"
        " (length-sorted batches of 128, `torch.inference_mode`), head. Its ratio is to the plain DCN's Scorer"
        f" rate; against the four plain backbones' Scorer rates ({min(plain_scorer):,.0f} to"
        f" {max(plain_scorer):,.0f} samples/s) it is {semantic['rate'] / max(plain_scorer):.5f} to"
        f" {semantic['rate'] / min(plain_scorer):.5f}. Text vectors for training and testing the head came from"
        f" the cache (train {encode_seconds['train']:.1f} s, val {encode_seconds['val']:.1f} s, test"
        f" {encode_seconds['test']:.1f} s including any encoding on a cache miss).\n"
    )
    args.out.write_text(text)

