"""The main job end to end (stage 1 -> stage 2 -> test -> export) from the real configs, on a small
MovieLens-1M-layout data set with a tiny BERT; the stage-1 -> stage-2 hand-over and its errors."""

import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (  # noqa: F401 (shared)
    AMAZON_BEAUTY_DROPOUT,
    ML100K_DROPOUT,
    ML100K_DROPOUT_OTHERS,
    small_config,
    wandb_records,
    write_small_ml1m,
)

from ctrl.app.cli import main
from ctrl.app.pipeline import stage_configs
from finetune.export import load_model
from towers import BACKBONES, named_backbone
from towers.checkpoints import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
# the config directories of the shipped benchmarks: one per data set
DATA_SETS = sorted({yaml.safe_load(p.read_text())["config_dir"] for p in (ROOT / "configs" / "bench").glob("*.yaml")})
STAGES = [("align", False), ("finetune", False), ("finetune", True)]


@pytest.mark.parametrize("config_dir", DATA_SETS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_stage_of_every_data_set_and_backbone_parses(config_dir, backbone, capsys):
    """What `ctrl run --backbone B --config_dir D` merges, for each stage: the backbone's own class and its own
    init_args (no other backbone's), the data set's tuned values only where it has them."""
    for stage, aligned in STAGES:
        configs = stage_configs(ROOT / config_dir, stage, backbone, aligned)
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *(a for c in configs for a in ("--config", c)), "--print_config"])
        assert exit_info.value.code == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        chosen = printed["model"]["init_args"]["backbone"]
        assert chosen["class_path"] == named_backbone(backbone)["class_path"]
        assert chosen["init_args"].keys() == named_backbone(backbone)["init_args"].keys()
        assert "feature_spec" not in printed["model"]["init_args"]  # linked from the data, never in YAML
        assert chosen["init_args"]["dropout"] == shipped_dropout(Path(config_dir).name, stage, aligned, backbone)


def shipped_dropout(data_set: str, stage: str, aligned: bool, backbone: str) -> float:
    """A data set's tuned stage-2 dropout; in stage 1, and where nothing was tuned, the stages' 0.1."""
    if stage == "align":
        return 0.1
    if data_set == "amazon-beauty":
        return AMAZON_BEAUTY_DROPOUT.get(backbone, (0.1, 0.1))[aligned]
    return ML100K_DROPOUT.get(backbone, ML100K_DROPOUT_OTHERS)[aligned]


def test_every_shipped_config_is_used_by_a_test_or_a_benchmark():
    """configs/ holds nothing that could rot unseen: the stages' bases and each data set's files are what
    `ctrl run` / `ctrl bench` merge (parsed above), the bench configs and their overlays are parsed by test_bench,
    the README's own-data examples run verbatim in test_own_data."""
    used = {ROOT / "configs" / "generic" / "schema.yaml"}
    for path in (ROOT / "configs" / "bench").glob("*.yaml"):
        bench = yaml.safe_load(path.read_text())
        used.add(path)
        used.update(ROOT / args[i + 1] for a in bench.get("ablations", []) for args in (a.get("align_args", []),)
                    for i, arg in enumerate(args) if arg == "--config")
        for backbone in BACKBONES:
            for stage, aligned in STAGES:
                used.update(Path(c).resolve() for c in stage_configs(ROOT / bench["config_dir"], stage, backbone,
                                                                     aligned) if not c.startswith("{"))
    shipped = set((ROOT / "configs").rglob("*.yaml"))
    assert shipped - used == set()


