"""Helpers the tests share (the fixtures are in conftest.py): synthetic specs and batches, small data sets
and configs, the W&B run-file reader."""

import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from tabular2text.schema import FeatureSpec, Field

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"
STAGES = ROOT / "configs" / "stages"  # the stages' bases, the same on every data set
CONFIGS = ROOT / "configs" / "ml100k"  # what is ML-100K's own: its data and tuned values
# ML-100K's stage-2 dropout, (baseline, CTRL), as `ctrl bench --tune true` chose it for the four paper backbones
# (benchmarks/headline_ml100k/); the other backbones take round 2l's 0.8 / 0.7 (configs/ml100k/finetune*.yaml)
ML100K_DROPOUT = {"wide_deep": (0.8, 0.8), "deepfm": (0.8, 0.8), "dcn": (0.5, 0.3), "autoint": (0.3, 0.7)}
ML100K_DROPOUT_OTHERS = (0.8, 0.7)
# Amazon Beauty's, likewise (benchmarks/headline_amazon_beauty/); the other backbones take the stages' 0.1
AMAZON_BEAUTY_DROPOUT = {"wide_deep": (0.3, 0.1), "deepfm": (0.1, 0.1), "dcn": (0.1, 0.1), "autoint": (0.3, 0.1)}
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


def ml100k_configs(stage: str) -> list[str]:
    """`ctrl fit` arguments of a stage on ML-100K with DCN: its base, then ML-100K's file."""
    return ["--config", str(STAGES / f"{stage}.yaml"), "--config", str(CONFIGS / f"{stage}.yaml")]


def ml100k_config(stage: str) -> dict:
    """ml100k_configs(stage) as one config: a plain merge of the two files, as neither changes the backbone's
    class (jsonargparse merges them the same)."""
    from ctrl.app.tune import merge

    return merge(yaml.safe_load((STAGES / f"{stage}.yaml").read_text()),
                 yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text()))


def small_config(stage: str, target: Path, data_args: dict | None = None, **model_args) -> Path:
    """The shipped config of a stage on ML-100K (base and ML-100K's file, as one) with small-data settings: the
    same structure a user runs."""
    config = ml100k_config(stage)
    config["trainer"]["max_epochs"] = 2
    config["data"].update(batch_size=64, **(data_args or {}))
    config["model"]["init_args"]["backbone"]["init_args"].update(embed_dim=8, mlp_dims=[32, 16])
    config["model"]["init_args"].update(model_args)
    target.write_text(yaml.safe_dump(config))
    return target


def small_config_dir(target: Path, bert_dir: str, text_cache_dir: Path) -> Path:
    """A config directory as `ctrl run` and `ctrl bench` read it: each stage's shipped config on ML-100K with
    small-data settings (a tiny BERT as the language tower; merged after the stage's base and the backbone chosen by
    name, it holds every setting) and CTRL's stage-2 overlay. No backbone's own overlay: each states full-size
    init_args."""
    target.mkdir()
    small_config("align", target / "align.yaml", {"text_cache_dir": str(text_cache_dir)},
                 language_model=bert_dir, warmup_steps=2)
    small_config("finetune", target / "finetune.yaml")
    shutil.copy(CONFIGS / "finetune_aligned.yaml", target)
    return target


def write_ml1m(directory: Path, encoding: str) -> None:
    directory.mkdir()
    users = ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::55117"]
    movies = ["1::Toy Story (1995)::Animation|Children's|Comedy", "2::Jumanji (1995)::Adventure|Children's",
              "3::Cité des enfants perdus, La (1995)::Sci-Fi", "4::Heat (1995)::Action|Crime|Thriller"]
    ratings = [f"{u}::{i}::{(u + i) % 5 + 1}::{978300000 + 10 * k}"
               for k, (u, i) in enumerate((u, i) for i in range(1, 5) for u in range(1, 4))]
    ratings += [f"{u}::{i}::{(u + 3 * i) % 5 + 1}::{978400000 + 10 * k}"
                for k, (u, i) in enumerate((u, i) for u in range(1, 4) for i in range(1, 5))]
    (directory / "users.dat").write_text("\n".join(users) + "\n", encoding="ascii")
    (directory / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode(encoding))
    (directory / "ratings.dat").write_text("\n".join(ratings) + "\n", encoding="ascii")
GENERIC_CSV = """user,gender,item,title,tags,price,click,ts
u1,F,i1,Red Shoes,shoes|red,30,1,5
u2,M,i2,Blue Hat,hat,12.5,0,1
u1,F,i2,Blue Hat,hat,12.5,1,2
u3,,i3,Green Bag,bag|green,,0,3
u2,M,i1,Red Shoes,shoes|red,30,1,4
u3,F,i1,Red Shoes,shoes|red,30,0,6
u1,F,i3,Green Bag,bag|green,20,1,7
u2,M,i3,Green Bag,bag|green,20,0,8
u3,F,i2,Blue Hat,hat,12.5,1,9
u1,F,i4,Gold Ring,jewel,99,1,10
u3,F,i3,Green Bag,bag|green,20,1,11
u1,F,i2,Blue Hat,hat,12.5,0,12
u2,M,i2,Blue Hat,hat,12.5,1,13
u3,F,i1,Red Shoes,shoes|red,30,1,14
u1,F,i1,Red Shoes,shoes|red,30,0,15
u2,M,i3,Green Bag,bag|green,20,1,16
u3,F,i2,Blue Hat,hat,12.5,0,17
u1,F,i3,Green Bag,bag|green,20,1,18
u2,M,i1,Red Shoes,shoes|red,30,0,19
u3,F,i3,Green Bag,bag|green,20,1,20
"""
GENERIC_SCHEMA = """
data: clicks.csv
item_noun: product
history_action: bought
label: click
timestamp: ts
user: user
item: item
history: {text_field: title}
fields:
  - {name: user, kind: categorical, side: user}
  - {name: gender, kind: categorical, side: user, text: gender, values: {F: female, M: male}}
  - {name: item, kind: categorical, side: item}
  - {name: title, kind: categorical, side: item, text: title}
  - {name: tags, kind: multi_valued, side: item, text: tags}
  - {name: price, kind: numeric, side: item, text: price}
"""


def write_generic(directory: Path, csv: str = GENERIC_CSV, schema: str = GENERIC_SCHEMA) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "clicks.csv").write_text(csv)
    (directory / "schema.yaml").write_text(schema)
    return directory / "schema.yaml"
