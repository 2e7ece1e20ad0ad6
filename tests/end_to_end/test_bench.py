"""`ctrl bench` in small-scale mode: base vs CTRL on one backbone, two seeds, a few hundred rows and a tiny
BERT. The report's numbers are recomputed from results.jsonl; a rerun skips the finished runs."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import small_config_dir, write_small_ml1m
from scipy.stats import ttest_rel

import ctrl.app.bench
import ctrl.app.pipeline
import ctrl.app.report
from ctrl.app.cli import main
from ctrl.app.pipeline import stage_configs, train
from ctrl.app.report import append_record, read_records

ROOT = Path(__file__).resolve().parents[2]
SEEDS = [0, 1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one thread for the module's tiny runs


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, bert_dir):
    tmp = tmp_path_factory.mktemp("bench")
    data = write_small_ml1m(tmp / "ml-1m")
    configs = small_config_dir(tmp / "configs", bert_dir, tmp / "text-vectors")
    (tmp / "cost.md").write_text("# Cost\n\n| phase | s |\n|---|---|\n| encode | 1.0 |\n")
    (tmp / "bench.yaml").write_text(yaml.safe_dump({
        "data_dir": str(data), "config_dir": str(configs), "out": str(tmp / "out"), "backbones": ["dcn"],
        "seeds": SEEDS, "args": ["--trainer.logger", "false"],  # W&B would cost seconds per stage
        "report": str(tmp / "RESULTS.md"), "plot": str(tmp / "results_auc.png"),
        "ablations": [{"name": "ctrl_lr", "finetune_args": ["--model.init_args.lr", "0.003"], "backbones": ["dcn"],
                       "seeds": [0]}],
        "include": [str(tmp / "cost.md"), str(tmp / "absent.md")]}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTRL_CACHE_DIR", str(tmp / "cache"))
        mp.setattr(sys, "argv", ["ctrl", *bench_args(tmp)])
        main(bench_args(tmp))
    return tmp


def bench_args(tmp) -> list[str]:
    return ["bench", "--config", str(tmp / "bench.yaml"), "--variants", "base,ctrl"]


def table_row(report: str, heading: str, first_cells: str) -> list[str]:
    """The cells of the row starting with `first_cells` in the first table after `heading`."""
    section = report.split(heading, 1)[1].split("\n## ", 1)[0]
    (line,) = [line for line in section.splitlines() if line.startswith(f"| {first_cells} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def mean_and_std(cell: str) -> tuple[float, float]:
    mean, std = cell.split(" ± ")
    return float(mean), float(std)


def test_every_run_is_recorded_with_metrics_times_and_arguments(bench_run):
    records = read_records(bench_run / "out" / "results.jsonl")
    assert sorted((r["variant"], r["seed"]) for r in records) == [("base", 0), ("base", 1), ("ctrl", 0), ("ctrl", 1)]
    for r in records:
        run_dir = Path(r["run_dir"])
        assert r["backbone"] == "dcn" and run_dir == bench_run / "out" / r["variant"] / "dcn" / f"seed{r['seed']}"
        assert {"val/auc", "val/logloss", "test/auc", "test/logloss"} <= set(r["metrics"])
        assert ["--seed_everything", str(r["seed"])] == r["finetune_args"][:2]
        assert {"prepare", "stage 2", "validate", "test"} <= set(r["phases"])
        assert r["machine"] == ctrl.app.report.machine()  # the machine that trained it, for a report written elsewhere
        (ckpt,) = (run_dir / "finetune" / "checkpoints").glob("best*.ckpt")
        hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
        # CTRL's stage 2 is the baseline's plus finetune_aligned.yaml, merged last: dropout 0.7, the base's 0.8
        aligned = r["variant"] == "ctrl"
        assert Path(r["finetune_config"][-1]).name == ("finetune_aligned.yaml" if aligned else "finetune.yaml")
        assert yaml.safe_load(r["finetune_config"][1])["model"]["init_args"]["backbone"]["class_path"] == "towers.DCN"
        assert hparams["backbone"]["init_args"]["dropout"] == (0.7 if aligned else 0.8)
        if r["variant"] == "ctrl":
            assert ["--seed_everything", str(r["seed"])] == r["align_args"][:2]
            assert "stage 1 (incl. text encoding)" in r["phases"] and "align/val/loss" in r["metrics"]
            # stage 2 started from this run's own stage-1 checkpoint, kept under out/stage1 for reuse
            init_from = hparams["init_from"]
            assert Path(r["stage1_dir"]).parent == bench_run / "out" / "stage1" and not r["stage1_reused"]
            assert init_from.startswith(str(Path(r["stage1_dir"]).resolve()))
            assert [c["epoch"] for c in r["align_curve"]] == list(range(r["epochs"]["align"]))
            assert "align/val/retrieval_top1" in r["metrics"] and "align/val/probe_auc" in r["metrics"]
        else:
            assert r["align_config"] is None and "stage1_dir" not in r
    base = {r["seed"]: r["metrics"]["test/auc"] for r in records if r["variant"] == "base"}
    assert base[0] != base[1]  # the seed reaches training


def assert_comparison_row(report: str, heading: str, records: list[dict], prefix: str) -> None:
    """The backbone's row under `heading` equals mean, std, RelaImpr and p recomputed from the records."""
    def per_seed(variant: str, metric: str) -> list[float]:
        return [r["metrics"][f"{prefix}/{metric}"] for r in sorted(records, key=lambda r: r["seed"])
                if r["variant"] == variant]

    cells = table_row(report, heading, "dcn")
    base, ctrl = per_seed("base", "auc"), per_seed("ctrl", "auc")
    assert cells[1] == str(len(base)) == str(len(ctrl))
    for cell, values in zip(cells[2:4] + cells[6:8], [base, ctrl, per_seed("base", "logloss"),
                                                       per_seed("ctrl", "logloss")], strict=True):
        mean, std = mean_and_std(cell)
        assert mean == pytest.approx(np.mean(values), abs=6e-5)
        assert std == pytest.approx(np.std(values, ddof=1), abs=6e-5)
    rela_impr = ((np.mean(ctrl) - 0.5) / (np.mean(base) - 0.5) - 1) * 100
    assert float(cells[4].rstrip("%")) == pytest.approx(rela_impr, abs=0.006)
    assert float(cells[5]) == pytest.approx(ttest_rel(ctrl, base, alternative="greater").pvalue, rel=6e-3)


