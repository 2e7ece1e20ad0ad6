"""Shared fixtures: a small synthetic feature spec and batches that follow the batch convention."""

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tabular2text.schema import FeatureSpec, Field
from towers.language import default_model_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "ml100k"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def synthetic_spec() -> FeatureSpec:
    """Every field kind once: ids, a multi-valued genre, a behavior sequence sharing the item table, a number."""
    fields = (
        Field("user_id", "categorical", "user", vocab_size=12),
        Field("gender", "categorical", "user", text_name="gender", vocab_size=4),
        Field("age", "numeric", "user", text_name="age"),
        Field("history", "sequence", "user", text_name="history", max_len=5, shares_embedding="item_id",
              text_field="title"),
        Field("item_id", "categorical", "item", vocab_size=20),
        Field("title", "categorical", "item", text_name="title", vocab_size=20),
        Field("genres", "multi_valued", "item", text_name="genre", vocab_size=7, max_len=3),
    )
    return FeatureSpec(fields=fields, item_noun="movie", history_action="watched")


def synthetic_batch(spec: FeatureSpec, batch_size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, torch.Tensor] = {}
    for f in spec.fields:
        vocab = spec[f.shares_embedding].vocab_size if f.shares_embedding else f.vocab_size
        if f.kind == "numeric":
            batch[f.name] = torch.randn(batch_size, generator=g)
        elif f.kind == "categorical":
            batch[f.name] = torch.randint(1, vocab, (batch_size,), generator=g)
        else:
            lengths = torch.randint(0, f.max_len + 1, (batch_size,), generator=g)
            mask = torch.arange(f.max_len)[None, :] < lengths[:, None]
            ids = torch.randint(1, vocab, (batch_size, f.max_len), generator=g)
            batch[f.name] = torch.where(mask, ids, torch.zeros_like(ids))
            batch[f.name + "_mask"] = mask
    batch["label"] = torch.randint(0, 2, (batch_size,), generator=g).float()
    batch["row"] = torch.arange(batch_size)
    return batch


@pytest.fixture
def spec() -> FeatureSpec:
    return synthetic_spec()


@pytest.fixture
def batch(spec) -> dict[str, torch.Tensor]:
    return synthetic_batch(spec)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    """A random 2-block BERT of width 16 with the real all-MiniLM-L6-v2 tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_dir() / name, folder / name)
    from transformers import BertConfig, BertModel  # only the tests that build a language tower pay for it

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def wandb_records(run_file: Path, timeout: float = 60.0) -> list:
    """The protobuf records of a finished offline `.wandb` run file. wandb's service process may still be
    writing the file when `wandb.finish()` returns, so this rereads it until the run's last record, `exit`,
    is there (seen in CI: the history records were missing on the first read)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(parse_wandb_file(run_file))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def parse_wandb_file(run_file: Path):
    """The protobuf records in a `.wandb` file: a ':W&B' header, then a leveldb-style log of 32 KiB
    blocks whose chunks carry a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding to the end of the block
            pos += left - 7 - length
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def write_small_ml1m(directory: Path, users: int = 40, movies: int = 30, seed: int = 0) -> Path:
    """A MovieLens-1M-layout data set with a learnable signal: users like movies of their favourite genre."""
    rng = np.random.default_rng(seed)
    genres = ["Action", "Comedy", "Drama"]
    directory.mkdir()
    (directory / "users.dat").write_text("".join(
        f"{u}::{'FM'[u % 2]}::{[18, 25, 35][u % 3]}::{u % 21}::{10000 + u}\n" for u in range(1, users + 1)))
    (directory / "movies.dat").write_text("".join(
        f"{m}::Movie number {m} ({1980 + m % 20})::{genres[m % 3]}\n" for m in range(1, movies + 1)))
    lines, t = [], 978300000
    for u in range(1, users + 1):
        for m in rng.choice(np.arange(1, movies + 1), size=20, replace=False):
            liked = (m % 3 == u % 3) ^ (rng.random() < 0.15)
            lines.append(f"{u}::{m}::{5 if liked else 1}::{t + int(rng.integers(0, 10**6))}\n")
    (directory / "ratings.dat").write_text("".join(lines))
    return directory


def small_config(source: Path, target: Path, **model_args) -> Path:
    """The shipped config with small-data settings: the same structure a user runs."""
    config = yaml.safe_load(source.read_text())
    config["trainer"]["max_epochs"] = 2
    config["data"].update(batch_size=64)
    config["model"]["init_args"]["backbone"]["init_args"].update(embed_dim=8, mlp_dims=[32, 16])
    config["model"]["init_args"].update(model_args)
    target.write_text(yaml.safe_dump(config))
    return target


def small_config_dir(target: Path, bert_dir: str, text_cache_dir: Path) -> Path:
    """A config directory as `ctrl run` and `ctrl bench` read it: the shipped stage bases with small-data
    settings (a tiny BERT as the language tower) and the shipped backbone overlays."""
    target.mkdir()
    small_config(CONFIGS / "align.yaml", target / "align.yaml", language_model=bert_dir,
                 text_cache_dir=str(text_cache_dir), warmup_steps=2)
    small_config(CONFIGS / "finetune.yaml", target / "finetune.yaml")
    for stage in ("align", "finetune"):
        shutil.copytree(CONFIGS / stage, target / stage)
    return target


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, bert_dir):
    tmp = tmp_path_factory.mktemp("pipeline")
    data = write_small_ml1m(tmp / "ml-1m")
    configs = small_config_dir(tmp / "configs", bert_dir, tmp / "text-vectors")
    from ctrl.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTRL_CACHE_DIR", str(tmp / "cache"))
        main(["run", "--config_dir", str(configs), "--data_dir", str(data), "--out", str(tmp / "out")])
    return tmp
