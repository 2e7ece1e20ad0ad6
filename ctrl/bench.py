"""The benchmark: per backbone and seed, the backbone from scratch ("base": stage 2 only) vs CTRL ("ctrl":
stage 1 then stage 2), plus named ablations of CTRL; then a report (RESULTS.md and a PNG of test AUC).

    ctrl bench --config configs/bench/ml100k.yaml --data_dir ../shared/data/ml-100k
    ctrl bench --config configs/bench/ml100k.yaml --data_dir ../shared/data/ml-100k --variants coarse_only,fine_only
    ctrl bench --config configs/bench/ml100k.yaml --report_only true

Each run is `ctrl.pipeline.train` with the shipped stage configs plus the variant's overrides and
`--seed_everything SEED`. Every finished run appends one JSON line to `<out>/results.jsonl`; a rerun skips
the runs recorded there, so an interrupted benchmark continues where it stopped. The report reads only
that file. Choices are made on validation AUC; test metrics are reported, never used to pick.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from ctrl.pipeline import STAGE1_PHASE, best_checkpoint, finish_wandb, fit_stage, stage_configs, timed, train
from ctrl.probe import TransferProbe
from finetune.guards import ConfigError
from tabular2text.atomic import atomic_path, atomic_write_text

BASE, CTRL = "base", "ctrl"
RESULTS_FILE = "results.jsonl"
SLICES = {"test": "all test rows", "test_cold": "cold start (test rows whose user or item is unseen in train)"}


@dataclass
class Variant:
    """One arm of the benchmark: which stages run, with which overrides, on which backbones and seeds.

    Args:
        name: the variant's name in results.jsonl, the report and --variants.
        align: run stage 1 first (CTRL); false trains stage 2 from scratch.
        args: overrides of both stages, e.g. ["--data.history_length", "5"] (data options must agree).
        align_args: overrides of stage 1, e.g. ["--model.init_args.fine_weight", "0"].
        finetune_args: overrides of stage 2.
        backbones: backbones it runs on (default: the benchmark's `ablation_backbones`).
        seeds: seeds it runs on (default: the benchmark's `ablation_seeds`).
    """

    name: str
    align: bool = True
    args: list[str] = field(default_factory=list)
    align_args: list[str] = field(default_factory=list)
    finetune_args: list[str] = field(default_factory=list)
    backbones: list[str] | None = None
    seeds: list[int] | None = None


def bench(*, data_dir: str = "data/ml-100k", config_dir: str = "configs/ml100k", out: str = "runs/bench",
          args: tuple[str, ...] = (),
          backbones: tuple[str, ...] = ("wide_deep", "deepfm", "dcn", "autoint"),
          seeds: tuple[int, ...] = (0, 1, 2, 3, 4), ablations: tuple[Variant, ...] = (),
          ablation_backbones: tuple[str, ...] = ("dcn",), ablation_seeds: tuple[int, ...] = (0, 1, 2),
          variants: str = "base,ctrl", report_only: bool = False, report: str = "benchmarks/RESULTS.md",
          plot: str = "benchmarks/results_auc.png",
          include: tuple[str, ...] = ("benchmarks/cost_ml100k.md", "benchmarks/fuxictr_ml100k.md")) -> None:
    """Train base vs CTRL (and selected ablations) per backbone and seed, then write the report.

    Args:
        data_dir: overrides data.data_dir of every stage config.
        config_dir: holds align.yaml and finetune.yaml (the stages' bases) and align/BACKBONE.yaml,
            finetune/BACKBONE.yaml (one overlay per backbone), as `ctrl run` reads them.
        args: overrides of both stages of every run, e.g. ["--trainer.logger", "false"].
        out: one folder per run (`out/VARIANT/BACKBONE/seedN`) and results.jsonl, one line per finished run.
        backbones: backbones of base and ctrl.
        seeds: seeds of base and ctrl (`--seed_everything` of both stages).
        ablations: further variants, run only when named in `variants`.
        ablation_backbones: backbones of an ablation that names none.
        ablation_seeds: seeds of an ablation that names none.
        variants: comma-separated names of the variants to run, or "all".
        report_only: write the report from results.jsonl without training.
        report: the markdown report to write.
        plot: the PNG to write: test AUC, mean and std over seeds, base vs CTRL per backbone.
        include: markdown files appended to the report verbatim when they exist (cost, peer comparisons, notes).
    """
    known = [Variant(BASE, align=False, backbones=list(backbones), seeds=list(seeds)),
             Variant(CTRL, backbones=list(backbones), seeds=list(seeds))]
    for v in ablations:
        known.append(Variant(v.name, v.align, v.args, v.align_args, v.finetune_args,
                             v.backbones or list(ablation_backbones), v.seeds or list(ablation_seeds)))
    results = Path(out) / RESULTS_FILE
    if not report_only:
        for v in select(known, variants):
            for backbone in v.backbones:
                for seed in v.seeds:
                    run_once(v, backbone, seed, [*args, *v.args], data_dir, Path(config_dir), Path(out))
    records = read_records(results)
    if not records:
        print(f"bench: no finished runs in {results}, no report written")
        return
    order = [*backbones, *sorted({r["backbone"] for r in records} - set(backbones))]
    write_report(records, order, Path(report), Path(plot), [Path(p) for p in include], results)


def select(known: list[Variant], names: str) -> list[Variant]:
    """The variants named in a comma-separated list ("all": every one), in the order given."""
    by_name: dict[str, Variant] = {}
    for v in known:
        if v.name in by_name or not re.fullmatch(r"[\w.-]+", v.name):
            raise ConfigError(f"variant name {v.name!r} is taken or not a plain name (letters, digits, _ . -)")
        by_name[v.name] = v
    wanted = list(by_name) if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ConfigError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


def run_once(variant: Variant, backbone: str, seed: int, common_args: list[str], data_dir: str, config_dir: Path,
             out: Path) -> None:
    """Train and evaluate one (variant, backbone, seed) unless results.jsonl already records it."""
    common = ["--seed_everything", str(seed), "--data.data_dir", data_dir, *common_args]
    align_config = stage_configs(config_dir, "align", backbone) if variant.align else None
    finetune_config = stage_configs(config_dir, "finetune", backbone)
    args = {"align_config": align_config, "align_args": [*common, *variant.align_args] if variant.align else [],
            "finetune_config": finetune_config, "finetune_args": [*common, *variant.finetune_args]}
    results = out / RESULTS_FILE
    key = (variant.name, backbone, seed)
    done = {(r["variant"], r["backbone"], r["seed"]): r for r in read_records(results)}
    if key in done:
        recorded = {k: done[key].get(k) for k in args}
        if recorded != args:
            raise ConfigError(f"{results} records {variant.name}/{backbone}/seed {seed} with other configs or"
                             f" arguments ({recorded}, now {args}); run with the same options, another --out, or"
                             " rename the variant")
        print(f"bench: {variant.name}/{backbone}/seed {seed} already in {results}, skipped")
        return

    run_dir = out / variant.name / backbone / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # what an interrupted attempt left behind
    print(f"bench: {variant.name}/{backbone}/seed {seed} -> {run_dir}")
    stage1 = aligned(align_config, args["align_args"], out / "stage1") if align_config else None
    init = ["--model.init_args.init_from", stage1["checkpoint"]] if stage1 else []
    stages = train(finetune=finetune_config, out=run_dir, finetune_args=[*init, *args["finetune_args"]])
    stage2, phases = stages.finetune, stages.phases
    with timed(phases, "validate"):
        (val,) = stage2.trainer.validate(stage2.model, datamodule=stage2.datamodule, ckpt_path="best", verbose=False)
    with timed(phases, "test"):
        (test,) = stage2.trainer.test(stage2.model, datamodule=stage2.datamodule, ckpt_path="best", verbose=False)
    finish_wandb()
    metrics = {**val, **test}
    epochs = {"finetune": stage2.trainer.current_epoch}
    extra = {}
    if stage1:
        metrics.update(stage1["metrics"])
        epochs["align"] = stage1["epochs"]
        # the stage-1 run's own cost, also when this variant reused it
        phases = {**stage1["phases"], **phases, "prepare": stage1["phases"]["prepare"] + phases["prepare"]}
        extra = {"align_curve": stage1["curve"], "stage1_dir": stage1["dir"], "stage1_reused": stage1["reused"]}
    append_record(results, {
        "variant": variant.name, "backbone": backbone, "seed": seed,
        "metrics": {k: float(v) for k, v in metrics.items()}, "phases": phases, "epochs": epochs, **extra,
        **args, "overrides": variant_overrides(variant), "run_dir": str(run_dir),
        "command": command_line(), "finished": datetime.now().isoformat(timespec="seconds"),
    })


def aligned(configs: list[str], args: list[str], root: Path) -> dict:
    """Stage 1 of (config files' content, args), trained once per benchmark folder: variants that differ
    only in stage 2 start from the same stage-1 checkpoint. Returns its checkpoint, stage-1 metrics (best
    val/loss, the last epoch's other val/ metrics), per-epoch curve, epochs, phases, folder and whether it
    was reused."""
    content = [Path(c).read_text() for c in configs]
    key = hashlib.sha256(json.dumps({"config": content, "args": args}).encode()).hexdigest()
    folder = root / key[:16]
    record = folder / "stage1.json"
    if record.is_file():
        done = json.loads(record.read_text())
        if Path(done["checkpoint"]).is_file():
            print(f"bench: stage 1 reused from {folder}")
            return {**done, "reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    phases: dict[str, float] = {}
    trainer = fit_stage(configs, folder, args, phases, STAGE1_PHASE).trainer
    finish_wandb()
    metrics = {"align/val/loss": float(trainer.checkpoint_callback.best_model_score)}
    metrics.update({f"align/{k}": float(v) for k, v in trainer.callback_metrics.items()
                    if k.startswith("val/") and k != "val/loss"})
    curve = next((c.history for c in trainer.callbacks if isinstance(c, TransferProbe)), None)
    done = {"checkpoint": best_checkpoint(trainer), "config": configs, "args": args, "metrics": metrics,
            "curve": curve, "epochs": trainer.current_epoch, "phases": phases, "dir": str(folder)}
    atomic_write_text(record, json.dumps(done, indent=1))
    return {**done, "reused": False}


def variant_overrides(variant: Variant) -> dict[str, list[str]]:
    """The variant's own overrides by stage ("both", "align", "finetune"), as given in the config."""
    return {"both": variant.args, "align": variant.align_args, "finetune": variant.finetune_args}


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


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.is_file() else []
    return (f"{models[0] if models else platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"
            f" ({platform.machine()}), torch {torch.__version__}, Lightning {pl.__version__},"
            f" Python {platform.python_version()}")


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


# --- report -------------------------------------------------------------------------------------------------
def pm(mean: float, std: float) -> str:
    return f"{mean:.4f}" if np.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def p_text(p: float) -> str:
    return "n/a" if np.isnan(p) else f"{p:.3g}"


def comparison_table(records: list[dict], backbones: list[str], slice_: str) -> list[str]:
    lines = ["| backbone | seeds | base AUC | CTRL AUC | RelaImpr | p (paired t, one-sided: CTRL > base)"
             " | base logloss | CTRL logloss |", "|---|---|---|---|---|---|---|---|"]
    for backbone in backbones:
        auc, logloss = (compare(records, backbone, f"{slice_}/{m}") for m in ("auc", "logloss"))
        if auc is None:
            continue
        base_loss, ctrl_loss = (pm(logloss[v], logloss[f"{v}_std"]) for v in (BASE, CTRL)) if logloss else ("n/a",) * 2
        lines.append(f"| {backbone} | {auc['seeds']} | {pm(auc['base'], auc['base_std'])}"
                     f" | {pm(auc['ctrl'], auc['ctrl_std'])} | {gain_text(auc['ctrl'], auc['base'])}"
                     f" | {p_text(auc['p'])} | {base_loss} | {ctrl_loss} |")
    return lines if len(lines) > 2 else ["No backbone has runs of both variants with this slice."]


def variants_table(records: list[dict], backbones: list[str]) -> list[str]:
    """Every variant per backbone; the best by validation AUC (paired with ctrl on shared seeds) in bold."""
    lines = ["| backbone | variant | seeds | val AUC | val AUC - ctrl's (same seeds) | test AUC | overrides |",
             "|---|---|---|---|---|---|---|"]
    for backbone in backbones:
        names = list(dict.fromkeys(r["variant"] for r in records if r["backbone"] == backbone))
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
    for name in dict.fromkeys(r["variant"] for r in records):
        runs = [r for r in records if r["variant"] == name]
        cells, total = [], 0.0
        for phase in phases:
            seconds = [r["phases"][phase] for r in runs if phase in r["phases"]]
            total += float(np.mean(seconds)) if seconds else 0.0
            cells.append(f"{np.mean(seconds):.1f}" if seconds else "-")
        lines.append(f"| {name} | {len(runs)} | {' | '.join(cells)} | {total:.1f} |")
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


def write_report(records: list[dict], backbones: list[str], report: Path, plot: Path, include: list[Path],
                 results: Path) -> None:
    """RESULTS.md and the PNG from the recorded runs."""
    shown = [b for b in backbones if any(r["backbone"] == b for r in records)]
    write_plot(records, shown, plot)
    plot_link = os.path.relpath(plot.resolve(), report.resolve().parent)
    commands = list(dict.fromkeys(r["command"] for r in records))
    text = [
        "# Benchmark: CTRL vs the same backbone trained from scratch",
        "",
        f"Written by `{command_line()}` from `{results}` ({len(records)} runs) on {datetime.now():%Y-%m-%d}.",
        f"Machine: {machine()}.",
        "",
        "Per backbone, over the seeds both variants ran: mean ± sample std (ddof 1) of the best-on-validation"
        " checkpoint's test metrics; RelaImpr = ((AUC_CTRL - 0.5) / (AUC_base - 0.5) - 1) x 100 of the means;"
        " p from scipy.stats.ttest_rel on the per-seed AUCs paired by seed, one-sided (alternative: CTRL > base).",
        "",
    ]
    for slice_, title in SLICES.items():
        text += [f"## Test AUC and logloss: {title}", "", *comparison_table(records, shown, slice_), ""]
    text += [f"![test AUC, base vs CTRL]({plot_link})", "",
             "## Variants (ablations), decided on validation AUC", "",
             "Best-checkpoint validation AUC per variant; the column after it is the mean per-seed difference to"
             " `ctrl` on the seeds both ran, and the variant with the largest one is in bold. Test AUC is shown"
             " for information only and picks nothing.", "",
             *variants_table(records, shown), "",
             "## Wall time per phase (seconds, mean over runs)", "", *phases_table(records), "",
             "## Commands that trained the runs", "", *[f"    {c}" for c in commands], ""]
    for path in include:
        if path.is_file():
            text += [f"<!-- included verbatim from {path} -->", "", path.read_text().rstrip("\n"), ""]
    atomic_write_text(report, "\n".join(text))
    print(f"bench: wrote {report} and {plot}")
