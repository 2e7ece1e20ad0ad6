"""Choose the stage-1 recipe on validation: DCN, seed 0, ML-100K; stage 2 is the shipped finetune.yaml (DCN).

    python -m benchmarks recipe_sweep --data_dir ../shared/data/ml-100k [--runs '[base,b1024_e10_tau0.1]']

Each run trains stage 1 with the overrides below (all explicit, so the result does not depend on the
shipped defaults), then stage 2 from its best checkpoint, and records the best validation AUC of stage 2
(the decision) next to its test metrics (reported, never used to choose). Results are appended to
`--out/results.jsonl`; a rerun skips recorded runs; the table goes to benchmarks/stage1_design/recipe_sweep_ml100k.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.common import command
from ctrl.app.lightning_cli import lightning_cli
from ctrl.app.report import cpu_model
from tabular2text.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "ml100k"
STAGES = ROOT / "configs" / "stages"


def align(batch: int, eval_batch: int, epochs: int, tau: float, *extra: str) -> list[str]:
    return ["--data.batch_size", str(batch), "--data.eval_batch_size", str(eval_batch), "--trainer.max_epochs",
            str(epochs), "--model.init_args.temperature", str(tau), *extra]


RUNS: dict[str, list[str] | None] = {
    "base": None,  # stage 2 from scratch
    "b4096_e3_tau0.7": align(4096, 8192, 3, 0.7),
    "b4096_e3_tau0.1": align(4096, 8192, 3, 0.1),
    "b1024_e10_tau0.7": align(1024, 8192, 10, 0.7),
    "b1024_e10_tau0.1": align(1024, 8192, 10, 0.1),
}


def one(name: str, data_dir: str, out: Path) -> dict:
    common = ["--data.data_dir", data_dir, "--seed_everything", "0", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false"]
    start, init, stage1 = time.perf_counter(), [], {}
    if RUNS[name] is not None:
        cli = lightning_cli(["--config", str(STAGES / "align.yaml"), "--config", str(CONFIGS / "align.yaml"), *common,
                             "--trainer.default_root_dir", str(out / name / "align"), *RUNS[name]], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        init = ["--model.init_args.init_from", cli.trainer.checkpoint_callback.best_model_path]
        stage1 = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    stage1_s = time.perf_counter() - start
    cli = lightning_cli(["--config", str(STAGES / "finetune.yaml"), "--config", str(CONFIGS / "finetune.yaml"), *common,
                         "--trainer.default_root_dir", str(out / name / "finetune"), *init], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (test,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    return {"name": name, "overrides": RUNS[name], "val_auc": float(cli.trainer.checkpoint_callback.best_model_score),
            "test": {k: float(v) for k, v in test.items()}, "stage1_val": stage1, "stage1_s": stage1_s}


def write_table(records: list[dict], path: Path, command: str) -> None:
    lines = ["# Choosing the stage-1 recipe on validation (DCN, seed 0, ML-100K)", "",
             f"Produced by `{command}` on {cpu_model()}, "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}. Decided on stage-2 validation AUC;"
             " the test columns are shown, never used to choose. One seed: differences below ~0.005 AUC are within"
             " seed noise. Stage-1 seconds are wall time while other jobs shared the two cores.", "",
             "| run | stage-1 overrides | stage-1 val retrieval top-1 | stage-2 val AUC | test AUC | test logloss |"
             " cold AUC | stage 1 s |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        top1 = r["stage1_val"].get("val/retrieval_top1")
        lines.append(f"| {r['name']} | {' '.join(r['overrides'] or ['(none: from scratch)'])} | "
                     f"{'' if top1 is None else f'{top1:.3f}'} | {r['val_auc']:.4f} | {r['test']['test/auc']:.4f} | "
                     f"{r['test']['test/logloss']:.4f} | {r['test']['test_cold/auc']:.4f} | {r['stage1_s']:.0f} |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(data_dir: str = "../shared/data/ml-100k", out: str = "runs/recipe-sweep", runs: list[str] | None = None,
         table: str = str(Path(__file__).with_suffix(".md"))) -> None:
    """Run the named recipes (default: all) that are not recorded yet, then write the table.

    Args:
        data_dir: the MovieLens-100K folder.
        out: run folders and results.jsonl.
        runs: names from RUNS.
        table: the markdown file to write.
    """
    unknown = sorted(set(runs or []) - set(RUNS))
    if unknown:
        raise SystemExit(f"error: unknown runs {unknown}; choose from {', '.join(RUNS)}")
    args = SimpleNamespace(data_dir=data_dir, out=out, runs=runs or list(RUNS), table=table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {json.loads(line)["name"] for line in results.read_text().splitlines()} if results.exists() else set()
    for name in args.runs:
        if name not in done:
            record = one(name, args.data_dir, out)
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
    records = [json.loads(line) for line in results.read_text().splitlines()]
    write_table(records, Path(args.table), command())