def test_report_numbers_match_the_records(bench_run):
    records = read_records(bench_run / "out" / "results.jsonl")
    report = (bench_run / "RESULTS.md").read_text()
    assert_comparison_row(report, "all test rows", records, "test")
    assert "one-sided (alternative: CTRL > base)" in report
    for variant in ("base", "ctrl"):  # the variants table: mean val AUC
        val = [r["metrics"]["val/auc"] for r in records if r["variant"] == variant]
        (row,) = [line for line in report.splitlines() if re.match(rf"\| dcn \| (\*\*)?{variant}(\*\*)? \|", line)]
        assert row.split("|")[4].strip().startswith(f"{np.mean(val):.4f}")
    assert "Written by `ctrl bench --config " in report
    assert f"Machines that trained the runs: {ctrl.app.report.machine()} (4 runs)." in report
    assert "| encode | 1.0 |" in report and "absent.md" not in report  # included verbatim when present


def test_report_decides_on_validation_and_covers_the_cold_start_slice(tmp_path):
    """Records written here (the tiny data has no cold-start test rows): three seeds, two ablations."""
    rng = np.random.default_rng(0)
    records = []
    for seed in range(3):
        for variant, val, test in (("base", 0.70, 0.72), ("ctrl", 0.71, 0.73), ("coarse_only", 0.72, 0.70),
                                   ("fine_only", 0.69, 0.80)):
            noise = rng.normal(0, 0.005, 5)
            metrics = {"val/auc": val + noise[0], "test/auc": test + noise[1], "test/logloss": 0.5 + noise[2],
                       "test_cold/auc": test - 0.05 + noise[3], "test_cold/logloss": 0.6 + noise[4],
                       "test_cold/rows": 1300.0, "test_cold/positives": 612.0}
            records.append({"variant": variant, "backbone": "dcn", "seed": seed, "metrics": metrics,
                            "phases": {"stage 2": 1.0}, "overrides": {"both": [], "align": [], "finetune": []},
                            "command": "ctrl bench"})
    (tmp_path / "verdict.md").write_text("## Verdict per data set\n")
    (tmp_path / "cost.md").write_text("## Cost\n")
    ctrl.app.report.write_report(records, ["dcn"], tmp_path / "RESULTS.md", tmp_path / "auc.png",
                                 [tmp_path / "cost.md"], tmp_path / "results.jsonl", [tmp_path / "verdict.md"])
    report = (tmp_path / "RESULTS.md").read_text()
    # the report opens with the verdict (preface), then the tables; included notes come last
    order = [report.index(h) for h in ("## Verdict per data set", "## Test AUC and logloss", "## Cost")]
    assert order == sorted(order)
    assert_comparison_row(report, "cold start", records, "test_cold")
    assert table_row(report, "cold start", "dcn")[8] == "1,300 (612)"  # the slice's rows (clicks)
    assert table_row(report, "all test rows", "dcn")[8] == "n/a"  # runs recorded without the test slice's size
    # the machines are the records' own: these were recorded without one
    assert "Machines that trained the runs: not recorded (12 runs)." in report
    # best on validation (coarse_only), not on test (fine_only)
    assert [line.split("|")[2].strip() for line in report.splitlines() if "**" in line] == ["**coarse_only**"]


