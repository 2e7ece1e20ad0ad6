"""Peer comparison on MovieLens-100K: FuxiCTR's DCN and DeepFM beside ours, same split, same hyper-parameters.

    pip install -e '.[peer]'    # fuxictr==2.3.10 (pulls ray, polars, scikit-learn, h5py; no torch)
    python -m benchmarks peer_fuxictr [--data_dir ../shared/data/ml-100k] [--max_epochs 20]

The prepared splits of `CTRDataModule` (8:1:1 by time) are written as parquet files with every field
of our feature spec: user id, gender, age, occupation, zip code, item id, title and release year as
categorical columns, genres (multi-valued) and the behavior history as FuxiCTR `sequence` columns
(mean-pooled; the history shares the item-id embedding, as ours does). Values are our vocabulary ids
written as tokens; FuxiCTR fits its own vocabularies on the train split (min count 1), so a value
unseen in training is out-of-vocabulary on both sides. FuxiCTR's data pipeline (FeatureProcessor,
build_dataset, RankDataLoader) reads them from a dataset_config.yaml / model_config.yaml pair in the run
directory, loaded with `fuxictr.utils.load_config`.

The pip wheel of FuxiCTR ships the library (layers, BaseModel with its fit loop, data pipeline) but not
its model zoo, where DCN and DeepFM live; the two models here are composed from FuxiCTR's own layers
(`FeatureEmbedding`, `CrossNet`, `MLP_Block`, `FactorizationMachine`) the way the model zoo composes them.

Both sides: Adam lr 1e-3, batch 2048, embedding 32, MLP [256, 128, 64] with BatchNorm and dropout 0.1,
DCN with 3 cross layers, no regularisation, early stopping on val AUC (patience 2, at most --max_epochs),
the best-val-AUC weights tested, seed 0. FuxiCTR keeps its own defaults otherwise (learning rate x0.1
on each epoch without improvement, gradient-norm clipping at 10, embeddings initialised N(0, 1e-4)).
Training samples/s = train rows x epochs run / wall time of fit (each epoch's validation pass included,
on both sides). FuxiCTR's DeepFM runs twice: as shipped, and with the first-order weights of the history
initialised like every other weight (FuxiCTR 2.3.10 leaves them at N(0, 1); see `FuxiDeepFM`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import fuxictr
import pandas as pd
import pytorch_lightning as pl
import torch
import yaml
from fuxictr.features import FeatureMap
from fuxictr.preprocess import FeatureProcessor, build_dataset
from fuxictr.pytorch.dataloaders import RankDataLoader
from fuxictr.pytorch.layers import CrossNet, FactorizationMachine, FeatureEmbedding, MLP_Block
from fuxictr.pytorch.models import BaseModel
from fuxictr.pytorch.torch_utils import seed_everything
from fuxictr.utils import load_config, set_logger

from ctrl.app.lightning_cli import lightning_cli
from ctrl.app.pipeline import stage_configs
from ctrl.app.report import cpu_model
from tabular2text.datamodule import CTRDataModule
from tabular2text.schema import PAD, FeatureSpec

SEED = 0
DATASET_ID = "ml100k_ctrl_split"
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "ml100k"
FUXI_SPLITS = {"train": "train", "val": "valid", "test": "test"}
HYPER = {"learning_rate": 1e-3, "batch_size": 2048, "embedding_dim": 32, "hidden_units": [256, 128, 64],
         "batch_norm": True, "net_dropout": 0.1, "num_cross_layers": 3, "early_stop_patience": 2}


class FuxiDCN(BaseModel):
    """DCN from FuxiCTR layers: [cross network (F*E), MLP] -> linear -> sigmoid.

    Args:
        feature_map: FuxiCTR's feature map of the data.
        params: the experiment's parameters from `fuxictr.utils.load_config`.
    """

    def __init__(self, feature_map: FeatureMap, params: dict) -> None:
        super().__init__(feature_map, **base_args(params))
        self.embedding_layer = FeatureEmbedding(feature_map, params["embedding_dim"])
        flat_dim = feature_map.sum_emb_out_dim()
        self.crossnet = CrossNet(flat_dim, params["num_cross_layers"])
        self.dnn = MLP_Block(flat_dim, params["hidden_units"], "ReLU", dropout_rates=params["net_dropout"],
                             batch_norm=params["batch_norm"])
        self.fc = torch.nn.Linear(flat_dim + params["hidden_units"][-1], 1)
        self.compile(params["optimizer"], params["loss"], params["learning_rate"])
        self.reset_parameters()
        self.model_to_device()

    def forward(self, inputs: dict) -> dict:
        flat = self.embedding_layer(self.get_inputs(inputs), flatten_emb=True)  # B x F*E
        logit = self.fc(torch.cat([self.crossnet(flat), self.dnn(flat)], dim=-1))
        return {"y_pred": self.output_activation(logit)}


class FuxiDeepFM(BaseModel):
    """DeepFM from FuxiCTR layers: FM (first order + pairwise) + MLP logit -> sigmoid.

    Args:
        feature_map: FuxiCTR's feature map of the data.
        params: the experiment's parameters from `fuxictr.utils.load_config`.
        init_shared_first_order: initialise the first-order weights of shared-embedding sequences (the
            history) like every other embedding, which FuxiCTR 2.3.10 does not do.
    """

    def __init__(self, feature_map: FeatureMap, params: dict, init_shared_first_order: bool = False) -> None:
        super().__init__(feature_map, **base_args(params))
        self.embedding_layer = FeatureEmbedding(feature_map, params["embedding_dim"])
        self.fm = FactorizationMachine(feature_map)
        self.mlp = MLP_Block(feature_map.sum_emb_out_dim(), params["hidden_units"], "ReLU", output_dim=1,
                             dropout_rates=params["net_dropout"], batch_norm=params["batch_norm"])
        self.compile(params["optimizer"], params["loss"], params["learning_rate"])
        self.reset_parameters()
        if init_shared_first_order:
            # FuxiCTR's LR layer gives a sequence that shares an embedding a first-order table of its own, but
            # its init_weights skips shared fields: that table keeps nn.Embedding's N(0, 1), 1e4 times the rest.
            tables = self.fm.lr_layer.embedding_layer.embedding_layer.embedding_layers
            with torch.no_grad():
                for name, spec in feature_map.features.items():
                    if "share_embedding" in spec:
                        torch.nn.init.normal_(tables[name].weight[1:], std=1e-4)
                        tables[name].weight[0].zero_()
        self.model_to_device()

    def forward(self, inputs: dict) -> dict:
        x = self.get_inputs(inputs)
        emb = self.embedding_layer(x)  # B x F x E
        return {"y_pred": self.output_activation(self.fm(x, emb) + self.mlp(emb.flatten(start_dim=1)))}


FUXI_MODELS = {"dcn": FuxiDCN, "deepfm": FuxiDeepFM}


def base_args(params: dict) -> dict:
    """The arguments of FuxiCTR's BaseModel, taken from the experiment's parameters."""
    keys = ("model_id", "task", "gpu", "monitor", "monitor_mode", "early_stop_patience", "save_best_only",
            "embedding_regularizer", "net_regularizer", "verbose", "model_root", "metrics")
    return {k: params[k] for k in keys}


def tokens(values: pd.Series, is_list: bool) -> pd.Series:
    """Our ids -> string tokens (padding id -> missing); lists -> "^"-joined strings, FuxiCTR's sequence format
    (a parquet list column fails in its null filling, fuxictr 2.3.10)."""
    if is_list:
        return values.map(lambda ids: "^".join(str(i) for i in ids))
    return values.map(lambda i: None if i == PAD else str(i))


def write_fuxictr_data(datamodule: CTRDataModule, run_dir: Path, max_epochs: int) -> Path:
    """The prepared splits as parquet plus FuxiCTR's dataset_config.yaml and model_config.yaml; the config dir."""
    spec: FeatureSpec = datamodule.feature_spec
    raw = run_dir / "raw"
    raw.mkdir(parents=True)
    for split, name in FUXI_SPLITS.items():
        frame = datamodule.frame(split)
        columns = {f.name: tokens(frame[f.name], f.is_list) for f in spec.fields}
        columns["label"] = frame["label"].astype("float64")
        pd.DataFrame(columns).to_parquet(raw / f"{name}.parquet", index=False)

    feature_cols = []
    # A sequence that shares an embedding is fitted after the field it shares it with.
    for f in sorted(spec.fields, key=lambda f: f.shares_embedding is not None):
        col = {"name": f.name, "active": True, "dtype": "str"}
        if f.is_list:
            col.update(type="sequence", max_len=f.max_len, padding="post",
                       feature_encoder="layers.MaskedAveragePooling()")
            if f.shares_embedding:
                col["share_embedding"] = f.shares_embedding
        else:
            col["type"] = "categorical"
        feature_cols.append(col)
    dataset_config = {DATASET_ID: {
        "data_root": str(run_dir / "data"), "data_format": "parquet",
        **{f"{name}_data": str(raw / f"{name}.parquet") for name in FUXI_SPLITS.values()},
        "min_categr_count": 1, "feature_cols": feature_cols, "label_col": {"name": "label", "dtype": "float"},
    }}
    base = {"model_root": str(run_dir / "checkpoints"), "verbose": 0, "task": "binary_classification",
            "gpu": -1, "loss": "binary_crossentropy", "metrics": ["logloss", "AUC"], "optimizer": "adam",
            "monitor": "AUC", "monitor_mode": "max", "save_best_only": True, "embedding_regularizer": 0,
            "net_regularizer": 0, "epochs": max_epochs, "shuffle": True, "seed": SEED}
    model_config = {"Base": base, **{f"{name}_ml100k": {"model": name, "dataset_id": DATASET_ID, **HYPER}
                                     for name in FUXI_MODELS}}
    config_dir = run_dir / "config"
    config_dir.mkdir()
    (config_dir / "dataset_config.yaml").write_text(yaml.safe_dump(dataset_config, sort_keys=False))
    (config_dir / "model_config.yaml").write_text(yaml.safe_dump(model_config, sort_keys=False))
    return config_dir


