"""Stage 2 through the real CLI on ML-100K: fine-tuning, init_from, export round trip, W&B offline files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import CONFIGS, ML100K, ML100K_DROPOUT, ML100K_DROPOUT_OTHERS, ROOT, STAGES, ml100k_configs, wandb_records

from ctrl.app.cli import main
from finetune.export import encode_rows, load_scorer
from tabular2text.encode import frame_to_tensors
from tabular2text.prepare import labelled_splits
from tabular2text.sources import read_table
from towers import BACKBONES


def fit_args(tmp: Path, cache: Path, *extra: str) -> list[str]:
    return [*ml100k_configs("finetune"), "--data.data_dir", str(ML100K), "--data.cache_dir", str(cache),
            "--trainer.default_root_dir", str(tmp), "--trainer.logger.init_args.save_dir", str(tmp), *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_init_lr_scale_slows_only_the_weights_stage_1_initialised():
    from functools import partial

    from helpers import synthetic_spec

    from finetune.module import CTRModule
    from towers import DeepFM

    spec = synthetic_spec().to_dict()
    tower = partial(DeepFM, embed_dim=4, mlp_dims=(8,))

    def lrs(**options) -> list[tuple[float, int]]:
        module = CTRModule(spec, tower, lr=0.01, **options)
        optimizer = module.configure_optimizers()
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.parameters()))
        return [(g["lr"], sum(p.numel() for p in g["params"])) for g in optimizer.param_groups]

    module = CTRModule(spec, tower)
    sizes = {name: sum(p.numel() for p in part.parameters()) for name, part in
             (("tower", module.model.tower), ("embedding", module.model.tower.embedding), ("all", module))}
    assert lrs() == lrs(init_lr_scale=0.1) == [(0.01, sizes["all"])]  # no init_from: one rate
    assert lrs(init_from="align.ckpt") == [(0.01, sizes["all"])]
    assert lrs(init_from="align.ckpt", init_lr_scale=0.1) == [
        (pytest.approx(0.001), sizes["tower"]), (0.01, sizes["all"] - sizes["tower"])]
    assert lrs(init_from="align.ckpt", init_lr_scale=0.1, init_keep="embeddings") == [
        (pytest.approx(0.001), sizes["embedding"]), (0.01, sizes["all"] - sizes["embedding"])]


def test_proximal_term_is_half_its_weight_times_the_squared_distance_of_the_aligned_weights():
    from functools import partial

    from helpers import synthetic_batch, synthetic_spec

    from finetune.module import CTRModule
    from towers import DeepFM

    spec = synthetic_spec()
    module = CTRModule(spec.to_dict(), partial(DeepFM, embed_dim=4, mlp_dims=(8,), dropout=0.0), init_from="align.ckpt",
                       init_keep="embeddings", proximal=0.5)
    aligned = module.aligned_parameters()
    assert {name for name, _ in aligned} == {n for n, _ in module.model.tower.embedding.named_parameters()}
    module.anchor = {name: p.detach().clone() for name, p in aligned}
    assert module.proximal_loss().item() == 0.0
    module.anchor = {name: p.detach() - 2.0 for name, p in aligned}  # every aligned weight 2 away
    numel = sum(p.numel() for _, p in aligned)
    assert module.proximal_loss().item() == pytest.approx(0.5 * 0.5 * 4.0 * numel)
    batch = synthetic_batch(spec, 8)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(module(batch), batch["label"])
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    assert module.training_step(batch, 0).item() == pytest.approx(plain.item() + 0.5 * 0.5 * 4.0 * numel, rel=1e-6)
    module.training_step(batch, 0).backward()
    head = dict(module.model.named_parameters())["head.weight"]
    assert head.grad is not None  # the fresh head learns from the labels; the pull acts on the aligned weights
    assert all(p.grad is not None for _, p in aligned)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_stage2_on_ml100k_fast_dev_run_per_backbone(tmp_path, cache, backbone):
    """The backbone by name (`ctrl run --backbone`): its class with its own init_args, ML-100K's tuned values
    (the baseline's lr, batch and dropout for the four paper backbones, `ctrl bench --tune true`'s choice; dropout
    0.8 for the others), and two real steps."""
    from pytorch_lightning.cli import LightningCLI

    from ctrl.app.lightning_cli import lightning_cli
    from ctrl.app.pipeline import stage_configs
    from towers import named_backbone

    cli: LightningCLI = lightning_cli([
        *(a for c in stage_configs(CONFIGS, "finetune", backbone) for a in ("--config", c)), "--data.data_dir",
        str(ML100K), "--data.cache_dir", str(cache), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger", "false", "--trainer.fast_dev_run", "2"], run=False)
    assert type(cli.model.model.tower) is BACKBONES[backbone]
    tuned = {"wide_deep": (0.003, 2048), "deepfm": (0.003, 2048), "dcn": (0.003, 2048), "autoint": (0.001, 512)}
    assert (cli.model.hparams.lr, cli.datamodule.hparams.batch_size) == tuned.get(backbone, (0.001, 2048))
    # nothing of DCN's settings in the stage base reaches another backbone: its own defaults, ML-100K's dropout
    dropout = ML100K_DROPOUT.get(backbone, ML100K_DROPOUT_OTHERS)[0]  # the baseline's
    assert cli.model.hparams.backbone["init_args"] == {**named_backbone(backbone)["init_args"], "dropout": dropout}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2


def test_a_backbone_overlay_states_its_class_and_all_of_its_init_args():
    """Each shipped overlay of one backbone names its class and every constructor argument, so no value comes
    from a file that names another backbone."""
    from towers import named_backbone

    overlays = sorted((ROOT / "configs").glob("*/finetune*/*.yaml"))
    assert {p.relative_to(ROOT / "configs").as_posix() for p in overlays} == {
        f"{data}/{stage}/{backbone}.yaml" for data in ("ml100k", "amazon-beauty")
        for stage in ("finetune", "finetune_aligned") for backbone in ("wide_deep", "deepfm", "dcn", "autoint")}
    for path in overlays:
        backbone = yaml.safe_load(path.read_text())["model"]["init_args"]["backbone"]
        assert backbone["class_path"] == named_backbone(path.stem)["class_path"]
        assert backbone["init_args"].keys() == named_backbone(path.stem)["init_args"].keys(), path


def test_the_configs_of_a_stage_in_merge_order():
    from ctrl.app.pipeline import stage_configs
    from towers import named_backbone
    from towers.checkpoints import ConfigError

    def names(config_dir: Path, *args) -> list[str]:
        configs = stage_configs(config_dir, *args)
        assert Path(configs[0]).resolve() == STAGES / f"{args[0]}.yaml"
        assert yaml.safe_load(configs[1]) == {"model": {"init_args": {"backbone": named_backbone(args[1])}}}
        return [Path(f).relative_to(config_dir).as_posix() for f in configs[2:]]

    shipped = CONFIGS
    assert names(shipped, "finetune", "autoint", False) == ["finetune.yaml", "finetune/autoint.yaml"]
    # CTRL's stage 2: the overlay for all backbones, then the backbone's own aligned one (what `ctrl bench --tune
    # true` chose), the more specific last; a backbone without one takes the overlay for all
    assert names(shipped, "finetune", "autoint", True) == ["finetune.yaml", "finetune/autoint.yaml",
                                                            "finetune_aligned.yaml", "finetune_aligned/autoint.yaml"]
    assert names(shipped, "finetune", "pnn", True) == ["finetune.yaml", "finetune_aligned.yaml"]
    assert names(shipped, "align", "autoint", True) == ["align.yaml"]  # stage 1 has no aligned overlay
    # a data set with per-backbone values only: a backbone without them takes the bases, CTRL's stage 2 included
    beauty = ROOT / "configs" / "amazon-beauty"
    assert names(beauty, "finetune", "dcn", True) == ["finetune.yaml", "finetune/dcn.yaml", "finetune_aligned/dcn.yaml"]
    assert names(beauty, "finetune", "pnn", True) == names(beauty, "finetune", "pnn", False) == ["finetune.yaml"]
    with pytest.raises(ConfigError, match="unknown backbone 'dnc'; known: wide_deep, deepfm, dcn"):
        stage_configs(shipped, "finetune", "dnc")


def test_ctrl_fit_names_its_run_folder_after_the_data_set_stage_and_backbone(tmp_path, monkeypatch):
    from ctrl.app.lightning_cli import lightning_cli

    monkeypatch.chdir(tmp_path)
    for extra, folder in (([], "finetune_dcn"), (["--config", str(CONFIGS / "finetune" / "deepfm.yaml")],
                                                 "finetune_deepfm")):
        cli = lightning_cli([*ml100k_configs("finetune"), *extra, "--data.data_dir", str(ML100K)], run=False)
        assert cli.trainer.default_root_dir == f"runs/ml-100k/{folder}"
        logger = cli.config.trainer.logger.init_args
        assert (logger.name, logger.save_dir, cli.trainer.logger.save_dir) == (
            f"ml-100k-{folder.replace('_', '-', 1)}", f"runs/ml-100k/{folder}", f"runs/ml-100k/{folder}")
    given = lightning_cli([*ml100k_configs("finetune"), "--data.data_dir", str(ML100K), "--trainer.default_root_dir",
                           "mine", "--trainer.logger", "false"], run=False)
    assert given.trainer.default_root_dir == "mine"


def test_a_ctrl_fit_checkpoint_reloads_without_arguments_and_exports(tmp_path, cache, capsys):
    """`ctrl fit` -> CTRModule.load_from_checkpoint(best.ckpt) with no arguments predicts as the trained
    model; `ctrl export` of it scores raw test rows the same; a stage-1 checkpoint is refused in one line."""
    from finetune.module import CTRModule

    main(["fit", *fit_args(tmp_path, cache, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "5",
                           "--trainer.logger", "false")])
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    module = CTRModule.load_from_checkpoint(ckpt).eval()
    assert module.hparams.backbone["class_path"] == "towers.collaborative.DCN"
    assert module.hparams.backbone["init_args"]["mlp_dims"] == [256, 128, 64]
    rows = labelled_splits(read_table(ML100K))["test"].head(500).reset_index(drop=True)
    with torch.no_grad():
        expected = torch.sigmoid(module(frame_to_tensors(encode_rows(rows, module.spec), module.spec))).numpy()
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "export")])
    assert "exported:" in capsys.readouterr().out
    np.testing.assert_allclose(load_scorer(tmp_path / "export")(rows), expected, atol=1e-6)

    state = torch.load(ckpt, weights_only=True)
    assert state["stage"] == 2
    state["stage"] = 1
    torch.save(state, tmp_path / "align.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(tmp_path / "align.ckpt"), "--out", str(tmp_path / "export2")])
    assert exit_info.value.code == 2
    assert "is a stage-1 (alignment) checkpoint; export takes a stage-2 checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "export2").exists()


def test_train_export_and_score_raw_rows_in_a_fresh_process(tmp_path, cache, capsys):
    """One real epoch, test, predict to parquet, export; a new process loads the export and scores raw
    test rows: equal to the fine-tuned model's predictions within 1e-6. W&B wrote its files offline."""
    out = tmp_path / "run"
    main(["run", "--baseline", "true", "--config_dir", str(ROOT / "configs" / "ml100k"), "--data_dir", str(ML100K),
          "--out", str(out), "--max_epochs_finetune", "1"])
    text = capsys.readouterr().out
    assert "test AUC" in text and "wall time per phase" in text

    # `ctrl test` and `ctrl predict` on the best checkpoint
    ckpt = next((out / "finetune").rglob("best*.ckpt"))
    main(["test", *fit_args(out / "test", cache), "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    assert "test_cold/auc" in capsys.readouterr().out
    main(["predict", *fit_args(out / "predict", cache), "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    predicted = pd.read_parquet(out / "predict" / "predictions.parquet")
    assert len(predicted) == 7286 and predicted.probability.between(0, 1).all()

    script = f"""
import sys, numpy as np
from tabular2text.prepare import labelled_splits
from tabular2text.sources import read_table
from tabular2text.encode import frame_to_tensors
from finetune.export import encode_rows, load_scorer
from towers import BACKBONES
rows = labelled_splits(read_table({str(ML100K)!r}))["test"].drop(columns=["label", "rating"])
np.save({str(tmp_path / 'scores.npy')!r}, load_scorer({str(out / 'finetune' / 'export')!r})(rows))
assert "pytorch_lightning" not in sys.modules and "transformers" not in sys.modules, sorted(sys.modules)
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    scores = np.load(tmp_path / "scores.npy")
    np.testing.assert_allclose(scores, predicted.sort_values("row").probability.to_numpy(), atol=1e-6)


def test_scorer_handles_unseen_missing_and_extra_columns(tmp_path, cache):
    out = tmp_path / "run"
    main(["run", "--baseline", "true", "--config_dir", str(ROOT / "configs" / "ml100k"), "--data_dir", str(ML100K),
          "--out", str(out), "--max_epochs_finetune", "1"])
    scorer = load_scorer(out / "finetune" / "export")
    rows = labelled_splits(read_table(ML100K))["test"].head(4).copy()
    base = scorer(rows)
    # the torch.export program in the export gives the same scores as the rebuilt model
    program = torch.export.load(out / "finetune" / "export" / "model.pt2").module()
    tensors = frame_to_tensors(encode_rows(rows.reset_index(drop=True), scorer.spec), scorer.spec)
    np.testing.assert_allclose(torch.sigmoid(program(tensors)).detach().numpy(), base, atol=1e-6)
    rows["user_id"] = "a-user-never-seen"
    rows["genres"] = "Comedy|Drama"  # a joined string works like a list
    rows["extra"] = 1
    unseen = scorer(rows.drop(columns=["zip_code", "release_year"]))
    assert unseen.shape == base.shape and np.isfinite(unseen).all() and not np.allclose(unseen, base)



def test_wandb_offline_run_holds_validation_auc(tmp_path, cache, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    main(["fit", *fit_args(tmp_path, cache, "--trainer.max_epochs", "1")])
    run_file = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    records = list(wandb_records(run_file))
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    aucs = [row["val/auc"] for row in history if "val/auc" in row]
    # the run file holds the validation AUC the run chose its checkpoint on (plumbing, not model quality: quality
    # thresholds live in benchmarks/)
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    chosen = [float(s["best_model_score"]) for s in best["callbacks"].values() if s.get("monitor") == "val/auc"]
    assert len(aucs) == 1 and chosen == [pytest.approx(aucs[0], abs=1e-6)]
    config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for u in r.config.update}
    config.update({u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "run"
                   for u in r.run.config.update})
    assert config["lr"] == 0.001
    # the feature spec's vocabularies stay out of the run's config; the checkpoint keeps them
    assert "feature_spec" not in config and best["hyper_parameters"]["feature_spec"]["fields"]
    full = config["config"]  # the whole resolved CLI config, as `--print_config` shows it
    assert full["model"]["init_args"]["backbone"]["class_path"] == "towers.DCN"
    assert full["trainer"]["max_epochs"] == 1 and full["data"]["batch_size"] == 2048
    # ExportBest exported the best checkpoint and logged it to the run as a model artifact
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert [(a.type, a.name) for a in artifacts] == [("model", f"ctrl-model-{run_file.stem.removeprefix('run-')}")]
    assert (tmp_path / "export" / "model.onnx").is_file()

    # a resumed fit continues the same W&B run
    main(["fit", *fit_args(tmp_path, cache, "--trainer.max_epochs", "2", "--ckpt_path", "last")])
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, runs
