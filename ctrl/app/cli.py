"""The `ctrl` command.

    ctrl prepare --data_dir DIR          prepare a data set; print split sizes, positive rates and texts
    ctrl run --backbone NAME --data_dir DIR   the main job: stage 1 -> stage 2 -> test -> export
    ctrl bench --config configs/bench/ml100k.yaml   base vs CTRL over backbones and seeds -> RESULTS.md
    ctrl export --ckpt_path P --out DIR  export a stage-2 checkpoint for serving (weights, spec, .pt2, .onnx)
    ctrl score --model M --rows R --out O   click probabilities of new raw rows (CSV or parquet) -> parquet
    ctrl fit --config C.yaml             train one stage (Lightning CLI; the model's class_path picks it)
    ctrl validate --config C.yaml --ckpt_path P   validation metrics of a checkpoint
    ctrl test --config C.yaml --ckpt_path P       test metrics of a checkpoint (all rows and cold start)
    ctrl predict --config C.yaml --ckpt_path P    test-split probabilities -> predictions.parquet
    ctrl COMMAND --help                  every option of one command

W&B runs offline unless WANDB_API_KEY is set (no prompt, no network). CTRL_VERBOSE=1 also shows the libraries'
notices that say nothing about the run (ctrl/app/console.py).

Config files and examples named `configs/...` are read from the copy shipped with the package when the current
folder has none (ctrl/app/paths.py), so every command runs from any folder.

Data errors print one clear line and exit with status 2; nothing is half-written.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path

import pandas as pd
from jsonargparse import CLI
from jsonargparse.typing import NonNegativeInt, PositiveInt

from ctrl.app.console import quiet_console
from ctrl.app.paths import resolve_config_args, resolve_config_path
from tabular2text.download import ensure_movielens_100k
from tabular2text.oserrors import PathError, forget_origins, origin, path_error
from tabular2text.prepare import SPLITS, SplitRule
from tabular2text.prepare import prepare as prepare_data
from tabular2text.sources import DataError
from towers.checkpoints import CheckpointError, ConfigError, NonFiniteLossError

# Each command imports what it needs when it runs: `ctrl prepare` does not wait for Lightning (7 s here).


def prepare(*, data_dir: str, download: bool = False, history_length: PositiveInt = 10,
            template: str | dict[str, str] = "natural", cache_dir: str | None = None, show: NonNegativeInt = 3,
            split: SplitRule = "time") -> None:
    """Prepare a data set once (cached by fingerprint) and summarise it.

    Args:
        data_dir: MovieLens-100K / -1M or RecBole directory, or a schema YAML for generic data.
        download: fetch MovieLens-100K into data_dir when it is absent.
        history_length: number of most recent items in the behavior sequence.
        template: text template preset (natural, dash, colon, masked or values) or a mapping of
            template names to format strings that replace those of natural.
        cache_dir: where prepared data lives (default $CTRL_CACHE_DIR or ~/.cache/ctrl-rec).
        show: how many rendered texts of the train split to print.
        split: `time` (8:1:1 in time order) or `last_per_user` (each user's last interaction is test, the one
            before it validation).
    """
    data_dir = resolve_config_path(data_dir)
    if download:
        ensure_movielens_100k(Path(data_dir).expanduser())
    prepared = prepare_data(data_dir, cache_dir, history_length, template, split=split)
    print(f"prepared: {prepared}")
    print(f"{'split':<6} {'rows':>8} {'positive rate':>14}")
    for split in SPLITS:
        labels = pd.read_parquet(prepared / f"{split}.parquet", columns=["label"])["label"]
        print(f"{split:<6} {len(labels):>8} {labels.mean():>14.4f}")
    texts = pd.read_parquet(prepared / "train.parquet", columns=["user_text", "item_text"]).head(show)
    for user, item in texts.itertuples(index=False):
        print(f"\n{user} {item}")


USER_ERRORS = (DataError, ConfigError, FileNotFoundError, CheckpointError, NonFiniteLossError, PathError)


def user_error(error: BaseException | None) -> BaseException | None:
    """The error a user can fix, if `error` is one or was caused by one (jsonargparse wraps errors raised while
    it instantiates a class in an error of its own)."""
    while error is not None:
        line = path_error(error)  # the operating system's user-side errors (no space, read-only, ...)
        if line is not None or isinstance(error, USER_ERRORS):
            return line or error
        error = error.__cause__
    return None


def export(*, ckpt_path: str, out: str) -> None:
    """Export a stage-2 (fine-tuned) checkpoint for serving: weights, feature spec and model.pt2, loadable
    with finetune.export.load_scorer in a process without Lightning or a language model.

    Args:
        ckpt_path: a checkpoint of `ctrl fit` with a finetune_*.yaml config, e.g. .../checkpoints/best.ckpt.
        out: the export directory: new, empty or an earlier export, replaced only once the new export is
            complete (a folder holding anything else, the checkpoint or the current folder is refused).
    """
    from finetune.module import export_checkpoint

    print(f"exported: {export_checkpoint(ckpt_path, origin(out, '--out'))}")


def score(*, model: str, rows: str, out: str = "scores.parquet", batch_size: PositiveInt = 4096) -> None:
    """Score new rows with a trained model: the rows' user and item ids, `probability`, and `label` when the
    rows carry the training label's column.

    Args:
        model: an export directory (ctrl run / ctrl export) or a stage-2 checkpoint (.ckpt).
        rows: a CSV or parquet file of raw rows, with the columns of the training data (the label is optional).
        out: the parquet file to write; an existing one is replaced only once the new one is complete.
        batch_size: rows per forward pass.
    """
    from finetune.export import Scorer, load_scorer
    from finetune.module import load_stage2
    from finetune.score import score_file

    origin(model, "--model"), origin(rows, "--rows"), origin(out, "--out")
    # parquet bytes in scores.csv would mislead whoever opens it; a folder gets the writers' own line
    if Path(out).suffix != ".parquet" and not Path(out).is_dir():
        raise ConfigError(f"--out {out}: ctrl score writes a parquet file; name it *.parquet")
    if Path(model).is_dir():
        scorer = load_scorer(model, batch_size)
    else:
        module = load_stage2(model, "score", "--model")
        scorer = Scorer(module.model, module.spec, batch_size)
    scores = score_file(scorer, resolve_config_path(rows), out)
    print(f"scored {len(scores)} rows -> {out}")


COMMANDS = {"prepare": prepare, "run": "ctrl.app.pipeline:run", "bench": "ctrl.app.bench:bench", "export": export,
            "score": score}


def command(name: str):
    """The function of a command; `run` and `bench` live in modules that import Lightning."""
    target = COMMANDS[name]
    if isinstance(target, str):
        module, function = target.split(":")
        target = getattr(importlib.import_module(module), function)
    return target


WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")  # what wandb's settings accept


def wandb_mode() -> None:
    """W&B runs offline unless WANDB_API_KEY is set; an empty WANDB_MODE counts as unset, and a value wandb
    does not know is refused here, before any work, instead of deep in a fit's logger."""
    mode = os.environ.get("WANDB_MODE", "").strip()
    if mode and mode not in WANDB_MODES:
        raise ConfigError(f"the environment's WANDB_MODE={mode!r} is not a W&B mode; set it to one of"
                          f" {', '.join(WANDB_MODES[:3])} or unset it (offline without WANDB_API_KEY)")
    if not mode:
        os.environ["WANDB_MODE"] = "online" if os.environ.get("WANDB_API_KEY") else "offline"


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    quiet_console()
    if argv in ([], ["-h"], ["--help"]):
        usage = "usage: ctrl COMMAND ...\n\n" + __doc__.split("\n\n")[1].replace("    ctrl", "ctrl").rstrip()
        print(usage, file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    forget_origins()  # the paths of an earlier call in this process (tests, notebooks) name nothing now
    try:
        wandb_mode()
        if argv and argv[0] in COMMANDS:
            CLI({argv[0]: command(argv[0])}, args=resolve_config_args(argv))
        else:
            from ctrl.app.lightning_cli import lightning_cli

            lightning_cli(argv)
    except Exception as e:  # the one error boundary: a line, never a traceback (CTRL_DEBUG=1 shows it)
        problem = user_error(e)
        if problem is None and os.environ.get("CTRL_DEBUG"):
            raise
        if problem is None:
            where = traceback.extract_tb(e.__traceback__)[-1]
            problem = (f"unexpected {type(e).__name__} at {Path(where.filename).name}:{where.lineno}: {e}. If the"
                       " input looks right, rerun with CTRL_DEBUG=1 and report the traceback")
        print("error: " + " ".join(str(problem).split()), file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if "wandb" in sys.modules:  # a training command ran: close its W&B run, so its files are complete
            from ctrl.app.pipeline import finish_wandb

            finish_wandb()


if __name__ == "__main__":
    main()