def test_plot_is_a_png(bench_run):
    import matplotlib.image

    path = bench_run / "results_auc.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).ndim == 3


def test_rerun_skips_finished_runs_and_resumes_a_missing_one(bench_run, monkeypatch):
    monkeypatch.setenv("CTRL_CACHE_DIR", str(bench_run / "cache"))
    results = bench_run / "out" / "results.jsonl"
    lines = results.read_text().splitlines()

    def no_training(**kwargs):
        raise AssertionError("a finished run was trained again")

    with monkeypatch.context() as mp:
        mp.setattr(ctrl.app.bench, "train", no_training)
        mp.setattr(ctrl.app.bench, "fit_stage", no_training)
        main(bench_args(bench_run))
    assert results.read_text().splitlines() == lines

    # an interrupted benchmark: base seed 1 never got recorded; the rerun trains that run alone, identically
    runs = [(r["variant"], r["seed"]) for r in map(json.loads, lines)]
    missing = runs.index(("base", 1))
    results.write_text("".join(f"{line}\n" for i, line in enumerate(lines) if i != missing))
    trained = []
    monkeypatch.setattr(ctrl.app.bench, "train", lambda **kwargs: trained.append(kwargs) or train(**kwargs))
    main(bench_args(bench_run))
    after = results.read_text().splitlines()
    assert len(trained) == 1 and len(after) == len(lines)
    again, before = json.loads(after[-1]), json.loads(lines[missing])
    assert (again["variant"], again["seed"]) == ("base", 1)
    assert again["metrics"] == pytest.approx(before["metrics"], abs=1e-6)


def test_a_store_written_by_another_installation_resumes(bench_run, monkeypatch, tmp_path, capsys):
    """A store records the shipped configs where that installation keeps them (a checkout's configs/, a venv's
    site-packages/ctrl/configs/): the same benchmark from another one once refused every recorded run."""
    out = tmp_path / "out"
    out.mkdir()
    lines = (bench_run / "out" / "results.jsonl").read_text()
    assert '"configs/stages/finetune.yaml"' in lines
    elsewhere = "/opt/venv/lib/python3.11/site-packages/ctrl/configs/stages/"
    (out / "results.jsonl").write_text(lines.replace('"configs/stages/', f'"{elsewhere}'))
    monkeypatch.setattr(ctrl.app.bench, "train", lambda *a, **k: pytest.fail("a recorded run trained again"))
    main([*bench_args(bench_run), "--out", str(out)])
    assert capsys.readouterr().out.count("already in") == 2 * len(SEEDS)


def test_a_recorded_run_with_other_arguments_is_refused(bench_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*bench_args(bench_run), "--data_dir", str(bench_run / "elsewhere")])
    assert exit_info.value.code == 2
    assert "records base/dcn/seed 0 with other configs or arguments" in capsys.readouterr().err


