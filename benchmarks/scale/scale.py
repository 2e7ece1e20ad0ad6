"""The scale benchmark: a 1M-rating MovieLens-1M-format table through prepare, encoding, stage 1 and stage 2.

    python -m benchmarks synthetic_ml1m --out /tmp/ml-1m-synthetic --ratings 1000000
    python -m benchmarks scale --data_dir /tmp/ml-1m-synthetic --work /tmp/scale

Every phase runs as its own `ctrl` (or python) process under `/usr/bin/time`, so its wall time and peak
resident memory (max RSS) are the process's own:
  prepare        `ctrl prepare` on an empty cache (read, history, labels, split, vocabularies, text);
  encode_rows    row-level text (the paper's option): every distinct (user, item) sentence pair of train + val is
                 counted, the cache array for all of them is created memory-mapped, and the first
                 `--row_texts` pairs are encoded into it with `FrozenEncoder` (text_precision auto): the memory
                 profile of the full job, for a measured share of its time;
  stage1         `ctrl fit` of configs/stages/ + ml100k/align.yaml, 1 epoch, the default entity text (one text
                 per user and per item, encoding included), under Lightning's simple profiler: its ms per training
                 step and the texts it encoded per second of the module's setup (the model's load included);
  stage2         `ctrl fit` of configs/stages/ + ml100k/finetune.yaml, 1 epoch, from stage 1's checkpoint.
Prints a markdown table of the phases; `scale.md` holds it with the extrapolation. The configs' `accelerator: auto`
trains and encodes on a GPU where torch sees one; the machine line then names it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ctrl.app.report import machine

ENCODE_ROWS = """
import json, sys, time
import numpy as np
from tabular2text.datamodule import CTRDataModule
from towers.language import LanguageTower
from tabular2text.text_vectors import distinct
from towers.encoder import FrozenEncoder
data_dir, limit, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dm = CTRDataModule(data_dir)
first, second = [], []
for split in ("train", "val"):
    a, b = dm.texts(split)
    first += a
    second += b
unique, index = distinct(first, second)
encoder = FrozenEncoder(LanguageTower())
vectors = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(len(unique), encoder.output_dim))
part = unique[:limit]
start = time.perf_counter()
encoder.encode_into(vectors, [t[0] for t in part], [t[1] for t in part], progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"rows": len(first), "distinct": len(unique), "encoded": len(part), "encode_seconds": seconds,
                  "precision": encoder.precision}))
"""


def timed(command: list[str], log: Path, env: dict[str, str]) -> dict:
    """Run `command` under /usr/bin/time; its wall seconds, peak RSS (GB) and stdout."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", *command], stdout=subprocess.PIPE,
                              stderr=fh, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}); see {log}")
    rss = int(re.findall(r"maxrss_kb=(\d+)", log.read_text())[-1]) / 1e6
    return {"seconds": wall, "rss_gb": rss, "stdout": done.stdout}


def profiled(text: str, action: str) -> tuple[float, int]:
    """(total seconds, calls) of one action in Lightning's simple profiler table."""
    row = re.search(rf"\|\s+{re.escape(action)}\s+\|\s+\S+\s+\|\s+(\d+)\s+\|\s+([\d.e+-]+)\s+\|", text)
    if row is None:
        raise RuntimeError(f"no '{action}' in the profiler's table")
    return float(row.group(2)), int(row.group(1))


