"""Stage 1 through Lightning: fast_dev_run (frozen and trainable language tower), the checkpoint stage 2 loads,
warm-up, a short fit that aligns, and 2-process DDP (gloo) equal to one process on the same global batch."""

import copy
import dataclasses
from functools import partial

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from helpers import synthetic_batch, synthetic_spec
from torch.utils.data import DataLoader

from ctrl.align.module import AlignmentModule
from ctrl.align.probe import TransferProbe
from ctrl.align.validate_every import ValidateEvery
from finetune.module import load_aligned_tower
from tabular2text.datamodule import CTRDataModule, TensorDictDataset
from towers import BACKBONES, DeepFM
from towers.checkpoints import ConfigError
from towers.encoder import FrozenEncoder
from towers.language import LanguageTower

# No dropout or BatchNorm: they would make one process differ from two (BatchNorm sees each rank's half).
TOWER = partial(DeepFM, embed_dim=8, mlp_dims=(16,), dropout=0.0, batch_norm=False)


ENTITY_SPEC = dataclasses.replace(synthetic_spec(), user_field="user_id", item_field="item_id")


class TextData(CTRDataModule):
    """Synthetic rows plus their texts; val serves the same rows (enough to exercise stage 1). The text side
    (`serve_text`, `collate`) is the real data module's; only the prepared frames are made up."""

    def __init__(self, text_cache_dir, rows: int = 16, batch_size: int = 8) -> None:
        pl.LightningDataModule.__init__(self)
        self.feature_spec, self.text_cache_dir, self.text = ENTITY_SPEC, text_cache_dir, None
        self.rows = synthetic_batch(self.feature_spec, rows, seed=0)
        self.batch_size = batch_size
        r = self.rows
        self.frames = {split: pd.DataFrame({
            "user_text": [f"this is a user, gender is {g}, age is {a:.1f}, who has recently watched"
                          f" {'|'.join(map(str, h))}" for g, a, h in
                          zip(r["gender"].tolist(), r["age"].tolist(), r["history"].tolist(), strict=True)],
            "item_text": [f"this is a movie, title is {t}, genre is {'|'.join(map(str, gs))}."
                          for t, gs in zip(r["title"].tolist(), r["genres"].tolist(), strict=True)],
            "user_profile_text": [f"this is a user, gender is {g}." for g in r["gender"].tolist()],
            "label": r["label"].tolist()})
            for split in self.text_splits}

    text_splits = ("train", "val")

    def frame(self, split: str) -> pd.DataFrame:
        return self.frames[split]

    def item_catalog(self) -> tuple[np.ndarray, list[str]]:
        ids = np.arange(2, self.feature_spec["item_id"].vocab_size)
        return ids, [f"this is a movie, title is {i}." for i in ids]

    def tensors(self, split: str) -> dict[str, torch.Tensor]:
        return self.rows

    def loader(self, split: str) -> DataLoader:
        return DataLoader(TensorDictDataset(self.tensors(split)), batch_size=self.batch_size,
                          collate_fn=self.collate(split))

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")


def make_module(bert_dir, cls=AlignmentModule, **overrides) -> AlignmentModule:
    torch.manual_seed(0)
    options = {"language_model": bert_dir, "proj_dim": 16, "num_subspaces": 3,
               "subspace_dim": 4, "warmup_steps": 2, **overrides}
    return cls(ENTITY_SPEC.to_dict(), TOWER, **options)


def trainer(**options) -> pl.Trainer:
    defaults = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False}
    return pl.Trainer(**{**defaults, **options})


def test_fast_dev_run_frozen_language_tower_logs_losses_and_retrieval(bert_dir, tmp_path):
    module = make_module(bert_dir)
    run = trainer(fast_dev_run=2)
    run.fit(module, datamodule=TextData(tmp_path / "cache"))
    metrics = run.callback_metrics
    for name in ("train/loss", "train/coarse", "train/fine", "val/loss", "val/coarse", "val/fine"):
        assert torch.isfinite(metrics[name]), name
    torch.testing.assert_close(metrics["train/loss"], metrics["train/coarse"] + metrics["train/fine"])
    assert 0.0 <= metrics["val/retrieval_top1"] <= 1.0
    # encoded once in setup; train and val hold the same texts here: one cache entry, read memory-mapped
    assert module.language is None and len(list((tmp_path / "cache").iterdir())) == 1
    ((vectors, index),) = run.datamodule.text.parts["train"]
    assert isinstance(vectors, np.memmap) and vectors.shape == (16, 16) and index.shape == (16,)


