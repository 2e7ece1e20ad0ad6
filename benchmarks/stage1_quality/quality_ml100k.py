"""The quality study on MovieLens-100K (benchmarks/stage1_quality/quality_ml100k.md), from `ctrl bench` result stores.

    python -m benchmarks quality --stores '{"fold 0": "runs/bench-r2/results.jsonl",
        "fold 1": "runs/bench-fold1/results.jsonl"}' --tuning runs/tune-base/results.jsonl

Three tables, all on validation AUC (test is never read here):
- stage-1 variants per fold: what stage 1 solves (retrieval top-1, linear-probe AUC, both at its last epoch)
  next to what stage 2 gains over the from-scratch baseline on the same seeds;
- the stage-1 curve: per epoch of the 10-epoch runs, retrieval top-1, validation loss and probe AUC;
- the baseline's tuning: every stage-2 setting per backbone, the best one marked.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.common import command
from ctrl.app.report import mean_std, read_records
from tabular2text.atomic import atomic_write_text

STAGE1 = ("align/val/retrieval_top1", "align/val/probe_auc")


def by_run(rows: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    out: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for r in rows:
        out[(r["backbone"], r["variant"])][r["seed"]] = r
    return out


def cell(values: list[float], digits: int = 4) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def gain(runs: dict[int, dict], ref: dict[int, dict]) -> tuple[str, int]:
    seeds = sorted(set(runs) & set(ref))
    diffs = [runs[s]["metrics"]["val/auc"] - ref[s]["metrics"]["val/auc"] for s in seeds]
    return (f"{np.mean(diffs):+.4f}" if diffs else "-"), len(diffs)


def variants_table(label: str, rows: list[dict]) -> list[str]:
    runs = by_run(rows)
    lines = [f"### {label}", "", "| backbone | variant | seeds | retrieval top-1 | probe AUC | val AUC |"
             " val AUC - base's (seeds) | stage-1 epochs |", "|---|---|---|---|---|---|---|---|"]
    for (backbone, variant), seeds in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1] != "base", kv[0][1])):
        ms = [seeds[s]["metrics"] for s in sorted(seeds)]
        delta, n = gain(seeds, runs.get((backbone, "base"), {})) if variant != "base" else ("", 0)
        epochs = sorted({seeds[s]["epochs"].get("align", 0) for s in seeds})
        lines.append(f"| {backbone} | {variant} | {len(ms)} | {cell([m.get(STAGE1[0], np.nan) for m in ms], 3)} |"
                     f" {cell([m.get(STAGE1[1], np.nan) for m in ms])} | {cell([m['val/auc'] for m in ms])} |"
                     f" {delta}{f' ({n})' if n else ''} | {','.join(map(str, epochs)) if epochs != [0] else '-'} |")
    return [*lines, ""]


def curve_table(rows: list[dict]) -> list[str]:
    """Mean over the runs with a 10-epoch curve, per backbone and epoch."""
    curves: dict[str, list[list[dict]]] = defaultdict(list)
    for r in rows:
        curve = r.get("align_curve") or []
        if len(curve) >= 10 and len({c["epoch"] for c in curve}) == len(curve):  # one validation per epoch
            curves[r["backbone"]].append(curve)
    lines = ["| backbone | runs | epoch | retrieval top-1 | val loss | probe AUC |", "|---|---|---|---|---|---|"]
    for backbone, runs in sorted(curves.items()):
        for epoch in range(min(len(c) for c in runs)):
            at = [c[epoch] for c in runs]
            top1 = cell([a["val/retrieval_top1"] for a in at], 3)
            probe = cell([a.get("val/probe_auc", np.nan) for a in at])
            lines.append(f"| {backbone} | {len(runs)} | {epoch + 1} | {top1} | {cell([a['val/loss'] for a in at], 3)}"
                         f" | {probe} |")
    return [*lines, ""] if curves else ["(no 10-epoch stage-1 run with a recorded curve)", ""]


def tuning_table(rows: list[dict]) -> list[str]:
    runs = by_run(rows)
    lines = ["| backbone | setting | seeds | val AUC | val AUC - shipped's (seeds) |", "|---|---|---|---|---|"]
    for backbone in sorted({b for b, _ in runs}):
        shipped = runs.get((backbone, "base"), {})
        settings = sorted((v, s) for (b, v), s in runs.items() if b == backbone)
        means = {v: np.mean([r["metrics"]["val/auc"] for r in s.values()]) for v, s in settings if len(s) >= 3}
        best = max(means, key=means.get) if means else None
        for variant, seeds in settings:
            delta, n = gain(seeds, shipped) if variant != "base" else ("", 0)
            name = f"**{variant}**" if variant == best else variant
            val = cell([r["metrics"]["val/auc"] for r in seeds.values()])
            lines.append(f"| {backbone} | {name} | {len(seeds)} | {val} | {delta}{f' ({n})' if n else ''} |")
    return [*lines, ""]


def main(*, stores: dict[str, str], tuning: str | None = None, out: str = "benchmarks/stage1_quality/quality_ml100k.md",
         notes: str | None = "benchmarks/stage1_quality/quality_notes.md",
         title: str = "Quality study on MovieLens-100K: what stage 1 learns, when it helps, against a tuned baseline",
         ) -> None:
    """Write the quality study.

    Args:
        stores: label -> a `ctrl bench` results.jsonl (e.g. one per validation fold).
        tuning: a `ctrl bench` results.jsonl of the baseline's stage-2 settings (benchmarks/tune_base/).
        out: the markdown file to write.
        notes: a markdown file appended verbatim when it exists (the reading of the tables).
        title: the report's heading.
    """
    text = [f"# {title}", "",
            f"Written by `{command()}`. Validation AUC only (test is never read here); mean ± sample std over seeds;"
            " differences are paired by seed.", "", "## Stage-1 variants: what stage 1 solves, what stage 2 gains", ""]
    everything = []
    for label, path in stores.items():
        rows = read_records(Path(path))
        everything += rows
        text += variants_table(label, rows)
    text += ["## The stage-1 curve (10-epoch runs, per epoch)", "", *curve_table(everything)]
    if tuning:
        text += ["## Tuning the from-scratch baseline (stage 2 only, shipped settings = `base`)", "",
                 *tuning_table(read_records(Path(tuning)))]
    if notes and Path(notes).is_file():
        text += [Path(notes).read_text()]
    atomic_write_text(Path(out), "\n".join(text))
    print(f"wrote {out}")

