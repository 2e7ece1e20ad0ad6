"""Interrupted runs: a fit killed (SIGKILL) mid-epoch and resumed with `--ckpt_path last` ends exactly where
the uninterrupted fit with the same seed ends, for stage 1 and stage 2 (deterministic on CPU)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from helpers import small_config, write_small_ml1m

from ctrl.app.cli import main
from ctrl.app.lightning_cli import lightning_cli

KILL_AT_STEP = 14  # the fits below have 10 steps per epoch and save last.ckpt every 3 steps


class KillAtStep(pl.Callback):
    """Kills its own process with SIGKILL before training step `step`: no cleanup, no final checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def resumable_config(stage: str, target: Path, run_dir: Path, **model_args) -> Path:
    config = yaml.safe_load(small_config(stage, target, **model_args).read_text())
    # The shipped W&B logger stays: its folder per run id must not hide last.ckpt from the resumed fit.
    config["trainer"].update(max_epochs=3, enable_progress_bar=False, default_root_dir=str(run_dir))
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(run_dir)
    for callback in config["trainer"]["callbacks"]:
        if "every_n_train_steps" in callback.get("init_args", {}):
            callback["init_args"]["every_n_train_steps"] = 3
        elif callback["class_path"].endswith("EarlyStopping"):
            callback["init_args"]["patience"] = 10
    target.write_text(yaml.safe_dump(config))
    return target


def fit(config: Path, data: Path, *extra: str) -> None:
    main(["fit", "--config", str(config), "--data.data_dir", str(data), *extra])


def killed_fit(config: Path, data: Path) -> subprocess.CompletedProcess:
    """`ctrl fit` in a fresh process that is killed before step KILL_AT_STEP (mid-epoch 1)."""
    with_killer = yaml.safe_load(config.read_text())
    with_killer["trainer"]["callbacks"].append({"class_path": "test_resume.KillAtStep",
                                                "init_args": {"step": KILL_AT_STEP}})
    killer_config = config.with_name(f"killed-{config.name}")
    killer_config.write_text(yaml.safe_dump(with_killer))
    tests = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # test_resume.KillAtStep, helpers
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*tests, os.environ.get("PYTHONPATH", "")])}
    # its own W&B service, as a fit started from a shell has: one inherited from this process would still hold
    # the killed run's id when the resumed fit continues that run here
    env.pop("WANDB_SERVICE", None)
    return subprocess.run([sys.executable, "-m", "ctrl.app.cli", "fit", "--config", str(killer_config),
                           "--data.data_dir", str(data)], env=env, capture_output=True, text=True, timeout=300)


def state(path: Path) -> tuple[dict, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["global_step"]


def assert_same_run(uninterrupted: Path, resumed: Path) -> None:
    for name in ("last.ckpt", "best.ckpt"):
        (a, step_a), (b, step_b) = state(uninterrupted / "checkpoints" / name), state(resumed / "checkpoints" / name)
        assert step_a == step_b
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resuming"


@pytest.fixture(scope="module")
def data(tmp_path_factory, bert_dir):
    tmp = tmp_path_factory.mktemp("resume")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTRL_CACHE_DIR", str(tmp / "cache"))
        yield write_small_ml1m(tmp / "ml-1m", users=40, movies=30)


@pytest.mark.parametrize("stage", ["align", "finetune"])
def test_fit_killed_mid_epoch_and_resumed_from_last_equals_the_uninterrupted_fit(stage, data, bert_dir, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("CTRL_CACHE_DIR", str(data.parent / "cache"))
    extra = {"language_model": bert_dir, "warmup_steps": 5} if stage == "align" else {}
    straight = resumable_config(stage, tmp_path / "straight.yaml", tmp_path / "straight", **extra)
    interrupted = resumable_config(stage, tmp_path / "interrupted.yaml", tmp_path / "interrupted", **extra)

    fit(straight, data)
    killed = killed_fit(interrupted, data)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    _, step = state(tmp_path / "interrupted" / "checkpoints" / "last.ckpt")
    assert step == 12 and step % 10 != 0  # killed mid-epoch 1; the newest checkpoint is two steps older
    fit(interrupted, data, "--ckpt_path", "last")

    assert_same_run(tmp_path / "straight", tmp_path / "interrupted")
    runs = sorted((tmp_path / "interrupted" / "wandb").glob("offline-run-*"))  # the resumed fit continued the
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, runs  # killed one's W&B run
    if stage == "finetune":  # and the fine-tuned models score the test split identically
        metrics = []
        for run in ("straight", "interrupted"):
            cli = lightning_cli(["--config", str(tmp_path / f"{run}.yaml"), "--data.data_dir", str(data)], run=False)
            metrics += cli.trainer.test(cli.model, datamodule=cli.datamodule,
                                        ckpt_path=str(tmp_path / run / "checkpoints" / "best.ckpt"))
        assert metrics[0] == metrics[1]
        assert 0.5 < metrics[0]["test/auc"] <= 1