def test_a_recorded_run_whose_config_files_changed_since_is_refused(bench_run, capsys, monkeypatch):
    """Same paths, other contents (as a change of a shipped default is): not reused, refused before training."""
    config = bench_run / "configs" / "finetune.yaml"
    before = config.read_text()
    try:
        settings = yaml.safe_load(before)
        settings["trainer"]["max_epochs"] += 1
        config.write_text(yaml.safe_dump(settings))
        with pytest.raises(SystemExit) as exit_info:
            main(bench_args(bench_run))
    finally:
        config.write_text(before)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "records base/dcn/seed 0 with other configs or arguments: the contents of" in err
    assert str(config) in err

    def no_training(**kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ctrl.app.bench, "train", no_training)
    monkeypatch.setattr(ctrl.app.bench, "fit_stage", no_training)
    config.write_text(f"# a comment changes nothing it says\n{before}")
    try:
        main(bench_args(bench_run))  # every run recorded, under what the configs still say: skipped
    finally:
        config.write_text(before)


def test_a_record_cut_short_is_skipped_and_the_next_one_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"variant": "base"}\n{"variant": "ct')
    append_record(path, {"variant": "ctrl"})
    assert read_records(path) == [{"variant": "base"}, {"variant": "ctrl"}]


def test_every_ablation_of_the_shipped_config_names_options_of_its_stages(capsys):
    """The shipped bench config cannot rot: each override is an option of the stage config it goes to."""

    def printed(args: list[str]) -> dict:
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--print_config"])
        assert exit_info.value.code == 0
        return yaml.safe_load(capsys.readouterr().out)

    configs = [printed(["bench", "--config", str(path)]) for path in sorted((ROOT / "configs/bench").glob("*.yaml"))]
    assert {Path(config["config_dir"]).name for config in configs} == {"ml100k", "amazon-beauty"}
    stages = {stage: printed(["fit", *(a for c in stage_configs(ROOT / configs[0]["config_dir"], stage, "dcn")
                                        for a in ("--config", c))]) for stage in ("align", "finetune")}
    targets_of = {"args": ("align", "finetune"), "align_args": ("align",), "finetune_args": ("finetune",)}
    assert len(configs) >= 3 and sum(len(config["ablations"]) > 0 for config in configs) >= 2

    def options(overlay: dict, prefix: str = "") -> list[str]:  # an overlay file's keys as --a.b.c options
        return [o for k, v in overlay.items() for o in (options(v, f"{prefix}{k}.") if isinstance(v, dict) and
                                                        "class_path" not in v else [f"--{prefix}{k}"])]

    for ablation in [a for config in configs for a in config["ablations"]]:
        for key, targets in targets_of.items():
            pairs = ablation.get(key, [])
            for option, value in zip(pairs[::2], pairs[1::2], strict=True):
                named = options(yaml.safe_load((ROOT / value).read_text())) if option == "--config" else [option]
                for stage in targets:
                    for name in named:
                        node = stages[stage]
                        for part in name.removeprefix("--").split("."):
                            assert part in node, f"{ablation['name']}: {name} is no option of the {stage} config"
                            node = node[part]


def test_relaimpr_is_undefined_below_chance_and_the_auc_difference_is_reported_instead():
    assert ctrl.app.report.rela_impr(0.78, 0.75) == pytest.approx(12.0)
    # a base below chance flips the ratio's sign: CTRL better by .03 AUC would read as a loss
    assert np.isnan(ctrl.app.report.rela_impr(0.48, 0.45))
    assert ctrl.app.report.gain_text(0.48, 0.45) == "ΔAUC +0.0300 (base AUC <= 0.5: RelaImpr undefined)"
    assert ctrl.app.report.gain_text(0.78, 0.75) == "+12.00%"


def test_backbones_and_seeds_limit_an_ablation_that_names_its_own(bench_run, monkeypatch, tmp_path, capsys):
    """--backbones [autoint] means autoint alone: an ablation defined on [dcn, autoint] skips dcn, and says so (it
    ran on both before, so two processes split by --backbones ran it twice). --seeds likewise."""
    runs = []
    monkeypatch.setattr(ctrl.app.bench, "run_once", lambda v, backbone, *a: runs.append((v.name, backbone)))
    bench_yaml = yaml.safe_load((bench_run / "bench.yaml").read_text())
    for ablation in bench_yaml["ablations"]:
        if ablation["name"] == "ctrl_lr":
            ablation["backbones"] = ["dcn", "autoint"]
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(bench_yaml))
    main(["bench", "--config", str(tmp_path / "bench.yaml"), "--variants", "ctrl_lr", "--backbones", "[autoint]",
          "--report", str(tmp_path / "R.md"), "--plot", str(tmp_path / "p.png")])
    assert "bench: ctrl_lr skips backbones dcn: not in --backbones" in capsys.readouterr().out
    assert runs == [("ctrl_lr", "autoint")]
    runs.clear()  # and --seeds limits its seeds: ctrl_lr names seed 0
    main(["bench", "--config", str(tmp_path / "bench.yaml"), "--variants", "ctrl_lr", "--seeds", "[1]",
          "--report", str(tmp_path / "R.md"), "--plot", str(tmp_path / "p.png")])
    assert "bench: ctrl_lr skips seeds 0: not in --seeds" in capsys.readouterr().out and runs == []


