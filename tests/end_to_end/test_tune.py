"""`ctrl bench --tune true` in small-scale mode: base and CTRL each search stage 2 (2 trials of a 2 x 2 grid,
1 tuning seed) on the tiny data, the winners run over 2 seeds, the chosen values are written as overlays.
Asserts what makes the comparison fair: the same trials for both arms, choices on validation AUC only."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import small_config_dir, write_small_ml1m

import ctrl.app.bench
from ctrl.app.cli import main
from ctrl.app.pipeline import stage_configs
from ctrl.app.report import read_records, trial_scores, tuning_winner, write_report
from ctrl.app.tune import TUNED_OPTIONS, Tuning, draw_trials, trial_args

SEEDS = [0, 1]
TUNING = {"dropout": [0.2, 0.6], "lr": [0.001, 0.003], "weight_decay": [1e-4], "trials": 2, "seed": 0, "seeds": [0]}
ARMS = ("base", "ctrl")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one thread for the module's tiny runs


@pytest.fixture(scope="module")
def tune_run(tmp_path_factory, bert_dir):
    tmp = tmp_path_factory.mktemp("tune")
    data = write_small_ml1m(tmp / "ml-1m")
    configs = small_config_dir(tmp / "configs", bert_dir, tmp / "text-vectors")
    (tmp / "bench.yaml").write_text(yaml.safe_dump({
        "data_dir": str(data), "config_dir": str(configs), "out": str(tmp / "out"), "backbones": ["dcn"],
        "seeds": SEEDS, "args": ["--trainer.logger", "false"], "tuning": TUNING, "include": [],
        "report": str(tmp / "RESULTS.md"), "plot": str(tmp / "results_auc.png")}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTRL_CACHE_DIR", str(tmp / "cache"))
        mp.setattr(sys, "argv", ["ctrl", *tune_args(tmp)])
        main(tune_args(tmp))
    return tmp


def tune_args(tmp: Path) -> list[str]:
    return ["bench", "--config", str(tmp / "bench.yaml"), "--tune", "true"]


def trials_of(records: list[dict], arm: str) -> dict[int, dict]:
    return {r["trial"]["index"]: r for r in records if r.get("trial", {}).get("arm") == arm}


def headline(records: list[dict], arm: str) -> list[dict]:
    return [r for r in records if r["variant"] == arm]


def best_checkpoint(run: dict) -> dict:
    (ckpt,) = (Path(run["run_dir"]) / "finetune" / "checkpoints").glob("best*.ckpt")
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def test_both_arms_trained_the_same_drawn_trials_and_the_values_reached_the_optimizer(tune_run):
    records = read_records(tune_run / "out" / "results.jsonl")
    expected = draw_trials(Tuning(**TUNING))
    assert len(expected) == 2 and all(t in draw_trials(Tuning(**{**TUNING, "trials": 99})) for t in expected)
    for arm in ARMS:
        trials = trials_of(records, arm)
        assert [trials[i]["trial"]["values"] for i in sorted(trials)] == expected
        for index, run in trials.items():
            assert run["variant"] == f"{arm}_trial{index}" and run["seed"] == 0
            assert run["finetune_args"][-len(trial_args(expected[index])):] == trial_args(expected[index])
            ckpt, values = best_checkpoint(run), expected[index]
            (group, *_) = ckpt["optimizer_states"][0]["param_groups"]
            assert (group["lr"], group["weight_decay"]) == (values["lr"], values["weight_decay"])
            assert ckpt["hyper_parameters"]["backbone"]["init_args"]["dropout"] == values["dropout"]
            assert bool(ckpt["hyper_parameters"]["init_from"]) == (arm == "ctrl")
    # CTRL's trials and its seed-0 headline run share one stage-1 run, trained once
    ctrl_seed0 = [*trials_of(records, "ctrl").values(), *[r for r in headline(records, "ctrl") if r["seed"] == 0]]
    assert len({r["stage1_dir"] for r in ctrl_seed0}) == 1 and sum(not r["stage1_reused"] for r in ctrl_seed0) == 1


def test_each_arm_runs_the_trial_with_the_best_validation_auc_over_the_seeds(tune_run):
    records = read_records(tune_run / "out" / "results.jsonl")
    for arm in ARMS:
        trials = trials_of(records, arm)
        best = max(trials, key=lambda i: trials[i]["metrics"]["val/auc"])
        runs = headline(records, arm)
        assert sorted(r["seed"] for r in runs) == SEEDS
        for run in runs:
            assert run["tuned"]["trial"] == best and run["tuned"]["values"] == trials[best]["trial"]["values"]
            assert run["finetune_args"][-6:] == trial_args(trials[best]["trial"]["values"])
            assert best_checkpoint(run)["hyper_parameters"]["lr"] == trials[best]["trial"]["values"]["lr"]


def printed_config(files: list, capsys, args: tuple[str, ...] = ()) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *[arg for f in files for arg in ("--config", str(f))], *args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_the_overlays_hold_the_winners_and_a_config_dir_ships_them(tune_run, capsys, tmp_path):
    records = read_records(tune_run / "out" / "results.jsonl")
    configs, tuned = tune_run / "configs", tune_run / "out" / "tuned"
    winner = {arm: headline(records, arm)[0]["tuned"]["values"] for arm in ARMS}
    overlays = {"base": tuned / "finetune" / "dcn.yaml", "ctrl": tuned / "finetune_aligned" / "dcn.yaml"}
    assert sorted(p.relative_to(tuned) for p in tuned.rglob("*.yaml")) == sorted(
        p.relative_to(tuned) for p in overlays.values())
    assert overlays["base"].read_text().startswith("# Written by `ctrl bench --config ")
    # copied into a config directory, `ctrl run` / `ctrl bench` merge them: the baseline's replaces the backbone
    # overlay, CTRL's comes after finetune_aligned.yaml
    shipped = tmp_path / "configs"
    shutil.copytree(configs, shipped)
    shutil.copytree(tuned, shipped, dirs_exist_ok=True)
    files = {arm: stage_configs(shipped, "finetune", "dcn", aligned=arm == "ctrl") for arm in ARMS}
    assert files["base"][2:] == [str(shipped / "finetune.yaml"), str(shipped / "finetune" / "dcn.yaml")]
    assert files["ctrl"][2:] == [*files["base"][2:], str(shipped / "finetune_aligned.yaml"),
                                 str(shipped / "finetune_aligned" / "dcn.yaml")]
    for arm in ARMS:
        # like every backbone overlay, each states the backbone's class and all of its init_args: those the
        # winning trial trained with (the small config's sizes, not DCN's defaults)
        overlay = yaml.safe_load(overlays[arm].read_text())["model"]["init_args"]
        assert overlay["backbone"]["class_path"] == "towers.DCN"
        assert overlay["backbone"]["init_args"] == {
            "embed_dim": 8, "num_cross_layers": 3, "mlp_dims": [32, 16], "dropout": winner[arm]["dropout"],
            "batch_norm": True}
        model = printed_config(files[arm], capsys)["model"]["init_args"]
        assert model["backbone"] == overlay["backbone"]
        assert {"dropout": model["backbone"]["init_args"]["dropout"], "lr": model["lr"],
                "weight_decay": model["weight_decay"]} == winner[arm]
        # shipped, the overlay rebuilds the winner: the same merged config as its trial's
        trial = next(r for r in records if r["variant"] == f"{arm}_trial{headline(records, arm)[0]['tuned']['trial']}")
        assert model == printed_config(trial["finetune_config"], capsys, trial["finetune_args"])["model"]["init_args"]
    assert set(TUNED_OPTIONS) == set(winner["base"])


def test_the_report_shows_the_search_and_every_trials_validation_auc(tune_run):
    records = read_records(tune_run / "out" / "results.jsonl")
    report = (tune_run / "RESULTS.md").read_text()
    section = report.split("## Tuning", 1)[1].split("\n## ", 1)[0]
    assert "dropout [0.2, 0.6], lr [0.001, 0.003], weight_decay [0.0001]; 2 trial(s) drawn with seed 0" in section
    for index, values in enumerate(draw_trials(Tuning(**TUNING))):
        (row,) = [line for line in section.splitlines() if line.startswith(f"| {index} |")]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert [float(c) for c in cells[1:4]] == list(values.values())
        for arm, cell in zip(ARMS, cells[4:], strict=True):
            auc = trials_of(records, arm)[index]["metrics"]["val/auc"]
            assert cell.strip("*") == f"{auc:.4f} (1)"
            assert cell.startswith("**") == (headline(records, arm)[0]["tuned"]["trial"] == index)
    assert "| dcn | 2 |" in report.split("## Test AUC and logloss: all test rows", 1)[1]  # the headline row
    variants = report.split("## Variants", 1)[1].split("\n## ", 1)[0]
    assert "_trial" not in variants  # the trials are not ablations
    phases = report.split("## Wall time per phase", 1)[1]
    assert "| base tuning trials | 2 |" in phases and "| ctrl tuning trials | 2 |" in phases


def test_a_rerun_trains_nothing_and_chooses_the_same(tune_run, monkeypatch):
    monkeypatch.setenv("CTRL_CACHE_DIR", str(tune_run / "cache"))
    results, tuned = tune_run / "out" / "results.jsonl", tune_run / "out" / "tuned"
    before = results.read_text()
    overlays = {p: yaml.safe_load(p.read_text()) for p in tuned.rglob("*.yaml")}

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(ctrl.app.bench, "train", no_training)
    monkeypatch.setattr(ctrl.app.bench, "fit_stage", no_training)
    main(tune_args(tune_run))
    assert results.read_text() == before
    assert {p: yaml.safe_load(p.read_text()) for p in tuned.rglob("*.yaml")} == overlays


def test_a_store_of_untuned_base_and_ctrl_runs_is_refused_before_any_training(tune_run, tmp_path, capsys,
                                                                            monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    untuned = [r for r in read_records(tune_run / "out" / "results.jsonl") if r["variant"] == "base"][:1]
    del untuned[0]["tuned"]
    (out / "results.jsonl").write_text("".join(f"{json.dumps(r)}\n" for r in untuned))
    monkeypatch.setattr(ctrl.app.bench, "run_once", lambda *a, **k: pytest.fail("trained into a mixed store"))
    with pytest.raises(SystemExit) as exit_info:
        main([*tune_args(tune_run), "--out", str(out)])
    assert exit_info.value.code == 2
    assert "records base/dcn/seed 0 trained with the config directory's settings" in capsys.readouterr().err


def record(arm: str, index: int, seed: int, val: float, test: float) -> dict:
    return {"variant": f"{arm}_trial{index}", "backbone": "dcn", "seed": seed,
            "trial": {"arm": arm, "index": index, "values": {"dropout": 0.1 * index, "lr": 0.001, "weight_decay": 0.0}},
            "grid": {"dropout": [0.0, 0.1, 0.2], "lr": [0.001], "weight_decay": [0.0], "trials": 3, "seed": 0,
                     "seeds": [0, 1]},
            "metrics": {"val/auc": val, "test/auc": test, "test/logloss": 0.5}, "phases": {"stage 2": 1.0},
            "overrides": {"both": [], "align": [], "finetune": []}, "command": "ctrl bench --tune true"}


def test_the_choice_reads_validation_only_and_averages_over_the_tuning_seeds(tmp_path):
    # trial 1 is best on seed 0 alone, trial 2 on the mean over both seeds, trial 0 on test
    val = {0: (0.70, 0.70), 1: (0.75, 0.64), 2: (0.72, 0.71)}
    records = [record(arm, i, seed, val[i][seed], 0.9 if i == 0 else 0.6) for arm in ARMS for i in val
               for seed in (0, 1)]
    scores = trial_scores(records, "base", "dcn")
    assert tuning_winner(scores) == 2 and scores[2]["seeds"] == [0, 1]
    assert scores[2]["val_auc"] == pytest.approx(np.mean(val[2]))
    assert tuning_winner(trial_scores(records, "base", "dcn", seeds=[0])) == 1
    assert tuning_winner(trial_scores(records, "base", "dcn", trials=2)) == 0  # the current search's trials only
    # any test metrics: the same choice
    rng = np.random.default_rng(0)
    for r in records:
        r["metrics"]["test/auc"] = float(rng.uniform(0.5, 1.0))
    assert tuning_winner(trial_scores(records, "base", "dcn")) == 2
    # a tie goes to the first trial; an undefined AUC is never chosen
    assert tuning_winner({0: {"val_auc": 0.7}, 1: {"val_auc": 0.7}, 2: {"val_auc": float("nan")}}) == 0
    write_report(records, ["dcn"], tmp_path / "RESULTS.md", tmp_path / "auc.png", [], tmp_path / "results.jsonl")
    assert "Chosen: base: trial 2 (dropout 0.2, lr 0.001, weight_decay 0); ctrl: trial 2" in (
        tmp_path / "RESULTS.md").read_text()


def test_the_trials_are_drawn_once_from_the_grid_by_the_seed():
    grid = Tuning(dropout=[0.1, 0.3, 0.5], lr=[1e-3, 3e-3], weight_decay=[0.0, 1e-5], trials=12)
    everything = draw_trials(grid)
    assert len(everything) == 12 and len({tuple(t.values()) for t in everything}) == 12
    drawn = draw_trials(Tuning(**{**grid.__dict__, "trials": 4}))
    assert len(drawn) == 4 and all(t in everything for t in drawn)
    assert drawn == draw_trials(Tuning(**{**grid.__dict__, "trials": 4}))  # seeded: the same list every time
    assert drawn != draw_trials(Tuning(**{**grid.__dict__, "trials": 4, "seed": 1}))
    with pytest.raises(Exception, match="lr must list at least one value"):
        Tuning(lr=[])