class HparamsRecorder(pl.loggers.Logger):
    """A logger that keeps what Lightning sends as hyper-parameters (what W&B would put in the run's config)."""

    name, version = "recorder", 0

    def __init__(self) -> None:
        super().__init__()
        self.hparams: dict = {}

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.hparams.update(params)

    def log_metrics(self, metrics, step=None) -> None:
        pass


def test_the_loggers_get_the_hyperparameters_but_the_feature_spec(bert_dir, tmp_path):
    """The spec's vocabularies grow with the catalog (1.4 MB of each Amazon Beauty W&B run); the checkpoint keeps it."""
    module, recorder = make_module(bert_dir, lr=3e-4), HparamsRecorder()
    trainer(max_steps=1, limit_val_batches=1, logger=recorder).fit(module, datamodule=TextData(tmp_path / "cache"))
    assert recorder.hparams["lr"] == 3e-4 and recorder.hparams["num_subspaces"] == 3
    assert "feature_spec" not in recorder.hparams
    assert module.hparams["feature_spec"] == ENTITY_SPEC.to_dict()


def test_entity_text_pools_user_item_and_history_item_vectors(bert_dir, tmp_path):
    """text_granularity entity: one text per user profile and per item; a row's text vector is [user, item,
    mean of its history items' catalog vectors], checked by hand on a batch."""
    module = make_module(bert_dir, text_granularity="entity", text_precision="fp32")
    assert module.heads.text_proj.in_features == 3 * 16
    data = TextData(tmp_path / "cache")
    run = trainer(fast_dev_run=2)
    run.fit(module, datamodule=data)
    assert torch.isfinite(run.callback_metrics["train/loss"])
    assert len(data.text.parts["train"]) == 2  # user profiles, item sentences
    # one cache entry holding each distinct sentence once, though catalog and rows repeat the item sentences
    (entry,) = (tmp_path / "cache").iterdir()
    rows = pd.concat([data.frame("train"), data.frame("val")])
    sentences = {*data.item_catalog()[1], *rows["user_profile_text"], *rows["item_text"]}
    assert np.load(entry / "vectors.npy", mmap_mode="r").shape == (len(sentences), 16)
    catalog = data.text.item_vectors
    assert catalog.shape == (20, 16) and not catalog[:2].any() and catalog[2:].norm(dim=1).min() > 0
    batch = next(iter(data.loader("train")))
    vectors = batch["text"]
    assert vectors.shape == (8, 3 * 16)
    encoder = FrozenEncoder(LanguageTower(str(bert_dir)), precision=module.hparams.text_precision)
    users = encoder.encode(data.frame("train")["user_profile_text"].tolist()[:8])
    items = encoder.encode(data.frame("train")["item_text"].tolist()[:8])
    torch.testing.assert_close(vectors[:, :16], users, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vectors[:, 16:32], items, atol=1e-5, rtol=1e-5)
    for i, history in enumerate(batch["history"].tolist()):
        known = [h for h in history if h > 1]
        expected = catalog[known].mean(0) if known else torch.zeros(16)
        torch.testing.assert_close(vectors[i, 32:], expected)


def test_frozen_tower_encodes_on_the_trainers_device_and_a_trainable_one_follows_the_module(bert_dir, tmp_path,
                                                                                               monkeypatch):
    import ctrl.align.module

    devices = []

    class Recording(FrozenEncoder):
        def __init__(self, tower, device="cpu", precision="auto", **options):
            super().__init__(tower, device, precision, **options)
            devices.append((self.device, next(self.tower.parameters()).device))

    monkeypatch.setattr(ctrl.align.module, "FrozenEncoder", Recording)
    run = trainer(fast_dev_run=1)
    run.fit(make_module(bert_dir), datamodule=TextData(tmp_path / "cache"))
    assert devices == [(run.strategy.root_device, run.strategy.root_device)]  # one load for train and val
    module = make_module(bert_dir, trainable_layers=1)
    run = trainer(fast_dev_run=1)
    run.fit(module, datamodule=TextData(tmp_path / "cache"))
    assert {p.device for p in module.language.parameters()} == {module.device} == {run.strategy.root_device}