def build_fuxictr_dataset(config_dir: Path) -> dict:
    """FuxiCTR's preprocessing: fit vocabularies on train, transform every split to its parquet layout."""
    params = load_config(str(config_dir), f"{next(iter(FUXI_MODELS))}_ml100k")
    processor = FeatureProcessor(feature_cols=params["feature_cols"], label_col=params["label_col"],
                                 dataset_id=params["dataset_id"], data_root=params["data_root"])
    train, valid, test = build_dataset(processor, train_data=params["train_data"],
                                       valid_data=params["valid_data"], test_data=params["test_data"],
                                       data_format=params["data_format"])
    return {"train_data": train, "valid_data": valid, "test_data": test}


def run_fuxictr(name: str, config_dir: Path, data: dict, init_fix: bool = False) -> dict[str, float]:
    params = {**load_config(str(config_dir), f"{name}_ml100k"), **data}
    set_logger(params)
    seed_everything(seed=params["seed"])
    feature_map = FeatureMap(params["dataset_id"], os.path.join(params["data_root"], params["dataset_id"]))
    feature_map.load(os.path.join(feature_map.data_dir, "feature_map.json"), params)
    model = FuxiDeepFM(feature_map, params, init_fix) if init_fix else FUXI_MODELS[name](feature_map, params)
    train_gen, valid_gen = RankDataLoader(feature_map, stage="train", **params)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    model.fit(train_gen, validation_data=valid_gen, epochs=params["epochs"])
    fit_seconds = time.perf_counter() - start
    test = model.evaluate(RankDataLoader(feature_map, stage="test", **params))
    epochs = model._epoch_index + 1  # FuxiCTR keeps the epochs run in a private field only
    return {"auc": test["AUC"], "logloss": test["logloss"], "epochs": epochs, "fit_seconds": fit_seconds, "load": load,
            "samples_per_s": train_gen.num_samples * epochs / fit_seconds,
            "parameters": sum(p.numel() for p in model.parameters())}


