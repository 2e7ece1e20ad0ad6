"""The benchmark's store and report: results.jsonl (one line per finished run), the statistics over seeds
(mean, std, RelaImpr, paired t-test), and RESULTS.md with its PNG. `ctrl bench` runs, this module reports;
`ctrl bench --report_only true` reports alone.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from tabular2text.atomic import atomic_path, atomic_write_text
from towers.encoder import BF16_CPU_FLAGS, cpu_flags, cpuinfo, onednn_cap

BASE, CTRL = "base", "ctrl"
SLICES = {"test": "all test rows", "test_cold": "cold start (test rows whose user or item is unseen in train)"}


def read_records(path: Path) -> list[dict]:
    """The runs in results.jsonl; a line that is not complete JSON (an interrupted write) is skipped."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"bench: warning: {path}:{number} is not a complete record (interrupted write?), ignored")
    return records


def append_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # After a write cut short, start on a line of our own rather than glue this record to the fragment.
    broken = path.is_file() and path.stat().st_size > 0 and path.read_bytes()[-1:] != b"\n"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(("\n" if broken else "") + json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def command_line() -> str:
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def cpu_model() -> str:
    """The CPU's model name and the instructions that decide our speed on it (bf16 in AMX or AVX512, else AVX2),
    from /proc/cpuinfo where there is one: "Intel(R) Xeon(R) Processor with AMX, AVX512-BF16"."""
    flags = cpu_flags()
    shown = [label for flag, label in BF16_CPU_FLAGS.items() if flag in flags] or (["AVX2"] if "avx2" in flags else [])
    name = cpuinfo("model name") or platform.processor() or platform.machine()
    cap = onednn_cap()
    return (f"{name} with {', '.join(shown)}" if shown else name) + (f" (oneDNN capped at {cap})" if cap else "")


def machine() -> str:
    """One line for a report: CPU, cores, GPU (when torch sees one), architecture and the versions that decide
    speed and results."""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu_model()}, {os.cpu_count()} cores ({platform.machine()}){gpu}, torch {torch.__version__},"
            f" Lightning {pl.__version__}, Python {platform.python_version()}")


def trained_on(records: list[dict]) -> str:
    """The machines recorded with the runs (runs recorded before machines were: counted as not recorded)."""
    counts = Counter(r.get("machine", "not recorded") for r in records)
    return "; ".join(f"{name} ({n} runs)" for name, n in counts.items())


# --- statistics ---------------------------------------------------------------------------------------------
def by_seed(records: list[dict], variant: str, backbone: str, metric: str) -> dict[int, float]:
    """seed -> metric of the runs of one variant and backbone (a rerun's later line wins)."""
    return {r["seed"]: r["metrics"][metric] for r in records
            if r["variant"] == variant and r["backbone"] == backbone and metric in r["metrics"]}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for fewer than two values)."""
    array = np.asarray(values, dtype=float)
    mean = float(array.mean()) if len(array) else float("nan")
    return mean, float(array.std(ddof=1)) if len(array) > 1 else float("nan")


def rela_impr(auc: float, base_auc: float) -> float:
    """RelaImpr in percent: ((AUC - 0.5) / (AUC_base - 0.5) - 1) x 100; NaN when the base is no better than
    chance (AUC <= 0.5), where the ratio's sign flips and the number means nothing."""
    return ((auc - 0.5) / (base_auc - 0.5) - 1) * 100 if base_auc > 0.5 else float("nan")


def gain_text(auc: float, base_auc: float) -> str:
    """RelaImpr, or the plain AUC difference, marked, when RelaImpr is undefined."""
    gain = rela_impr(auc, base_auc)
    return f"ΔAUC {auc - base_auc:+.4f} (base AUC <= 0.5: RelaImpr undefined)" if np.isnan(gain) else f"{gain:+.2f}%"