class FoldData(TextData):
    """The 16 rows cut into consecutive splits (train, val[, gap]), each with texts of its own."""

    def __init__(self, text_cache_dir, sizes: dict[str, int]) -> None:
        super().__init__(text_cache_dir, batch_size=4)
        self.text_splits = tuple(sizes)
        bounds = np.cumsum([0, *sizes.values()])
        self.bounds = {s: (int(a), int(b)) for s, a, b in zip(sizes, bounds[:-1], bounds[1:], strict=True)}
        whole = self.frames["train"].assign(user_text=lambda f: [f"row {i}: {u}" for i, u in enumerate(f.user_text)])
        self.frames = {s: whole.iloc[a:b].reset_index(drop=True) for s, (a, b) in self.bounds.items()}

    def tensors(self, split: str) -> dict[str, torch.Tensor]:
        a, b = self.bounds[split]
        return {k: v[a:b] for k, v in self.rows.items()} | {"row": torch.arange(b - a)}


def test_text_vectors_of_all_splits_before_test_are_one_entry_shared_by_every_fold(bert_dir, tmp_path):
    """A val_fold moves the split boundaries, not the rows before test: the second fold encodes nothing, and
    each split's rows get their own texts' vectors."""
    cache = tmp_path / "cache"
    encoder = FrozenEncoder(LanguageTower(str(bert_dir)), precision="fp32")
    for sizes in ({"train": 10, "val": 6}, {"train": 6, "val": 4, "gap": 6}):
        module = make_module(bert_dir, text_precision="fp32")
        data = FoldData(cache, sizes)
        trainer(fast_dev_run=1).fit(module, datamodule=data)
        assert len(list(cache.iterdir())) == 1
        for split in ("train", "val"):
            vectors = torch.cat([batch["text"] for batch in data.loader(split)])
            torch.testing.assert_close(vectors, encoder.encode(*data.texts(split)), atol=1e-5, rtol=1e-5)


def test_masked_fields_are_unknown_to_the_tower_during_alignment(bert_dir, tmp_path):
    module = make_module(bert_dir, masked_fields=("user_id", "history")).eval()
    batch = synthetic_batch(ENTITY_SPEC, 8, seed=0)
    history = batch["history"]  # other items at the same positions
    other = {**batch, "user_id": batch["user_id"].flip(0), "history": torch.where(history > 0, 20 - history, 0)}
    with torch.no_grad():
        tab = module.heads.tab_proj(module.tower({**batch, "user_id": batch["user_id"].clamp(max=1),
                                                 "history": batch["history"].clamp(max=1)}))
    batch["text"] = other["text"] = torch.zeros(len(batch["row"]), 16)
    with torch.no_grad():
        torch.testing.assert_close(module.embed(batch)[0], module.embed(other)[0])
        torch.testing.assert_close(module.embed(batch)[0], tab)
    for bad in ("age", "zip"):  # numeric, absent
        with pytest.raises(ValueError, match=f"masked_fields \\['{bad}'\\]"):
            make_module(bert_dir, masked_fields=(bad,))


def test_transfer_probe_logs_a_linear_probe_auc_per_epoch_and_changes_no_training(bert_dir, tmp_path):
    weights = []
    for callbacks in ([], [TransferProbe(steps=20)]):
        module = make_module(bert_dir)
        pl.seed_everything(0)
        data = TextData(tmp_path / "cache", rows=32)
        trainer(max_epochs=2, callbacks=callbacks, deterministic=True).fit(module, datamodule=data)
        weights.append(module.tower.state_dict())
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())
    history = callbacks[0].history
    assert [h["epoch"] for h in history] == [0, 1]
    assert all(0.0 <= h["val/probe_auc"] <= 1.0 and "val/retrieval_top1" in h for h in history)
    # the rows of the trainer's loaders are the splits' rows, in order: the last probe, redone by hand, to the bit
    probe, train, val = callbacks[0], data.tensors("train"), data.tensors("val")
    module.eval()
    expected = probe.probe_auc(probe.features(module, train, torch.arange(32)), train["label"].float(),
                               probe.features(module, val, torch.arange(32)), val["label"].float())
    assert history[-1]["val/probe_auc"] == expected


