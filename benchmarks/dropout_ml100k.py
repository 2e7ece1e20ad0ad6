"""Round 2l's choice of stage 2's dropout, for the baseline and for CTRL, on validation (never test).

    python benchmarks/dropout_ml100k.py

Reads the `ctrl bench` stores named in STORES (each variant name mapped to the arm and dropout it ran with in that
store: the names changed between rounds) and writes benchmarks/dropout_ml100k.md. The runs: fold 1, round 2k's
store and `dropout_fold1_ml100k.jsonl`; fold 0, the headline store `results_ml100k.jsonl`, trained under round 2l's
names and renamed (see STORES); REPRODUCE retrains it under the shipped names. The rule was written in
benchmarks/quality_notes.md before any of round 2l's runs:
- a fold's score for an (arm, dropout) is its mean validation AUC pooled over 4 backbones x 10 seeds;
- the baseline takes the candidate with the best mean of the two folds' scores if it beats 0.3 on both folds
  and on more than half of the (fold, backbone, seed) pairs, else 0.3 stays;
- CTRL takes the better of 0.5 and 0.7 by the same mean of fold scores; 0.8 (fold 0 only) is a bracket.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from jsonargparse import auto_cli

from ctrl.app.report import read_records
from tabular2text.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parent
BACKBONES = ("wide_deep", "deepfm", "dcn", "autoint")
# fold -> [(store, {variant name in that store: (arm, dropout)})]. Fold 0's runs are the headline's, under the names
# of the shipped choice (base: 0.8, ctrl: 0.7); round 2k's fold-1 store names CTRL at 0.5 `ctrl_dropout_0.5`.
STORES = {
    "fold 0": [("results_ml100k.jsonl", {
        "base_dropout_0.3": ("base", 0.3), "base_dropout_0.5": ("base", 0.5), "base_dropout_0.7": ("base", 0.7),
        "base": ("base", 0.8), "ctrl_dropout_0.5": ("ctrl", 0.5), "ctrl": ("ctrl", 0.7),
        "ctrl_dropout_0.8": ("ctrl", 0.8)})],
    "fold 1": [("stage2_fold1_10seeds_ml100k.jsonl", {
        "base": ("base", 0.3), "base_dropout_0.7": ("base", 0.7), "ctrl_dropout_0.5": ("ctrl", 0.5),
        "ctrl_dropout_0.7": ("ctrl", 0.7)}),
               ("dropout_fold1_ml100k.jsonl", {"base_dropout_0.5": ("base", 0.5), "base_dropout_0.8": ("base", 0.8)})],
}
REPRODUCE = ("ctrl bench --config configs/bench/ml100k.yaml --data_dir ../shared/data/ml-100k --seeds '[S,S+1]'"
             " --ablation_seeds '[S,S+1]' --ablation_backbones '[wide_deep,deepfm,dcn,autoint]' --variants"
             " base,base_dropout_0.3,base_dropout_0.5,base_dropout_0.7,ctrl,ctrl_dropout_0.5,ctrl_dropout_0.8")
REFERENCE = {"base": 0.3, "ctrl": 0.5}
CANDIDATES = {"base": (0.3, 0.5, 0.7, 0.8), "ctrl": (0.5, 0.7)}


def val_aucs(stores: dict) -> dict[tuple[str, str, float], dict[tuple[str, int], float]]:
    """(fold, arm, dropout) -> {(backbone, seed): best-checkpoint validation AUC}."""
    out: dict[tuple[str, str, float], dict[tuple[str, int], float]] = {}
    for fold, entries in stores.items():
        for store, names in entries:
            for r in read_records(ROOT / store):
                if r["variant"] in names and r["backbone"] in BACKBONES:
                    arm, dropout = names[r["variant"]]
                    out.setdefault((fold, arm, dropout), {})[(r["backbone"], r["seed"])] = r["metrics"]["val/auc"]
    return out


def paired(a: dict, b: dict) -> tuple[float, int, int]:
    """Mean of a - b over the keys both hold, how many of them are above 0, how many there are."""
    keys = sorted(set(a) & set(b))
    d = np.array([a[k] - b[k] for k in keys])
    return (float(d.mean()) if keys else float("nan")), int((d > 0).sum()), len(keys)


def tables(runs: dict, folds: list[str]) -> list[str]:
    lines = []
    for arm in ("base", "ctrl"):
        ref = REFERENCE[arm]
        lines += [f"### {arm}: validation AUC per dropout (mean over seeds), and paired against dropout {ref}", "",
                  "| fold | dropout | seeds | " + " | ".join(BACKBONES) + f" | pooled | pooled - {ref} (pairs above) |",
                  "|---|---|---|" + "---|" * len(BACKBONES) + "---|---|"]
        for fold in folds:
            for dropout in sorted({d for (f, a, d) in runs if f == fold and a == arm}):
                cells = runs[(fold, arm, dropout)]
                per = [np.mean([v for (b, _), v in cells.items() if b == bb] or [np.nan]) for bb in BACKBONES]
                seeds = len({s for (_, s) in cells})
                diff, above, n = paired(cells, runs.get((fold, arm, ref), {}))
                vs = "" if dropout == ref else f"{diff:+.4f} ({above}/{n})"
                lines.append(f"| {fold} | {dropout} | {seeds} | " + " | ".join(f"{p:.4f}" for p in per)
                             + f" | {np.mean(list(cells.values())):.4f} | {vs} |")
        lines.append("")
    return lines


def decide(runs: dict, folds: list[str]) -> list[str]:
    lines = ["### The rule applied", ""]
    chosen = {}
    for arm in ("base", "ctrl"):
        scores = {d: [np.mean(list(runs[(f, arm, d)].values())) for f in folds]
                  for d in CANDIDATES[arm] if all((f, arm, d) in runs for f in folds)}
        best = max(scores, key=lambda d: np.mean(scores[d]))
        text = ", ".join(f"{d}: {np.mean(s):.4f}" for d, s in scores.items())
        if arm == "base" and best != REFERENCE[arm]:
            per_fold = {f: paired(runs[(f, arm, best)], runs[(f, arm, REFERENCE[arm])]) for f in folds}
            above, n = sum(p[1] for p in per_fold.values()), sum(p[2] for p in per_fold.values())
            ok = all(p[0] > 0 for p in per_fold.values()) and above > n / 2
            beats = " and ".join(f"{f} ({p[0]:+.4f})" for f, p in per_fold.items())
            verdict = (f"{best} beats {REFERENCE[arm]} on {beats}, above it in {above}/{n} pairs: "
                       + ("shipped" if ok else f"not enough, {REFERENCE[arm]} stays"))
            best = best if ok else REFERENCE[arm]
        else:
            verdict = f"{best} is the better"
        chosen[arm] = best
        lines.append(f"- {arm}: mean of the fold scores: {text}. {verdict}.")
    lines.append("")
    lines.append("### CTRL against the baseline, each at its chosen dropout (validation AUC, paired)")
    lines.append("")
    lines += ["| fold | " + " | ".join(BACKBONES) + " | pooled |", "|---|" + "---|" * len(BACKBONES) + "---|"]
    for f in folds:
        c, b = runs.get((f, "ctrl", chosen["ctrl"]), {}), runs.get((f, "base", chosen["base"]), {})
        cells = []
        for bb in BACKBONES:
            diff, above, n = paired({k: v for k, v in c.items() if k[0] == bb}, b)
            cells.append(f"{diff:+.4f} ({above}/{n})")
        diff, above, n = paired(c, b)
        lines.append(f"| {f} | " + " | ".join(cells) + f" | {diff:+.4f} ({above}/{n}) |")
    return lines + [""]


def main(out: str = str(ROOT / "dropout_ml100k.md")) -> None:
    """Write the decision tables.

    Args:
        out: the markdown file to write.
    """
    runs = val_aucs(STORES)
    folds = list(STORES)
    lines = ["# Stage 2's dropout for the baseline and for CTRL (round 2l), on validation", "",
             "Written by `python " + " ".join(["benchmarks/dropout_ml100k.py", *sys.argv[1:]]) + "` from "
             + ", ".join(f"`{s}`" for entries in STORES.values() for s, _ in entries)
             + ". Validation AUC of the best checkpoint; 4 backbones; pairs are (backbone, seed); test is not read.",
             "", "Fold 0's runs are the headline's (`RESULTS.md`); under the shipped names they are retrained, seed"
             " pair by seed pair (S = 0, 2, 4, 6, 8), by", "", "    " + REPRODUCE, ""]
    lines += tables(runs, folds) + decide(runs, folds)
    atomic_write_text(Path(out), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    auto_cli(main)