def compare(records: list[dict], backbone: str, metric: str) -> dict[str, float] | None:
    """CTRL vs base on the seeds both have: means, stds and the paired t-test p-value (one-sided, alternative:
    CTRL's metric is greater), or None without a shared seed."""
    from scipy.stats import ttest_rel  # the `bench` extra, like matplotlib

    base, ctrl = by_seed(records, BASE, backbone, metric), by_seed(records, CTRL, backbone, metric)
    shared = sorted(set(base) & set(ctrl))
    if not shared:
        return None
    b, c = [base[s] for s in shared], [ctrl[s] for s in shared]
    (b_mean, b_std), (c_mean, c_std) = mean_std(b), mean_std(c)
    p = float(ttest_rel(c, b, alternative="greater").pvalue) if len(shared) > 1 else float("nan")
    return {"seeds": len(shared), "base": b_mean, "base_std": b_std, "ctrl": c_mean, "ctrl_std": c_std, "p": p}


def trial_scores(records: list[dict], arm: str, backbone: str, seeds: list[int] | None = None,
                 trials: int | None = None) -> dict[int, dict]:
    """trial index -> {"values", "val_auc" (mean best-checkpoint validation AUC over its seeds), "seeds"} of
    one arm's tuning trials on one backbone (`ctrl bench --tune true`), on `seeds` and the first `trials` trials
    when given (the current search, when the store also holds an earlier one's). Only validation is read."""
    scores: dict[int, dict] = {}
    for r in records:
        trial = r.get("trial")
        if (trial is None or trial["arm"] != arm or r["backbone"] != backbone or (seeds is not None and
                r["seed"] not in seeds) or (trials is not None and trial["index"] >= trials)):
            continue
        entry = scores.setdefault(trial["index"], {"values": trial["values"], "by_seed": {}})
        entry["by_seed"][r["seed"]] = r["metrics"]["val/auc"]  # a rerun's later line wins
    for entry in scores.values():
        by_seed = entry.pop("by_seed")
        entry["seeds"], entry["val_auc"] = sorted(by_seed), mean_std(list(by_seed.values()))[0]
    return dict(sorted(scores.items()))


def tuning_winner(scores: dict[int, dict]) -> int | None:
    """The trial with the best mean validation AUC (ties: the first); None without a defined one."""
    defined = [i for i, entry in scores.items() if not np.isnan(entry["val_auc"])]
    return max(defined, key=lambda i: scores[i]["val_auc"]) if defined else None


# --- report -------------------------------------------------------------------------------------------------
def pm(mean: float, std: float) -> str:
    return f"{mean:.4f}" if np.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def p_text(p: float) -> str:
    return "n/a" if np.isnan(p) else f"{p:.3g}"


def comparison_table(records: list[dict], backbones: list[str], slice_: str) -> list[str]:
    lines = ["| backbone | seeds | base AUC | CTRL AUC | RelaImpr | p (paired t, one-sided: CTRL > base)"
             " | base logloss | CTRL logloss | rows (clicks) |", "|---|---|---|---|---|---|---|---|---|"]
    for backbone in backbones:
        auc, logloss = (compare(records, backbone, f"{slice_}/{m}") for m in ("auc", "logloss"))
        if auc is None:
            continue
        base_loss, ctrl_loss = (pm(logloss[v], logloss[f"{v}_std"]) for v in (BASE, CTRL)) if logloss else ("n/a",) * 2
        lines.append(f"| {backbone} | {auc['seeds']} | {pm(auc['base'], auc['base_std'])}"
                     f" | {pm(auc['ctrl'], auc['ctrl_std'])} | {gain_text(auc['ctrl'], auc['base'])}"
                     f" | {p_text(auc['p'])} | {base_loss} | {ctrl_loss} | {slice_size(records, backbone, slice_)} |")
    return lines if len(lines) > 2 else ["No backbone has runs of both variants with this slice."]


def slice_size(records: list[dict], backbone: str, slice_: str) -> str:
    """The slice's test rows and clicks, as its runs recorded them ("n/a" for runs recorded before they were)."""
    run = next((r["metrics"] for r in records if r["backbone"] == backbone and r["variant"] in (BASE, CTRL)
                and f"{slice_}/rows" in r["metrics"]), None)
    return f"{run[f'{slice_}/rows']:,.0f} ({run[f'{slice_}/positives']:,.0f})" if run else "n/a"