def test_validate_every_k_steps_stops_stage_1_inside_an_epoch_and_validates_short_epochs(bert_dir, tmp_path):
    # the shipped stop tests val/retrieval_top1 every 25 steps (ValidateEvery), so on a long epoch it fires near
    # the threshold; an epoch shorter than that is validated at its end. 32 rows in batches of 4: 8 steps an epoch.
    for steps, expected in ((3, [(0, 3)]), (20, [(0, 8)])):  # the first check meets the threshold
        probe = TransferProbe(steps=5)
        stop = pl.callbacks.EarlyStopping(monitor="val/retrieval_top1", mode="max", stopping_threshold=0.0,
                                          patience=1000, check_on_train_epoch_end=False)  # as shipped
        run = trainer(max_epochs=3, callbacks=[ValidateEvery(steps), probe, stop])
        run.fit(make_module(bert_dir), datamodule=TextData(tmp_path / "cache", rows=32, batch_size=4))
        assert [(h["epoch"], h["step"]) for h in probe.history] == expected
        assert run.global_step == expected[0][1] and stop.stopped_epoch == 0
    probe = TransferProbe(steps=5)  # without a stop: every 3 steps over the run, across epoch ends
    trainer(max_epochs=2, callbacks=[ValidateEvery(3), probe]).fit(
        make_module(bert_dir), datamodule=TextData(tmp_path / "cache", rows=32, batch_size=4))
    assert [h["step"] for h in probe.history] == [3, 6, 9, 12, 15]
    with pytest.raises(ValueError, match="steps must be at least 1, got 0"):
        ValidateEvery(0)


def test_transfer_probe_auc_on_separable_and_on_noise_features():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(2000, generator=g) < 0.4).float()
    noise = torch.randn(2000, 8, generator=g)
    signal = torch.cat([noise[:, :7], y[:, None] * 3 + noise[:, 7:] * 0.1], 1)  # one column holds the label
    probe = TransferProbe()
    assert probe.probe_auc(signal[:1000], y[:1000], signal[1000:], y[1000:]) == 1.0
    assert abs(probe.probe_auc(noise[:1000], y[:1000], noise[1000:], y[1000:]) - 0.5) < 0.06


def test_entity_text_needs_a_frozen_tower_and_an_item_field(bert_dir, tmp_path):
    with pytest.raises(ValueError, match="frozen language tower"):
        make_module(bert_dir, text_granularity="entity", trainable_layers=1)
    with pytest.raises(ValueError, match="item id field"):
        AlignmentModule(synthetic_spec().to_dict(), TOWER, language_model=str(bert_dir), text_granularity="entity")


class LongTitles(TextData):
    """TextData whose item sentences hold a 40-word title: longer than max_length 24 alone."""

    TITLE = " ".join(["lipstick"] * 40)

    def __init__(self, text_cache_dir) -> None:
        super().__init__(text_cache_dir)
        for frame in self.frames.values():
            frame["item_text"] = [f"this is a product, title is {self.TITLE}."] * len(frame)

    def item_catalog(self) -> tuple[np.ndarray, list[str]]:
        ids, _ = super().item_catalog()
        return ids, [f"this is a product, title is {self.TITLE} {i}." for i in ids]