def run_ours(name: str, data_dir: str, run_dir: Path, max_epochs: int) -> dict[str, float]:
    """Our stage-2 config for the backbone, trained from scratch (the baseline of `ctrl run --baseline true`);
    W&B logging off, as FuxiCTR logs to a file only."""
    root = str(run_dir / "ours" / name)
    cli = lightning_cli([*(a for c in stage_configs(CONFIGS, "finetune", name) for a in ("--config", c)),
                         "--data.data_dir", data_dir,
                         "--trainer.max_epochs", str(max_epochs), "--trainer.default_root_dir", root,
                         "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"],
                        run=False)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - start
    (test,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    epochs = cli.trainer.current_epoch
    return {"auc": test["test/auc"], "logloss": test["test/logloss"], "epochs": epochs, "fit_seconds": fit_seconds,
            "load": load,
            "samples_per_s": len(cli.datamodule.frame("train")) * epochs / fit_seconds,
            "parameters": sum(p.numel() for p in cli.model.model.parameters())}


def markdown(results: dict[tuple[str, str], dict[str, float]]) -> str:
    lines = ["| backbone | library | test AUC | test logloss | epochs | fit s | train samples/s | load at start"
             " | parameters |", "|---|---|---|---|---|---|---|---|---|"]
    for (name, library), r in results.items():
        lines.append(f"| {name} | {library} | {r['auc']:.4f} | {r['logloss']:.4f} | {r['epochs']}"
                     f" | {r['fit_seconds']:.1f} | {r['samples_per_s']:,.0f} | {r['load']:.1f} | {r['parameters']:,} |")
    return "\n".join(lines)


def main(data_dir: str = "../shared/data/ml-100k", max_epochs: int = 20, run_dir: str | None = None,
         threads: int = 1, out: str = str(Path(__file__).with_suffix(".md"))) -> None:
    """FuxiCTR and ctrl-rec on the same split with the same hyper-parameters.

    Args:
        data_dir: the MovieLens-100K folder.
        max_epochs: epochs at most (early stopping on val AUC, patience 2).
        run_dir: FuxiCTR files and checkpoints (default: a temporary folder).
        threads: torch threads; on a shared machine more threads than free cores stall every op.
        out: the markdown file to write.
    """
    args = SimpleNamespace(data_dir=data_dir, max_epochs=max_epochs, run_dir=Path(run_dir) if run_dir else None,
                           threads=threads, out=Path(out))
    torch.set_num_threads(args.threads)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="fuxictr-ml100k-"))
    datamodule = CTRDataModule(args.data_dir)
    config_dir = write_fuxictr_data(datamodule, run_dir, args.max_epochs)
    start = time.perf_counter()
    data = build_fuxictr_dataset(config_dir)
    build_seconds = time.perf_counter() - start

    results: dict[tuple[str, str], dict[str, float]] = {}
    for name in FUXI_MODELS:
        results[name, f"FuxiCTR {fuxictr.__version__}"] = run_fuxictr(name, config_dir, data)
        if name == "deepfm":
            results[name, f"FuxiCTR {fuxictr.__version__}, history LR table initialised"] = run_fuxictr(
                name, config_dir, data, init_fix=True)
        results[name, "ctrl-rec"] = run_ours(name, args.data_dir, run_dir, args.max_epochs)
    logging.getLogger().handlers.clear()

    table = markdown(results)
    print(table)
    write_report(args, table, datamodule, build_seconds)