def variants_table(records: list[dict], backbones: list[str]) -> list[str]:
    """Every variant per backbone; the best by validation AUC (paired with ctrl on shared seeds) in bold."""
    lines = ["| backbone | variant | seeds | val AUC | val AUC - ctrl's (same seeds) | test AUC | overrides |",
             "|---|---|---|---|---|---|---|"]
    for backbone in backbones:
        # the tuning trials have a section of their own
        names = list(dict.fromkeys(r["variant"] for r in records if r["backbone"] == backbone and "trial" not in r))
        ctrl_val = by_seed(records, CTRL, backbone, "val/auc")
        rows = []
        for name in names:
            val, test = by_seed(records, name, backbone, "val/auc"), by_seed(records, name, backbone, "test/auc")
            shared = sorted(set(val) & set(ctrl_val))
            delta = float(np.mean([val[s] - ctrl_val[s] for s in shared])) if shared else float("nan")
            run = next(r for r in records if r["variant"] == name and r["backbone"] == backbone)
            overrides = "; ".join(f"{stage}: {shlex.join(a)}" for stage, a in run["overrides"].items() if a)
            rows.append([name, len(val), pm(*mean_std(list(val.values()))), delta, pm(*mean_std(list(test.values()))),
                         f"`{overrides}`" if overrides else "defaults"])
        deltas = [row[3] for row in rows if not np.isnan(row[3])]
        for name, n, val, delta, test, overrides in rows:
            best = bool(deltas) and delta == max(deltas)
            shown = "n/a" if np.isnan(delta) else f"{delta:+.4f}"
            lines.append(f"| {backbone} | {f'**{name}**' if best else name} | {n} | {val} | {shown} | {test}"
                         f" | {overrides} |")
    return lines


def phases_table(records: list[dict]) -> list[str]:
    """Mean seconds per phase and variant, over the runs that have the phase ("-": the variant has none)."""
    phases = list(dict.fromkeys(p for r in sorted(records, key=lambda r: -len(r["phases"])) for p in r["phases"]))
    lines = [f"| variant | runs | {' | '.join(phases)} | total |", "|---" * (len(phases) + 3) + "|"]
    for name in dict.fromkeys(map(phase_group, records)):
        runs = [r for r in records if phase_group(r) == name]
        cells, total = [], 0.0
        for phase in phases:
            seconds = [r["phases"][phase] for r in runs if phase in r["phases"]]
            total += float(np.mean(seconds)) if seconds else 0.0
            cells.append(f"{np.mean(seconds):.1f}" if seconds else "-")
        lines.append(f"| {name} | {len(runs)} | {' | '.join(cells)} | {total:.1f} |")
    return lines


def phase_group(record: dict) -> str:
    """The row of a run in the phases table: its variant, or its arm's tuning trials taken together."""
    return f"{record['trial']['arm']} tuning trials" if "trial" in record else record["variant"]


def tuning_section(records: list[dict], backbones: list[str]) -> list[str]:
    """The search of `ctrl bench --tune true` (grid, trials, seeds), every trial's validation AUC per arm and
    backbone and each arm's choice (in bold); empty when the store holds no tuning trials."""
    trials = [r for r in records if "trial" in r]
    if not trials:
        return []
    grid = trials[-1]["grid"]
    names = list(trials[-1]["trial"]["values"])
    arms = list(dict.fromkeys(r["trial"]["arm"] for r in trials))
    lines = ["## Tuning: each arm's stage 2 searched on validation, the same trials for both", "",
             f"Grid: {', '.join(f'{n} {grid[n]}' for n in names)}; {grid['trials']} trial(s) drawn with seed"
             f" {grid['seed']}, each trained with seeds {grid['seeds']}. Per arm and backbone the trial with the best"
             " mean best-checkpoint validation AUC over those seeds is chosen (in bold) and trained over the"
             " benchmark's seeds as the `base` / `ctrl` rows above; test metrics are not read. The tuning run"
             " writes the chosen values as config overlays under its `--out`, in `tuned/` (`finetune/BACKBONE.yaml`:"
             " the baseline, `finetune_aligned/BACKBONE.yaml`: CTRL's stage 2), to copy into a config directory.", ""]
    for backbone in backbones:
        scores = {arm: trial_scores(records, arm, backbone) for arm in arms}
        if not any(scores.values()):
            continue
        winners = {arm: tuning_winner(scores[arm]) for arm in arms}
        lines += [f"### {backbone}", "", f"| trial | {' | '.join(names)} | "
                  + " | ".join(f"{arm} val AUC (seeds)" for arm in arms) + " |", "|---" * (len(names) + len(arms) + 1)
                  + "|"]
        for index in sorted({i for arm in arms for i in scores[arm]}):
            values = next(scores[arm][index]["values"] for arm in arms if index in scores[arm])
            cells = []
            for arm in arms:
                entry = scores[arm].get(index)
                cell = "-" if entry is None else f"{entry['val_auc']:.4f} ({len(entry['seeds'])})"
                cells.append(f"**{cell}**" if index == winners[arm] else cell)
            lines.append(f"| {index} | {' | '.join(f'{values[n]:g}' for n in names)} | {' | '.join(cells)} |")
        chosen = [f"{arm}: trial {w} ({', '.join(f'{n} {v:g}' for n, v in scores[arm][w]['values'].items())})"
                  for arm, w in winners.items() if w is not None]
        lines += ["", f"Chosen: {'; '.join(chosen)}.", ""]
    return lines