@pytest.mark.parametrize("granularity", ["row", "entity"])
def test_long_item_sentences_are_cut_with_one_warning_per_encoding_pass(bert_dir, tmp_path, granularity):
    data = LongTitles(tmp_path / "cache")
    with pytest.warns(UserWarning) as record:
        trainer(fast_dev_run=1).fit(make_module(bert_dir, max_length=24, text_granularity=granularity), datamodule=data)
    cut = sorted(str(w.message) for w in record if "max_length" in str(w.message))
    users = set(data.frame("train")["user_text"])  # one item sentence for all rows: a distinct pair per user
    hint = "max_length=24 tokens; raise --model.init_args.max_length to keep them whole"
    if granularity == "row":
        assert cut == [f"{len(users)} of {len(users)} (user, item) texts had their item sentence cut (the longer"
                       f" sentence of a pair is cut first) to fit {hint}"]
    else:  # one pass: the 18 catalog items and the one item sentence of the rows; the short user profiles fit
        profiles = {t for split in ("train", "val") for t in data.frame(split)["user_profile_text"]}
        assert cut == [f"19 of {19 + len(profiles)} texts were cut to fit {hint}"]


def test_a_max_length_without_room_for_text_is_refused_naming_the_option(bert_dir):
    with pytest.raises(ConfigError, match=r"^--model.init_args.max_length=4 leaves no room for text: .* at least 5$"):
        make_module(bert_dir, max_length=4)  # [CLS] [SEP] [SEP] and one token of each sentence


def test_trainable_top_layer_trains_only_that_layer(bert_dir, tmp_path):
    module = make_module(bert_dir, trainable_layers=1, lr=1e-2, warmup_steps=0)
    blocks = module.language.transformer_blocks()
    bottom, top = copy.deepcopy(blocks[0].state_dict()), copy.deepcopy(blocks[1].state_dict())
    trainer(fast_dev_run=1).fit(module, datamodule=TextData(tmp_path / "cache"))
    assert all(torch.equal(v, blocks[0].state_dict()[k]) for k, v in bottom.items())
    assert any(not torch.equal(v, blocks[1].state_dict()[k]) for k, v in top.items())
    assert not (tmp_path / "cache").exists()  # nothing cached for a trainable tower


def test_checkpoint_holds_tower_for_stage_2_and_maps_but_no_language_model(bert_dir, tmp_path):
    module = make_module(bert_dir)
    run = trainer(max_steps=1, limit_val_batches=0)
    run.fit(module, datamodule=TextData(tmp_path / "cache"))
    run.save_checkpoint(tmp_path / "align.ckpt")
    checkpoint = torch.load(tmp_path / "align.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    assert {k.split(".")[0] for k in state} == {"tower", "heads"}
    assert {k.split(".")[1] for k in state if k.startswith("heads.")} == {"tab_proj", "text_proj", "tab_subspaces",
                                                                         "text_subspaces"}
    hparams = checkpoint["hyper_parameters"]
    assert hparams["temperature"] == 0.7 and checkpoint["stage"] == 1
    assert hparams["backbone"]["class_path"] == "towers.collaborative.DeepFM"  # the config, not a pickled class
    assert hparams["backbone"]["init_args"]["embed_dim"] == 8
    assert hparams["feature_spec"] == ENTITY_SPEC.to_dict()
    tower = TOWER(ENTITY_SPEC)
    load_aligned_tower(tmp_path / "align.ckpt", tower, ENTITY_SPEC)  # what stage 2's init_from does
    torch.testing.assert_close(tower.state_dict(), module.tower.state_dict())


def test_learning_rate_warms_up_linearly_from_1e_5(bert_dir, tmp_path):
    module = make_module(bert_dir, lr=1e-3, warmup_steps=4)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-5 + (1e-3 - 1e-5) * min(step, 4) / 4 for step in range(6)]
    assert lrs == pytest.approx(expected)


def test_a_short_fit_aligns_rows_with_their_texts(bert_dir, tmp_path):
    """32 rows, one full batch per step: in-batch text -> row retrieval goes from chance to most rows."""
    data = TextData(tmp_path / "cache", rows=32, batch_size=32)
    module = make_module(bert_dir, lr=1e-2, warmup_steps=0)
    # inference_mode off: metric states reset under inference mode cannot be updated by fit's validation
    (before,) = trainer(inference_mode=False).validate(module, datamodule=data, verbose=False)
    run = trainer(max_epochs=100, check_val_every_n_epoch=100)
    run.fit(module, datamodule=data)
    assert before["val/retrieval_top1"] < 0.3
    assert run.callback_metrics["val/retrieval_top1"] > 0.8


