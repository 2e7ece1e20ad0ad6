"""A quiet console: `ctrl run` shows its phases, progress bars and metrics, not the libraries' notices about
themselves (those only with CTRL_VERBOSE=1)."""

import logging
import os
import subprocess
import sys
import warnings

import pytest
from helpers import small_config_dir, write_small_ml1m

from ctrl.app.console import (
    LEAFSPEC_DEPRECATION,
    LITLOGGER_TIP,
    RANK_ZERO_LOGGERS,
    not_the_litlogger_tip,
    quiet_console,
)

# what every stage printed before (issue 36), by a piece of each message
NOTICES = {
    "Lightning: args and command line arguments": "LightningCLI's args parameter is intended to run from within",
    "W&B: anonymous": "The anonymous setting has no effect",
    "W&B: git root": "git root",
    "Lightning: litlogger tip": "litlogger",
    "torch: pytree deprecation": "isinstance(treespec, LeafSpec)",
}
LEAFSPEC = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."


@pytest.mark.slow
def test_a_short_run_prints_its_phases_and_metrics_and_no_library_notices(tmp_path, bert_dir):
    data = write_small_ml1m(tmp_path / "ml-1m")
    configs = small_config_dir(tmp_path / "configs", bert_dir, tmp_path / "text-vectors")
    env = {k: v for k, v in os.environ.items() if k != "CTRL_VERBOSE"}
    env.update(CTRL_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline")
    # a relative --out that does not exist yet, as a user types it (W&B looked for a git repository there)
    done = subprocess.run([sys.executable, "-m", "ctrl.app.cli", "run", "--config_dir", str(configs), "--data_dir",
                           str(data), "--out", "out"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert [name for name, piece in NOTICES.items() if piece in console] == []
    for line in ("Epoch ", "test/auc", "test AUC", "wall time per phase:", "stage 1 (incl. text encoding)",
                 "stage 2", "export"):
        assert line in done.stdout, line
    assert "wandb: Run summary:" in done.stderr  # W&B's own report of the run stays


def emit_leafspec(module: str, message: str = LEAFSPEC, category=FutureWarning) -> None:
    warnings.warn_explicit(message, category, f"{module}.py", 21, module=module)


def test_the_filters_are_narrow_and_ctrl_verbose_keeps_everything(monkeypatch):
    lightning_logger = logging.getLogger(RANK_ZERO_LOGGERS[0])
    tip = logging.makeLogRecord({"msg": LITLOGGER_TIP + ", try installing litlogger", "levelno": logging.INFO})
    other = logging.makeLogRecord({"msg": "GPU available: False, used: False", "levelno": logging.INFO})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lightning_logger.removeFilter(not_the_litlogger_tip)
        monkeypatch.setenv("CTRL_VERBOSE", "1")
        quiet_console()
        emit_leafspec("pytorch_lightning.utilities._pytree")
        assert len(caught) == 1 and lightning_logger.filter(tip)

        monkeypatch.delenv("CTRL_VERBOSE")
        quiet_console()
        caught.clear()
        emit_leafspec("pytorch_lightning.utilities._pytree")
        emit_leafspec("copyreg")
        assert caught == []
        # the same message from another module, another message or category from the same module: kept
        emit_leafspec("mypackage.pytree")
        emit_leafspec("pytorch_lightning.utilities._pytree", "`tree_flatten` is deprecated")
        emit_leafspec("copyreg", category=DeprecationWarning)
        assert len(caught) == 3
        assert not lightning_logger.filter(tip) and lightning_logger.filter(other)
    assert LEAFSPEC.startswith(LEAFSPEC_DEPRECATION.replace("\\", ""))
