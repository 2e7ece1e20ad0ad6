"""`ctrl bench --tune true`: both arms' stage 2 searched on the data at hand with the same budget, before they
are compared.

For each backbone, the baseline (stage 2 from scratch) and CTRL (stage 2 from the aligned tower) each train
the same list of trials, drawn once from a grid of dropout x learning rate x weight decay, on the tuning seeds;
per (arm, backbone) the trial with the best mean validation AUC wins (`ctrl.app.report.tuning_winner`; test metrics
are never read), and the winners become the benchmark's `base` and `ctrl` rows. The winners are also written as
config overlays a user can ship (`write_overlays`: the backbone's class_path and all of its init_args, and the
chosen values): OUT/tuned/finetune/BACKBONE.yaml (the baseline's) and OUT/tuned/finetune_aligned/BACKBONE.yaml
(CTRL's stage 2), in the shape of a config directory, so `cp -r OUT/tuned/. CONFIG_DIR/` ships them
(`ctrl.app.pipeline.stage_configs` reads both).
"""

from __future__ import annotations

import itertools
import random
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

from ctrl.app.paths import resolve_config_path
from ctrl.app.pipeline import ALIGNED_OVERLAY
from ctrl.app.report import trial_scores, tuning_winner
from tabular2text.atomic import atomic_write_text
from towers.checkpoints import ConfigError
from towers.collaborative import Dropout

# The searched settings and the stage-2 option each one sets. One table for the runs' arguments and the
# overlays' keys, so a shipped overlay holds exactly what the winning trial trained with.
TUNED_OPTIONS = {"dropout": "model.init_args.backbone.init_args.dropout", "lr": "model.init_args.lr",
                 "weight_decay": "model.init_args.weight_decay"}


@dataclass
class Tuning:
    """The stage-2 search of `ctrl bench --tune true`, the same for both arms.

    Args:
        dropout: the backbone's MLP dropout values.
        lr: Adam learning rates.
        weight_decay: Adam weight decays.
        trials: how many settings of the grid (dropout x lr x weight_decay) each arm trains per backbone; all
            of them when the grid holds no more.
        seed: draws the trials from the grid (the same list for both arms and every backbone).
        seeds: the seeds every trial trains with; a trial's score is its mean validation AUC over them.
    """

    dropout: list[Dropout] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7])
    lr: list[PositiveFloat] = field(default_factory=lambda: [0.001, 0.003])
    weight_decay: list[NonNegativeFloat] = field(default_factory=lambda: [0.0, 1e-5])
    trials: PositiveInt = 8
    seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        empty = [name for name in (*TUNED_OPTIONS, "seeds") if not getattr(self, name)]
        if empty:
            raise ConfigError(f"tuning: {', '.join(empty)} must list at least one value")


TUNING = Tuning()  # bench's default; never mutated


def draw_trials(tuning: Tuning) -> list[dict[str, float]]:
    """The trials: `tuning.trials` settings drawn without replacement from the grid with `tuning.seed`, in
    grid order (the whole grid when it holds no more). Both arms get this one list."""
    grid = [dict(zip(TUNED_OPTIONS, values, strict=True)) for values in
            itertools.product(*(dict.fromkeys(float(v) for v in getattr(tuning, name)) for name in TUNED_OPTIONS))]
    if tuning.trials >= len(grid):
        return grid
    return [grid[i] for i in sorted(random.Random(tuning.seed).sample(range(len(grid)), tuning.trials))]


def choose(records: list[dict], arm: str, backbone: str, tuning: Tuning, trials: int) -> tuple[int, dict]:
    """The winning trial of one arm on one backbone, among the current search's trials and tuning seeds (a store
    may also hold an earlier, larger search's): its index and score (values, mean validation AUC, seeds)."""
    scores = trial_scores(records, arm, backbone, list(tuning.seeds), trials)
    best = tuning_winner(scores)  # validation AUC only: test metrics never reach the choice
    if best is None:
        raise ConfigError(f"no {arm} trial on {backbone} has a defined validation AUC; nothing to choose")
    return best, scores[best]


def trial_args(values: dict[str, float]) -> list[str]:
    """A trial's settings as stage-2 arguments."""
    return [arg for name, value in values.items() for arg in (f"--{TUNED_OPTIONS[name]}", repr(value))]


def trial_name(arm: str, index: int) -> str:
    """The variant name of an arm's trial in results.jsonl and run folders, e.g. base_trial3."""
    return f"{arm}_trial{index}"


def grid_record(tuning: Tuning) -> dict:
    """The search as recorded with each trial, so the report needs nothing but results.jsonl."""
    return asdict(tuning)


def nested(dotted: str, value) -> dict:
    """{"a": {"b": value}} from "a.b"."""
    for key in reversed(dotted.split(".")):
        value = {key: value}
    return value


def merge(into: dict, update: dict) -> dict:
    """`update` merged into `into` key by key (nested mappings merged, other values replaced), in place."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def write_overlays(tuned_dir: Path, config_dir: Path, backbone: str, arm_align: bool, values: dict[str, float],
                   trained: dict, why: str) -> Path:
    """Write an arm's chosen values as the overlay `ctrl run --config_dir` reads, and return its path. Like every
    backbone overlay it states the backbone's class_path and all of its init_args: those the winning trial trained
    with (`trained`, its merged config), so the overlay rebuilds that model whatever the files before it say.

    The baseline's (arm_align false) is `tuned_dir/finetune/BACKBONE.yaml`: the config directory's own backbone
    overlay, when it has one (e.g. a tuned batch size), with the backbone and the chosen values set. CTRL's is
    `tuned_dir/finetune_aligned/BACKBONE.yaml`: the backbone and the chosen values, merged after
    finetune_aligned.yaml when stage 2 starts from stage 1.
    """
    chosen: dict = {"model": {"init_args": {"backbone": trained["model"]["init_args"]["backbone"]}}}
    for name, value in values.items():
        merge(chosen, nested(TUNED_OPTIONS[name], value))
    stage = Path(ALIGNED_OVERLAY).stem if arm_align else "finetune"
    path = tuned_dir / stage / f"{backbone}.yaml"
    content: dict = {}
    source = Path(resolve_config_path(str(config_dir))) / "finetune" / f"{backbone}.yaml"
    if not arm_align and source.is_file():
        content = yaml.safe_load(source.read_text()) or {}
        if not isinstance(content, dict):
            raise ConfigError(f"{source} is no mapping of options; it cannot take the tuned values")
        content.get("model", {}).get("init_args", {}).pop("backbone", None)  # replaced whole, never merged
    merge(content, chosen)
    # wrapped, so the shipped file reads like the hand-written overlays beside it
    header = "".join(f"# {line}\n" for line in textwrap.wrap(why, 116, break_long_words=False, break_on_hyphens=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, header + yaml.safe_dump(content, sort_keys=False))
    return path