def test_a_store_without_base_and_ctrl_runs_leaves_the_configured_report_alone(bench_run, monkeypatch, tmp_path,
                                                                               capsys):
    """An ablation trained into a new --out wrote the data set's committed report from its own runs alone."""
    monkeypatch.setattr(ctrl.app.bench, "run_once", lambda *a: None)
    out = tmp_path / "ablation"
    out.mkdir()
    ctrl_runs = [json.loads(line) for line in (bench_run / "out" / "results.jsonl").read_text().splitlines()
                 if json.loads(line)["variant"] == "ctrl"]
    (out / "results.jsonl").write_text("".join(json.dumps({**r, "variant": "ctrl_lr"}) + "\n" for r in ctrl_runs))
    report = tmp_path / "R.md"
    report.write_text("the committed report")
    args = ["bench", "--config", str(bench_run / "bench.yaml"), "--variants", "ctrl_lr", "--out", str(out),
            "--report", str(report), "--plot", str(tmp_path / "p.png")]
    main(args)
    assert "holds no base and no ctrl runs" in capsys.readouterr().out
    assert report.read_text() == "the committed report" and not (tmp_path / "p.png").exists()
    main([*args, "--report_only", "true"])  # asked for by name, it is written
    assert "ctrl_lr" in report.read_text()


def test_a_variant_that_changes_only_stage_2_reuses_the_stage_1_run(bench_run, monkeypatch):
    monkeypatch.setenv("CTRL_CACHE_DIR", str(bench_run / "cache"))
    fits = []
    monkeypatch.setattr(ctrl.app.bench, "fit_stage",
                        lambda *a, **k: fits.append(a) or ctrl.app.pipeline.fit_stage(*a, **k))
    main(["bench", "--config", str(bench_run / "bench.yaml"), "--variants", "ctrl_lr"])
    records = {(r["variant"], r["seed"]): r for r in read_records(bench_run / "out" / "results.jsonl")}
    reused, original = records[("ctrl_lr", 0)], records[("ctrl", 0)]
    assert fits == [] and reused["stage1_reused"] and reused["stage1_dir"] == original["stage1_dir"]
    assert reused["metrics"]["align/val/loss"] == original["metrics"]["align/val/loss"]
    assert reused["metrics"]["val/auc"] != original["metrics"]["val/auc"]  # stage 2 did change


def test_the_machine_line_names_the_bf16_instructions_and_a_capped_onednn(monkeypatch):
    monkeypatch.setattr(ctrl.app.report, "cpuinfo", lambda field: "Some Xeon")
    monkeypatch.setattr(ctrl.app.report, "cpu_flags", lambda: {"avx2", "avx512_bf16", "amx_bf16"})
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "all")
    assert ctrl.app.report.cpu_model() == "Some Xeon with AMX, AVX512-BF16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")  # how a CPU without AMX is measured on one with it
    assert ctrl.app.report.cpu_model() == "Some Xeon with AMX, AVX512-BF16 (oneDNN capped at AVX512_CORE_BF16)"
    monkeypatch.setattr(ctrl.app.report, "cpu_flags", lambda: {"avx2"})
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert ctrl.app.report.cpu_model() == "Some Xeon with AVX2"