class OneGradientStep(AlignmentModule):
    """Plain SGD with lr 1: the weights after one step are the initial weights minus the gradient."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_ddp_two_processes_equal_one_process_on_the_global_batch(bert_dir, tmp_path):
    """Two gloo processes with 8 rows each (negatives gathered across them) give the same loss and the same
    gradient step as one process with all 16 rows."""
    initial = make_module(bert_dir, cls=OneGradientStep)
    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        module = copy.deepcopy(initial)
        run = trainer(devices=devices, strategy=strategy, max_steps=1, limit_val_batches=0)
        run.fit(module, datamodule=TextData(tmp_path / "cache", rows=16, batch_size=16 // devices))
        results[devices] = (run.callback_metrics["train/loss"], module.state_dict())
    (loss_one, weights_one), (loss_two, weights_two) = results[1], results[2]
    assert loss_two.item() == pytest.approx(loss_one.item(), abs=1e-6)
    assert not torch.equal(weights_one["heads.tab_proj.weight"], initial.state_dict()["heads.tab_proj.weight"])
    torch.testing.assert_close(weights_two, weights_one, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def small_ml1m(tmp_path_factory):
    from helpers import write_small_ml1m

    return write_small_ml1m(tmp_path_factory.mktemp("data") / "ml-1m")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_stage1_base_and_overlay_fast_dev_run_per_backbone(bert_dir, tmp_path, small_ml1m, backbone):
    """The stage-1 base and the backbone by name: the backbone's class, the shipped stage-1 recipe, two real steps."""
    from helpers import CONFIGS

    from ctrl.app.lightning_cli import lightning_cli
    from ctrl.app.pipeline import stage_configs

    cli = lightning_cli([
        *(a for c in stage_configs(CONFIGS, "align", backbone) for a in ("--config", c)),
        "--data.data_dir", str(small_ml1m), "--data.cache_dir", str(tmp_path / "cache"),
        "--model.init_args.language_model", bert_dir, "--data.text_cache_dir", str(tmp_path / "vectors"),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", "--trainer.fast_dev_run", "2",
        "--data.batch_size", "64"], run=False)
    assert type(cli.model.tower) is BACKBONES[backbone]
    assert (cli.model.hparams.temperature, cli.model.hparams.lr) == (0.1, 0.0005)
    assert cli.model.hparams.backbone["init_args"]["dropout"] == 0.1
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2


def test_top_block_over_cached_lower_states_is_the_tower_and_trains_only_that_block(bert_dir, tmp_path):
    """cache_lower_layers: the data serves the cached states entering the top block (float16, one entry), and
    the top block over them gives the whole tower's vectors; training moves that block."""
    module = make_module(bert_dir, trainable_layers=1, cache_lower_layers=True, lr=1e-2, warmup_steps=0)
    before = copy.deepcopy(module.language.state_dict())
    data = TextData(tmp_path / "cache")
    trainer(fast_dev_run=1).fit(module, datamodule=data)
    (entry,) = (tmp_path / "cache").iterdir()
    assert np.load(entry / "vectors.npy", mmap_mode="r").dtype == np.float16
    assert any(not torch.equal(v, module.language.state_dict()[k]) for k, v in before.items())
    module.language.load_state_dict(before)  # the pretrained top block again: the whole tower's output
    tower = LanguageTower(bert_dir).eval()
    users, items = data.texts("train")
    batch = next(iter(data.loader("train")))
    rows = batch["row"].tolist()
    assert batch["text"]["states"].shape[:2] == batch["text"]["attention_mask"].shape
    with torch.no_grad():
        expected = tower(**tower.tokenize([users[i] for i in rows], [items[i] for i in rows]))
        torch.testing.assert_close(module.language.eval()(**batch["text"]), expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("options", [{"trainable_layers": 0}, {"trainable_layers": "all"},
                                     {"trainable_layers": 1, "text_granularity": "entity"}])
def test_cache_lower_layers_needs_trainable_top_blocks_of_row_text(bert_dir, options):
    with pytest.raises(ValueError, match="cache_lower_layers"):
        make_module(bert_dir, cache_lower_layers=True, **options)