def main(data_dir: str = "/tmp/ml-1m-synthetic", work: str = "/tmp/scale", row_texts: int = 20000) -> None:
    """Run the phases and print their table.

    Args:
        data_dir: a MovieLens-1M-format folder (`python -m benchmarks synthetic_ml1m` writes one).
        work: scratch folder: the data cache, text cache, runs and logs (emptied first).
        row_texts: row-level texts actually encoded in encode_rows.
    """
    root = Path(work)
    subprocess.run(["rm", "-rf", str(root)], check=True)
    root.mkdir(parents=True)
    env = {**os.environ, "CTRL_CACHE_DIR": str(root / "cache"), "WANDB_MODE": "offline"}
    ctrl = [sys.executable, "-m", "ctrl.app.cli"]
    configs, stages = (Path(__file__).resolve().parents[2] / "configs" / name for name in ("ml100k", "stages"))
    results = {}
    results["prepare"] = timed([*ctrl, "prepare", "--data_dir", data_dir], root / "prepare.log", env)
    results["encode_rows"] = timed([sys.executable, "-c", ENCODE_ROWS, data_dir, str(row_texts),
                                    str(root / "row-vectors.npy")], root / "encode_rows.log", env)
    results["encode_rows"].update(json.loads(results["encode_rows"]["stdout"].strip().splitlines()[-1]))
    common = ["--data.data_dir", data_dir, "--trainer.max_epochs", "1", "--trainer.logger", "false"]
    results["stage1"] = timed([*ctrl, "fit", "--config", str(stages / "align.yaml"), "--config",
                               str(configs / "align.yaml"), *common, "--trainer.profiler", "simple",
                               "--trainer.default_root_dir", str(root / "align")], root / "stage1.log", env)
    profile = results["stage1"]["stdout"] + (root / "stage1.log").read_text()
    steps_seconds, steps = profiled(profile, "run_training_batch")
    setup_seconds, _ = profiled(profile, "[LightningModule]AlignmentModule.setup")
    (texts,) = [np.load(f, mmap_mode="r").shape[0] for f in (root / "cache" / "text-vectors").glob("*/vectors.npy")]
    results["stage1"].update(steps=steps, ms_per_step=1000 * steps_seconds / steps, setup_seconds=setup_seconds,
                             texts=texts)
    results["stage2"] = timed([*ctrl, "fit", "--config", str(stages / "finetune.yaml"), "--config",
                               str(configs / "finetune.yaml"), *common,
                               "--model.init_args.init_from", str(root / "align" / "checkpoints" / "best.ckpt"),
                               "--trainer.default_root_dir", str(root / "finetune")], root / "stage2.log", env)
    meta = json.loads(next((root / "cache" / "prepared").glob("*/meta.json")).read_text())
    rows = {split: v["rows"] for split, v in meta["splits"].items()}
    enc = results["encode_rows"]
    rate = enc["encoded"] / enc["encode_seconds"]
    print(f"machine: {machine()}; data {data_dir}:"
          f" {sum(rows.values()):,} labelled rows ({rows['train']:,} train, {rows['val']:,} val,"
          f" {rows['test']:,} test)")
    print("\n| phase | wall s | peak RSS GB | note |\n|---|---|---|---|")
    print(f"| prepare | {results['prepare']['seconds']:.1f} | {results['prepare']['rss_gb']:.2f} | |")
    print(f"| encode_rows | {enc['seconds']:.1f} | {enc['rss_gb']:.2f} | {enc['encoded']:,} of {enc['distinct']:,}"
          f" distinct train+val pairs encoded in {enc['encode_seconds']:.1f} s,"
          f" {rate:.1f} texts/s ({enc['precision']}); all {enc['distinct']:,}:"
          f" {enc['distinct'] / rate / 60:.0f} min |")
    one = results["stage1"]
    print(f"| stage1 | {one['seconds']:.1f} | {one['rss_gb']:.2f} | 1 epoch: {one['steps']} steps,"
          f" {one['ms_per_step']:.0f} ms a step; setup {one['setup_seconds']:.1f} s encoding {one['texts']:,} entity"
          f" texts ({one['texts'] / one['setup_seconds']:.0f} texts/s, the model's load included) |")
    print(f"| stage2 | {results['stage2']['seconds']:.1f} | {results['stage2']['rss_gb']:.2f} | 1 epoch |")
    (root / "results.json").write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "stdout"}
                                                   for k, v in results.items()} | {"rows": rows}, indent=1))