def write_plot(records: list[dict], backbones: list[str], path: Path) -> None:
    """Test AUC, mean with std error bars over the shared seeds, base vs CTRL per backbone."""
    from matplotlib.figure import Figure  # renders with Agg; no pyplot, no display

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    stats = {b: compare(records, b, "test/auc") for b in backbones}  # as in the table: the shared seeds
    shown = [b for b in backbones if stats[b]]
    for offset, key, label in ((-0.1, "base", "from scratch"), (0.1, "ctrl", "CTRL")):
        ax.errorbar(np.arange(len(shown)) + offset, [stats[b][key] for b in shown],
                    yerr=[np.nan_to_num(stats[b][f"{key}_std"]) for b in shown], fmt="o", capsize=4, label=label)
    ax.set_xticks(np.arange(len(shown)), shown)
    ax.set_xlim(-0.5, len(shown) - 0.5)
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def included(paths: list[Path]) -> list[str]:
    """Markdown files verbatim, those that exist."""
    return [line for path in paths if path.is_file()
            for line in (f"<!-- included verbatim from {path} -->", "", path.read_text().rstrip("\n"), "")]


def write_report(records: list[dict], backbones: list[str], report: Path, plot: Path, include: list[Path],
                 results: Path, preface: list[Path] = ()) -> None:
    """RESULTS.md and the PNG from the recorded runs: the preface files (the verdict), the tables, the
    included files."""
    shown = [b for b in backbones if any(r["backbone"] == b for r in records)]
    write_plot(records, shown, plot)
    plot_link = os.path.relpath(plot.resolve(), report.resolve().parent)
    commands = list(dict.fromkeys(r["command"] for r in records))
    text = [
        "# Benchmark: CTRL vs the same backbone trained from scratch",
        "",
        f"Written by `{command_line()}` from `{results}` ({len(records)} runs) on {datetime.now():%Y-%m-%d}.",
        f"Machines that trained the runs: {trained_on(records)}.",
        "",
        "Per backbone, over the seeds both variants ran: mean ± sample std (ddof 1) of the best-on-validation"
        " checkpoint's test metrics; RelaImpr = ((AUC_CTRL - 0.5) / (AUC_base - 0.5) - 1) x 100 of the means;"
        " p from scipy.stats.ttest_rel on the per-seed AUCs paired by seed, one-sided (alternative: CTRL > base);"
        " rows (clicks): the slice's size as its runs logged it (n/a: runs recorded before they logged it).",
        "",
        *included(list(preface)),
    ]
    for slice_, title in SLICES.items():
        text += [f"## Test AUC and logloss: {title}", "", *comparison_table(records, shown, slice_), ""]
    text += [f"![test AUC, base vs CTRL]({plot_link})", "", *tuning_section(records, shown),
             "## Variants (ablations), decided on validation AUC", "",
             "Best-checkpoint validation AUC per variant; the column after it is the mean per-seed difference to"
             " `ctrl` on the seeds both ran, and the variant with the largest one is in bold. Test AUC is shown"
             " for information only and picks nothing.", "",
             *variants_table(records, shown), "",
             "## Wall time per phase (seconds, mean over runs)", "", *phases_table(records), "",
             "## Commands that trained the runs", "", *[f"    {c}" for c in commands], "", *included(include)]
    atomic_write_text(report, "\n".join(text))
    print(f"bench: wrote {report} and {plot}")
