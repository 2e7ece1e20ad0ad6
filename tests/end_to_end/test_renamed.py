"""Class paths renamed when stage 1 went to ctrl/align and the application to ctrl/app: a config, a command
line or a checkpoint naming an old one is refused with one line that names the new one."""

import pytest
import torch
from helpers import STAGES, ml100k_configs

from ctrl.app.cli import main
from ctrl.app.renamed import new_name


def test_every_old_path_has_a_new_one_that_imports():
    import importlib

    for old, new in [("ctrl.module.AlignmentModule", "ctrl.align.module.AlignmentModule"),
                     ("ctrl.probe.TransferProbe", "ctrl.align.probe.TransferProbe"),
                     ("ctrl.probe.ValidateEvery", "ctrl.align.validate_every.ValidateEvery"),
                     ("ctrl.lightning.RandomState", "ctrl.app.lightning_cli.RandomState"),
                     ("finetune.guards.CheckpointError", "towers.checkpoints.CheckpointError")]:
        assert new_name(old) == new
        module, _, name = new.rpartition(".")
        assert hasattr(importlib.import_module(module), name)
    assert new_name("finetune.module.CTRModule") is None and new_name("towers.DCN") is None


def error_line(capsys, args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


def test_a_config_or_command_line_naming_an_old_class_path_is_refused_with_its_new_name(tmp_path, capsys):
    old = tmp_path / "align.yaml"
    old.write_text((STAGES / "align.yaml").read_text().replace("ctrl.align.module.", "ctrl.module.")
                   .replace("ctrl.align.validate_every.", "ctrl.probe."))
    line = error_line(capsys, ["fit", "--config", str(old), "--print_config"])
    assert line.startswith(f"error: {old} names ctrl.probe.ValidateEvery, which is now"
                           " ctrl.align.validate_every.ValidateEvery")
    line = error_line(capsys, ["fit", "--config", str(STAGES / "align.yaml"),
                               "--trainer.callbacks+=ctrl.probe.TransferProbe", "--print_config"])
    assert "names ctrl.probe.TransferProbe, which is now ctrl.align.probe.TransferProbe" in line


def test_a_checkpoint_of_an_old_class_path_is_refused_with_its_new_name(tmp_path, capsys):
    ckpt = tmp_path / "old.ckpt"
    torch.save({"stage": 1, "state_dict": {}, "hyper_parameters": {"_class_path": "ctrl.module.AlignmentModule"}},
               ckpt)
    line = error_line(capsys, ["validate", *ml100k_configs("align"), "--ckpt_path", str(ckpt)])
    assert line.startswith(f"error: --ckpt_path {ckpt} was written by ctrl.module.AlignmentModule, which is now"
                           " ctrl.align.module.AlignmentModule")
    assert "init_from" in line