def write_report(args: SimpleNamespace, table: str, datamodule: CTRDataModule, build_seconds: float) -> None:
    sizes = {split: len(datamodule.frame(split)) for split in FUXI_SPLITS}
    text = f"""# Peer comparison on MovieLens-100K: FuxiCTR vs ctrl-rec, same split, same hyper-parameters (seed 0)

Produced on {date.today().isoformat()} by

    pip install -e '.[peer]'
    python -m benchmarks peer_fuxictr --data_dir {args.data_dir} \\
        --max_epochs {args.max_epochs} --threads {args.threads}

Machine: {cpu_model()}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()}; torch {torch.__version__},
Lightning {pl.__version__}, FuxiCTR {fuxictr.__version__} (Ray {ray_version()}). The machine is shared with other
jobs and each model was trained once: compare rates loosely ("load at start" is the 1-minute load average
when the fit began; 2 means both cores busy). One torch thread on both sides (`--threads`): on this shared
machine a second thread mostly waits for a core held by another job (see cost_ml100k.md).

{table}

- Data: `{datamodule.prepared_dir.name}`, the prepared 8:1:1 split by time of `CTRDataModule` (train
  {sizes['train']:,}, val {sizes['val']:,}, test {sizes['test']:,} rows), written as parquet with all ten fields:
  user id, gender, age, occupation, zip code, item id, title, release year (categorical), genres and the
  10-item history (FuxiCTR `sequence` columns, `^`-joined, mean-pooled; the history shares the item-id
  embedding). Values are our vocabulary ids as tokens; FuxiCTR fits its own vocabularies on train (min count
  1) and ends with the same vocabulary sizes as ours. FuxiCTR's preprocessing (FeatureProcessor +
  build_dataset, through Ray) took {build_seconds:.1f} s, not counted in the rates.
- FuxiCTR side: dataset_config.yaml / model_config.yaml written to the run directory and read with
  `fuxictr.utils.load_config`; data through `RankDataLoader` (parquet, Ray Data); training and early stopping
  by FuxiCTR's `BaseModel.fit`; test AUC / logloss by its `evaluate` (scikit-learn). The pip wheel holds no
  model zoo, so DCN and DeepFM are composed from FuxiCTR's layers (`FeatureEmbedding`, `CrossNet`,
  `MLP_Block`, `FactorizationMachine`) as its model zoo composes them. FuxiCTR defaults kept: learning rate
  x0.1 after each epoch without improvement, gradient-norm clipping at 10, embeddings N(0, 1e-4).
- ctrl-rec side: `configs/ml100k/finetune.yaml` + `finetune/{{dcn,deepfm}}.yaml` through the LightningCLI
  (`ctrl fit`), from scratch, W&B logging off; test metrics of the best-val-AUC checkpoint (torchmetrics).
- Both: Adam lr 1e-3, batch 2048, embedding 32, MLP [256, 128, 64] with BatchNorm and dropout 0.1, DCN with 3
  cross layers, no regularisation, early stopping on val AUC with patience 2 (at most {args.max_epochs} epochs).
  Train samples/s = train rows x epochs run / wall time of fit (the per-epoch validation pass included on
  both sides).
- FuxiCTR's DeepFM as shipped trains badly here: its first-order (LR) layer gives the shared-embedding
  history a weight table of its own, and `FeatureEmbeddingDict.init_weights` skips shared fields, so that
  table keeps `nn.Embedding`'s N(0, 1) initialisation, 10^4 times every other weight. The extra row
  initialises that table like the others (N(0, 1e-4)); nothing else changes. Its DCN has no LR layer and is
  unaffected.
- FuxiCTR's runs are not reproducible run to run: its parquet loader shuffles each epoch with Ray Data's
  unseeded `random_shuffle()`, so `seed_everything` does not fix the batch order (two earlier runs of this
  script gave its DCN test AUC 0.7860 and 0.7756, its as-shipped DeepFM 0.7349 and 0.7484). Ours gave the
  same DCN AUC (0.7845) in all three runs (seeded sampler, `deterministic: true`).
- Parameter counts: FuxiCTR's DCN equals ours; its DeepFM has that extra 1,618-weight history table and a
  1-unit MLP output instead of our 107-weight head over [first order, FM, MLP].
"""
    args.out.write_text(text)


def ray_version() -> str:
    import ray

    return ray.__version__

