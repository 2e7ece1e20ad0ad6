"""The benchmark: per backbone and seed, the backbone from scratch ("base": stage 2 only) vs CTRL ("ctrl":
stage 1 then stage 2), plus named ablations of CTRL; then a report (RESULTS.md and a PNG of test AUC,
written by ctrl/app/report.py).

    ctrl bench --config configs/bench/ml100k.yaml --data_dir ../shared/data/ml-100k
    ctrl bench --config configs/bench/ml100k.yaml --data_dir ../shared/data/ml-100k --variants coarse_only,fine_only
    ctrl bench --config configs/bench/ml100k.yaml --report_only true
    ctrl bench --config configs/bench/ml100k.yaml --data_dir DIR --tune true --out runs/bench-tuned

With `--tune true` each arm's stage 2 is first searched on validation with the same trials (`tuning`,
ctrl/app/tune.py) and the winners are the `base` and `ctrl` rows.

Each run is `ctrl.app.pipeline.train` with the shipped stage configs plus the variant's overrides and
`--seed_everything SEED`. Every finished run appends one JSON line to `<out>/results.jsonl`; a rerun skips
the runs recorded there, so an interrupted benchmark continues where it stopped. The report reads only
that file. Choices are made on validation AUC; test metrics are reported, never used to pick.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import yaml

from ctrl.align.probe import TransferProbe
from ctrl.app.lightning_cli import merged_config
from ctrl.app.paths import portable_config_path
from ctrl.app.pipeline import STAGE1_PHASE, best_checkpoint, finish_wandb, fit_stage, stage_configs, timed, train
from ctrl.app.report import BASE, CTRL, append_record, command_line, machine, read_records, write_report
from ctrl.app.tune import TUNING, Tuning, choose, draw_trials, grid_record, trial_args, trial_name, write_overlays
from tabular2text.atomic import atomic_write_text
from towers.checkpoints import ConfigError

RESULTS_FILE = "results.jsonl"


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
          variants: str = "base,ctrl", tune: bool = False, tuning: Tuning = TUNING, report_only: bool = False,
          report: str | None = None, plot: str | None = None, include: tuple[str, ...] = (),
          preface: tuple[str, ...] = ()) -> None:
    """Train base vs CTRL (and selected ablations) per backbone and seed, then write the report.

    Args:
        data_dir: overrides data.data_dir of every stage config.
        config_dir: a data set's configs, merged over the stages' bases and the backbone chosen by name, as
            `ctrl run` reads them (`ctrl.app.pipeline.stage_configs`).
        args: overrides of both stages of every run, e.g. ["--trainer.logger", "false"].
        out: one folder per run (`out/VARIANT/BACKBONE/seedN`) and results.jsonl, one line per finished run.
        backbones: backbones of base and ctrl; an ablation runs on those of its own (or of
            `ablation_backbones`) that are in this list.
        seeds: seeds of base and ctrl (`--seed_everything` of both stages); an ablation runs on those of its own
            (or of `ablation_seeds`) that are in this list.
        ablations: further variants, run only when named in `variants`.
        ablation_backbones: backbones of an ablation that names none.
        ablation_seeds: seeds of an ablation that names none.
        variants: comma-separated names of the variants to run, or "all".
        tune: search base's and ctrl's stage 2 first (`tuning`, the same trials for both, chosen on validation
            AUC), write the winners' overlays to OUT/tuned/ and run the winners as base and ctrl over `seeds`.
        tuning: the search of `tune`: grid (dropout, lr, weight_decay), trials, the seed drawing them and the
            seeds each trial trains with.
        report_only: write the report from results.jsonl without training.
        report: the markdown report to write; unset, OUT/RESULTS.md, beside the store it reports. A committed
            report is rewritten from its store by its own overlay, e.g. `--config
            benchmarks/headline_ml100k/report.yaml --report_only true` (report, plot, preface and include).
        plot: the PNG to write: test AUC, mean and std over seeds, base vs CTRL per backbone; unset,
            OUT/results_auc.png.
        include: markdown files appended to the report verbatim when they exist (cost, peer comparisons, notes).
        preface: markdown files put verbatim before the tables when they exist (the verdict per data set).
    """
    known = [Variant(BASE, align=False, backbones=list(backbones), seeds=list(seeds)),
             Variant(CTRL, backbones=list(backbones), seeds=list(seeds))]
    for v in ablations:
        known.append(Variant(v.name, v.align, v.args, v.align_args, v.finetune_args,
                             v.backbones or list(ablation_backbones), v.seeds or list(ablation_seeds)))
    results = Path(out) / RESULTS_FILE
    report = report or str(Path(out) / "RESULTS.md")
    plot = plot or str(Path(out) / "results_auc.png")
    if not report_only:
        plan = []
        for v in select(known, variants):
            # --backbones [dcn] means dcn alone, for an ablation that names more too; the same for --seeds
            for option, own, allowed in (("backbones", v.backbones, backbones), ("seeds", v.seeds, seeds)):
                left_out = [str(x) for x in own if x not in allowed]
                if left_out:
                    print(f"bench: {v.name} skips {option} {', '.join(left_out)}: not in --{option}")
            plan.append((replace(v, backbones=[b for b in v.backbones if b in backbones],
                                 seeds=[x for x in v.seeds if x in seeds]), {}))
        refuse_other_headline(plan, results, tune)
        if tune:
            plan = tuned(plan, tuning, backbones, seeds, list(args), data_dir, Path(config_dir), Path(out))
        for v, extra in plan:
            for backbone in v.backbones:
                for seed in v.seeds:
                    run_once(v, backbone, seed, [*args, *v.args], data_dir, Path(config_dir), Path(out), extra)
    records = read_records(results)
    if not records:
        print(f"bench: no finished runs in {results}, no report written")
        return
    missing = [arm for arm in (BASE, CTRL) if all(r["variant"] != arm for r in records)]
    if missing and not report_only:  # e.g. an ablation into a new --out: not the report of base vs ctrl
        print(f"bench: {results} holds no {' and no '.join(missing)} runs, so {report} is left as it is; write a"
              f" report of these runs with --report_only true --out {out} --report PATH --plot PATH")
        return
    order = [*backbones, *sorted({r["backbone"] for r in records} - set(backbones))]
    write_report(records, order, Path(report), Path(plot), [Path(p) for p in include], results,
                 [Path(p) for p in preface])


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


def refuse_other_headline(plan: list[tuple[Variant, dict]], results: Path, tune: bool) -> None:
    """Refuse, before any training, a store whose base or ctrl runs were chosen the other way (tuned here vs
    the config directory's settings): the report pairs them by seed, so the two cannot share a store."""
    arms = {v.name for v, _ in plan} & {BASE, CTRL}
    other = next((r for r in read_records(results) if r["variant"] in arms and ("tuned" in r) != tune), None)
    if other:
        how = "with the config directory's settings" if tune else "with tuned settings (--tune true)"
        run = f"{other['variant']}/{other['backbone']}/seed {other['seed']}"
        raise ConfigError(f"{results} records {run} trained {how}; give this benchmark another --out")


def tuned(plan: list[tuple[Variant, dict]], tuning: Tuning, backbones: tuple[str, ...], seeds: tuple[int, ...],
          args: list[str], data_dir: str, config_dir: Path, out: Path) -> list[tuple[Variant, dict]]:
    """`--tune true`: per backbone, each of base and ctrl (those in the plan) trains the same trials on the
    tuning seeds (variants ARM_trialN, recorded like any run; CTRL's reuse one stage-1 run per backbone and
    seed); the trial with the best mean validation AUC becomes that arm's run over `seeds`, and its values are
    written to OUT/tuned/ as overlays. Returns the plan with base and ctrl replaced by their winners."""
    arms = [v for v, _ in plan if v.name in (BASE, CTRL)]
    if not arms:
        raise ConfigError("--tune true searches base's and ctrl's stage 2; --variants names neither")
    trials, grid, results = draw_trials(tuning), grid_record(tuning), out / RESULTS_FILE
    print(f"bench: tuning {', '.join(v.name for v in arms)} on {len(trials)} trial(s) x seeds {tuning.seeds}")
    winners: dict[str, list[tuple[Variant, dict]]] = {v.name: [] for v in arms}
    for backbone in backbones:
        for index, values in enumerate(trials):
            for arm in arms:  # the same trial list for both arms
                trial = Variant(trial_name(arm.name, index), arm.align, arm.args, arm.align_args,
                                [*arm.finetune_args, *trial_args(values)])
                for seed in tuning.seeds:
                    run_once(trial, backbone, seed, [*args, *arm.args], data_dir, config_dir, out,
                             {"trial": {"arm": arm.name, "index": index, "values": values}, "grid": grid})
        records = read_records(results)
        for arm in arms:
            best, score = choose(records, arm.name, backbone, tuning, len(trials))
            values = score["values"]
            settings = ", ".join(f"{k} {v:g}" for k, v in values.items())
            why = (f"Written by `{command_line()}` from {results}: {arm.name}'s stage 2 for {backbone}, trial {best}"
                   f" of {len(trials)} ({settings}), the best mean validation AUC ({score['val_auc']:.4f}) over"
                   f" seeds {score['seeds']}. To ship it, copy it to the same path under your config directory.")
            winner = next(r for r in records if (r["variant"], r["backbone"]) == (trial_name(arm.name, best), backbone))
            trained = merged_config([*(a for c in winner["finetune_config"] for a in ("--config", c)),
                                     *winner["finetune_args"]])
            overlay = write_overlays(out / "tuned", config_dir, backbone, arm.align, values, trained, why)
            print(f"bench: {arm.name}/{backbone}: trial {best} chosen on validation AUC -> {overlay}")
            winners[arm.name].append((
                Variant(arm.name, arm.align, arm.args, arm.align_args, [*arm.finetune_args, *trial_args(values)],
                        [backbone], list(seeds)),
                {"tuned": {"trial": best, "values": values, "overlay": str(overlay)}}))
    return [w for v, extra in plan for w in winners.get(v.name, [(v, extra)])]


def run_once(variant: Variant, backbone: str, seed: int, common_args: list[str], data_dir: str, config_dir: Path,
             out: Path, extra: dict | None = None) -> None:
    """Train and evaluate one (variant, backbone, seed) unless results.jsonl already records it; `extra` is
    recorded with it (what the tuning needs to know about the run)."""
    common = ["--seed_everything", str(seed), "--data.data_dir", data_dir, *common_args]
    align_config = stage_configs(config_dir, "align", backbone) if variant.align else None
    finetune_config = stage_configs(config_dir, "finetune", backbone, aligned=variant.align)
    args = {"align_config": align_config, "align_args": [*common, *variant.align_args] if variant.align else [],
            "finetune_config": finetune_config, "finetune_args": [*common, *variant.finetune_args]}
    configs = [*(align_config or []), *finetune_config]
    contents = configs_sha(configs)
    results = out / RESULTS_FILE
    key = (variant.name, backbone, seed)
    done = {(r["variant"], r["backbone"], r["seed"]): r for r in read_records(results)}
    if key in done:
        recorded = {k: done[key].get(k) for k in args}
        if portable(recorded) != portable(args):
            raise ConfigError(f"{results} records {variant.name}/{backbone}/seed {seed} with other configs or"
                             f" arguments ({recorded}, now {args}); run with the same options, another --out, or"
                             " rename the variant")
        if done[key].get("configs_sha", contents) != contents:  # stores written before it lack the field
            files = ", ".join(c for c in configs if not c.startswith("{"))
            raise ConfigError(f"{results} records {variant.name}/{backbone}/seed {seed} with other configs or"
                             f" arguments: the contents of {files} changed since it ran; use another --out to"
                             " measure them as they are now")
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
    extra = dict(extra or {})
    if stage1:
        metrics.update(stage1["metrics"])
        epochs["align"] = stage1["epochs"]
        # the stage-1 run's own cost, also when this variant reused it
        phases = {**stage1["phases"], **phases, "prepare": stage1["phases"]["prepare"] + phases["prepare"]}
        extra.update(align_curve=stage1["curve"], stage1_dir=stage1["dir"], stage1_reused=stage1["reused"])
    append_record(results, {
        "variant": variant.name, "backbone": backbone, "seed": seed,
        "metrics": {k: float(v) for k, v in metrics.items()}, "phases": phases, "epochs": epochs, **extra,
        **args, "configs_sha": contents, "overrides": variant_overrides(variant), "run_dir": str(run_dir),
        "command": command_line(), "machine": machine(), "finished": datetime.now().isoformat(timespec="seconds"),
    })


def portable(args: dict) -> dict:
    """A run's configs and arguments with the shipped configs named as `configs/...`: a store written by a
    checkout is resumed by an installed package (and the other way round), whose copies of them lie elsewhere;
    configs_sha still tells whether their contents changed."""
    return {k: [portable_config_path(a) for a in v] if isinstance(v, list) else v for k, v in args.items()}


def config_texts(configs: list[str]) -> list[str]:
    """What each config says: a file's text, or the YAML string itself (the backbone by name)."""
    return [c if c.startswith("{") else Path(c).read_text() for c in configs]


def configs_sha(configs: list[str]) -> str:
    """A short hash of what the configs say, parsed (comments and layout aside): a run recorded under the same
    config paths is reused only while their contents are the same."""
    parsed = [yaml.safe_load(text) for text in config_texts(configs)]
    return hashlib.sha256(json.dumps(parsed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def aligned(configs: list[str], args: list[str], root: Path) -> dict:
    """Stage 1 of (config files' content, args), trained once per benchmark folder: variants that differ
    only in stage 2 start from the same stage-1 checkpoint. Returns its checkpoint, stage-1 metrics (best
    val/loss, the last epoch's other val/ metrics), per-epoch curve, epochs, phases, folder and whether it
    was reused."""
    key = hashlib.sha256(json.dumps({"config": config_texts(configs), "args": args}).encode()).hexdigest()
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