def test_main_job_runs_both_stages_and_exports(small_run, capsys):
    out = small_run / "out"
    align_ckpt = next((out / "align").rglob("best.ckpt"))
    finetune_ckpt = next((out / "finetune").rglob("best.ckpt"))
    # Stage 2 started from the aligned tower: its saved hyper-parameters name the stage-1 checkpoint.
    hparams = torch.load(finetune_ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["init_from"] == str(align_ckpt)
    model, spec = load_model(out / "finetune" / "export")
    assert not any("language" in k or "text" in k for k in model.state_dict())  # only the CTR model ships
    assert spec.item_noun == "movie"
    # each stage has its own W&B run; the stage-2 run carries the exported model as an artifact
    assert len(list((out / "align").glob("wandb/offline-run-*"))) == 1
    (run_file,) = (out / "finetune").glob("wandb/offline-run-*/run-*.wandb")
    artifacts = [r.artifact for r in wandb_records(run_file) if r.WhichOneof("record_type") == "artifact"]
    assert [a.type for a in artifacts] == ["model"]
    assert {f.path for f in artifacts[0].manifest.contents} >= {"weights.safetensors", "model.json", "model.pt2"}


def test_a_resumed_fit_replaces_its_own_export(small_run, tmp_path, monkeypatch):
    """An export replaces only an empty folder or an earlier export (finetune.export.may_replace): a fit's own
    export, <default_root_dir>/export beside its checkpoints, is one, so the fit resumed there replaces it."""
    run = Path(shutil.copytree(small_run / "out" / "finetune", tmp_path / "run"))
    earlier = (run / "export" / "model.json").stat().st_ino
    monkeypatch.setenv("CTRL_CACHE_DIR", str(small_run / "cache"))
    main(["fit", "--config", str(small_run / "configs" / "finetune.yaml"), "--data.data_dir", str(small_run / "ml-1m"),
          "--trainer.logger", "false", "--trainer.default_root_dir", str(run), "--ckpt_path", "last"])
    assert (run / "export" / "model.json").stat().st_ino != earlier
    assert load_model(run / "export")[1].item_noun == "movie"


def test_init_from_changes_the_starting_tower(small_run):
    from finetune.module import load_aligned_tower
    from tabular2text.schema import FeatureSpec
    from towers import DCN

    align_ckpt = next((small_run / "out" / "align").rglob("best.ckpt"))
    ckpt = torch.load(align_ckpt, map_location="cpu", weights_only=True)
    spec = FeatureSpec.from_dict(ckpt["hyper_parameters"]["feature_spec"])
    tower = DCN(spec, embed_dim=8, mlp_dims=[32, 16])
    load_aligned_tower(align_ckpt, tower, spec)
    for name, value in tower.state_dict().items():
        torch.testing.assert_close(value, ckpt["state_dict"][f"tower.{name}"])


def test_init_keep_embeddings_takes_only_the_field_embeddings(small_run):
    from finetune.module import load_aligned_tower
    from tabular2text.schema import FeatureSpec
    from towers import DCN

    align_ckpt = next((small_run / "out" / "align").rglob("best.ckpt"))
    ckpt = torch.load(align_ckpt, map_location="cpu", weights_only=True)
    spec = FeatureSpec.from_dict(ckpt["hyper_parameters"]["feature_spec"])
    torch.manual_seed(0)
    fresh = DCN(spec, embed_dim=8, mlp_dims=[32, 16]).state_dict()
    torch.manual_seed(0)
    tower = DCN(spec, embed_dim=8, mlp_dims=[32, 16])
    load_aligned_tower(align_ckpt, tower, spec, keep="embeddings")
    names = tower.state_dict().keys()
    assert any(n.startswith("embedding.") for n in names) and any(not n.startswith("embedding.") for n in names)
    for name, value in tower.state_dict().items():
        if name.startswith("embedding."):
            torch.testing.assert_close(value, ckpt["state_dict"][f"tower.{name}"])
        else:  # the backbone keeps its fresh initialisation
            assert torch.equal(value, fresh[name]), name
    aligned_backbone = [n for n in names if not n.startswith("embedding.") and n.endswith("weight")]
    assert any(not torch.equal(fresh[n], ckpt["state_dict"][f"tower.{n}"]) for n in aligned_backbone)


def test_stage2_checkpoint_given_as_init_from_is_refused(small_run):
    from finetune.module import load_aligned_tower
    from tabular2text.schema import FeatureSpec
    from towers import DCN

    finetune_ckpt = next((small_run / "out" / "finetune").rglob("best.ckpt"))
    spec = FeatureSpec.from_dict(torch.load(finetune_ckpt, weights_only=True)["hyper_parameters"]["feature_spec"])
    with pytest.raises(CheckpointError, match="is a stage-2 .* takes a stage-1 alignment checkpoint"):
        load_aligned_tower(finetune_ckpt, DCN(spec, embed_dim=8, mlp_dims=[32, 16]), spec)


def test_init_from_other_data_or_backbone_is_refused(small_run):
    from dataclasses import replace

    from finetune.module import load_aligned_tower
    from tabular2text.schema import FeatureSpec
    from towers import DCN, DeepFM

    align_ckpt = next((small_run / "out" / "align").rglob("best.ckpt"))
    spec = FeatureSpec.from_dict(torch.load(align_ckpt, weights_only=True)["hyper_parameters"]["feature_spec"])
    with pytest.raises(CheckpointError, match="different backbone"):
        load_aligned_tower(align_ckpt, DeepFM(spec, embed_dim=8, mlp_dims=[32, 16]), spec)
    bigger = spec.with_fields(tuple(replace(f, vocab_size=f.vocab_size + 5) if f.name == "user_id" else f
                                    for f in spec.fields))
    with pytest.raises(CheckpointError, match="other data: field 'user_id'"):
        load_aligned_tower(align_ckpt, DCN(bigger, embed_dim=8, mlp_dims=[32, 16]), bigger)


def test_cli_refuses_a_stage2_checkpoint_as_init_from_with_one_clear_line(small_run, capsys, monkeypatch):
    monkeypatch.setenv("CTRL_CACHE_DIR", str(small_run / "cache"))
    finetune_ckpt = next((small_run / "out" / "finetune").rglob("best.ckpt"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(small_run / "configs" / "finetune.yaml"), "--data.data_dir",
              str(small_run / "ml-1m"), "--trainer.logger", "false", "--trainer.fast_dev_run", "1",
              "--model.init_args.init_from", str(finetune_ckpt)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: init_from: {finetune_ckpt} is a stage-2 (fine-tuned) checkpoint")


def test_checkpoint_of_the_wrong_stage_is_refused(small_run, bert_dir):
    """Through Lightning directly (LightningCLI instead rebuilds whatever module the checkpoint holds)."""
    import pytorch_lightning as pl

    from ctrl.align.module import AlignmentModule
    from finetune.module import CTRModule
    from tabular2text.datamodule import CTRDataModule
    from towers import DCN

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTRL_CACHE_DIR", str(small_run / "cache"))
        dm = CTRDataModule(str(small_run / "ml-1m"), batch_size=64, text_cache_dir=str(small_run / "text-vectors"))
    align_ckpt = next((small_run / "out" / "align").rglob("best.ckpt"))
    module = CTRModule(dm.feature_spec.to_dict(), partial(DCN, embed_dim=8, mlp_dims=[32, 16]))
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, default_root_dir=small_run / "wrong")
    with pytest.raises(CheckpointError, match="not a stage-2 .* through --model.init_args.init_from instead"):
        trainer.validate(module, datamodule=dm, ckpt_path=align_ckpt)

    finetune_ckpt = next((small_run / "out" / "finetune").rglob("best.ckpt"))
    aligner = AlignmentModule(dm.feature_spec.to_dict(), partial(DCN, embed_dim=8, mlp_dims=[32, 16]),
                              language_model=bert_dir)
    with pytest.raises(CheckpointError, match="not a stage-1 .* with a finetune_\\*.yaml config"):
        trainer.validate(aligner, datamodule=dm, ckpt_path=finetune_ckpt)
