"""Stage 1: align the collaborative tower with a language tower by contrastive learning (CTRL).

Each row is seen twice, as features (collaborative tower) and as its (user sentence, item sentence) text
(language tower). Both are projected into one shared space (coarse: cosine InfoNCE) and mapped into M
sub-spaces (fine: max-sim InfoNCE); the losses are in `ctrl/align/losses.py`. Only the collaborative tower goes
on to stage 2: it sits under the `tower.` prefix of the checkpoint's state dict.

The model holds the two towers, the `AlignmentHeads` and the losses; the data serves the text. What the text
side is (`TextSide`, tabular2text/text_side.py) is decided once from the language-tower settings; in `setup`
the model hands it, with its language tower, to the data module (`CTRDataModule.serve_text`), which then puts
each batch's text side in `batch["text"]`: cached vectors for a frozen tower, token ids for a trainable one,
and cached hidden states for trainable top blocks over frozen lower ones (`cache_lower_layers`).
Run through Lightning, e.g.
`pl.Trainer(max_epochs=5).fit(AlignmentModule(dm.feature_spec.to_dict(), towers.AutoInt), datamodule=dm)`,
or `ctrl fit --model ctrl.align.module.AlignmentModule --model.backbone towers.AutoInt --data.data_dir DIR`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import pytorch_lightning as pl
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ctrl.align.heads import AlignmentHeads
from ctrl.align.losses import coarse_loss, cosine_sim, fine_loss, gather_rows, max_sim
from tabular2text.schema import OOV, FeatureSpec
from tabular2text.text_side import TextSide
from towers.checkpoints import (
    ConfigError,
    SpecLeftOutOfLoggers,
    check_resumed_checkpoint,
    require_finite,
    stamp_checkpoint,
)
from towers.collaborative import CollaborativeTower, backbone_config, make_tower
from towers.encoder import FrozenEncoder, Precision
from towers.language import (
    LanguageTower,
    Pooling,
    TopBlocks,
    min_max_length,
    model_config,
    model_tokenizer,
    too_short,
)

Batch = dict[str, Tensor]
WARMUP_START_LR = 1e-5  # the paper warms the learning rate up from here


class AlignmentModule(SpecLeftOutOfLoggers, pl.LightningModule):
    """Collaborative tower + language tower + `AlignmentHeads` (a linear projection of each side into a shared
    space and M linear sub-space maps of it), trained with coarse_weight * coarse + fine_weight * fine.

    A frozen language tower (trainable_layers=0) is only run once, in `setup`, on the trainer's device: the
    data module caches its vectors of every text before test on disk (every DDP rank encodes its share) and
    serves them, memory-mapped, in `batch["text"]`; neither the language model nor its vectors are in the
    checkpoint. A trainable one is in the model and reads the batch's token ids at every step. With
    cache_lower_layers only its trainable top blocks are in the model, reading cached hidden states.

    Logs `train/{loss,coarse,fine}` and, over each validation epoch, `val/{loss,coarse,fine}` and
    `val/retrieval_top1`: how often a text's highest-scoring row in the batch is its own row, scored by the
    trained similarity coarse_weight * cosine + fine_weight * max-sim.

    Args:
        feature_spec: the data's feature spec as a dict (linked from the data module by the CLI); saved with
            the hyper-parameters, so stage 2 can check that its data matches.
        backbone: builds the collaborative tower from the spec, e.g. a class from `towers.BACKBONES`.
        language_model: "default" (all-MiniLM-L6-v2), a local model folder or a cached hub name.
        pooling: how the language tower pools token states: "mean" (the paper's), "cls" or "last".
        trainable_layers: top language blocks that train; 0 freezes the tower, "all" trains all of it.
        cache_lower_layers: with trainable_layers k >= 1 (row text, a BERT-like encoder): the frozen blocks
            below the top k run once, in `setup`, and the data module caches the hidden states they hand up
            (max_length x H float16 per text); each step then runs only the k top blocks over them
            (`towers.language.TopBlocks`), instead of the whole language model.
        max_length: tokens per text, special tokens included; a (user, item) pair that does not fit is cut
            longer sentence first, so a long item sentence keeps at least half (towers.language.split_budget).
        text_precision: weights of the frozen tower while it encodes: "auto" (bf16 on a device with native
            bf16, a GPU or a CPU with AMX / AVX512-BF16, else fp32), "fp32" or "bf16". bf16 measured about 3x
            fp32 on a 2-core AMX CPU at cosine >= 0.9999 to the fp32 vectors (benchmarks/encode_speed.md).
        text_granularity: what the language tower reads. "row" (the paper's): each row's (user sentence,
            item sentence) pair, one text per row. "entity" (as DisCo and KAR do): each user's sentence without
            the behavior sequence and each item's sentence, encoded once per entity; a row's text vector is
            [user vector, item vector, mean of its history items' vectors] (3H wide). Frozen tower only.
        proj_dim: width of the shared space.
        num_subspaces: M, sub-spaces per side for the fine-grained loss.
        subspace_dim: width of each sub-space.
        temperature: tau of both InfoNCE losses.
        coarse_weight: weight of the coarse (cosine) loss in the total.
        fine_weight: weight of the fine (max-sim) loss in the total.
        lr: AdamW learning rate after warm-up.
        weight_decay: AdamW weight decay.
        warmup_steps: optimizer steps of the linear warm-up from 1e-5 to lr.
        masked_fields: categorical or sequence fields the collaborative tower sees as unknown (OOV) during
            alignment, e.g. [user_id, item_id]: an ablation of how much of the alignment is row identity.
            Their embeddings are then not aligned; stage 2 trains them from their initial values.
    """

    def __init__(
        self,
        feature_spec: dict,
        backbone: Callable[[FeatureSpec], CollaborativeTower],
        language_model: str = "default",
        pooling: Pooling = "mean",
        trainable_layers: int | Literal["all"] = 0,
        cache_lower_layers: bool = False,
        max_length: PositiveInt = 128,
        text_precision: Precision = "auto",
        text_granularity: Literal["row", "entity"] = "row",
        proj_dim: PositiveInt = 128,
        num_subspaces: PositiveInt = 2,
        subspace_dim: PositiveInt = 32,
        temperature: PositiveFloat = 0.7,
        coarse_weight: NonNegativeFloat = 1.0,
        fine_weight: NonNegativeFloat = 1.0,
        lr: PositiveFloat = 5e-4,
        weight_decay: NonNegativeFloat = 0.01,
        warmup_steps: NonNegativeInt = 100,
        masked_fields: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.hparams.backbone = backbone_config(backbone)  # what rebuilds the tower (load_from_checkpoint, export)
        spec = FeatureSpec.from_dict(feature_spec)
        self.tower = make_tower(backbone, spec)
        try:
            self.text_side = TextSide.from_settings(spec, text_granularity, trainable_layers, cache_lower_layers)
        except ValueError as e:  # a combination of settings: the user's to change, not a bug
            raise ConfigError(f"--model.init_args: {e}") from None
        unknown = [f for f in masked_fields if f not in spec.names or spec[f].kind == "numeric"]
        if unknown:
            raise ConfigError(f"--model.init_args.masked_fields {unknown} are not categorical or sequence fields of"
                              f" the data; known: {', '.join(f.name for f in spec.fields if f.kind != 'numeric')}")
        # Checked before any tower loads: only the tokenizer's special tokens decide what is too short.
        minimum = min_max_length(model_tokenizer(language_model))
        if max_length < minimum:
            raise ConfigError(f"--model.init_args.{too_short(max_length, minimum)}")
        if self.text_side.serves == "states":
            self.language = TopBlocks(language_model, pooling, trainable_layers, max_length).train()
            text_dim = self.language.output_dim
        elif self.text_side.frozen:
            # Built only in setup, for the data module to fill its cache; its width is all the heads need now.
            self.language = None
            text_dim = model_config(language_model).hidden_size * self.text_side.parts
        else:
            # train(): from_pretrained returns eval mode, which Lightning keeps, and dropout would stay off.
            self.language = LanguageTower(language_model, pooling, trainable_layers, max_length).train()
            text_dim = self.language.output_dim
        self.heads = AlignmentHeads(self.tower.output_dim, text_dim, proj_dim, num_subspaces, subspace_dim)
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in ("loss", "coarse", "fine", "retrieval_top1")})
        self.encoder: FrozenEncoder | None = None  # a frozen tower, built in setup for the data module's cache

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        stamp_checkpoint(checkpoint, 1)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_resumed_checkpoint(checkpoint, 1, self.hparams.feature_spec)

    def setup(self, stage: str) -> None:
        """Hand the language tower to the data module, which puts each batch's text side in `batch["text"]`:
        a frozen tower's cached vectors (encoded once, on the trainer's device, every DDP rank its share),
        or a trainable tower's token ids."""
        hp, side, data = self.hparams, self.text_side, self.trainer.datamodule
        if side.serves == "tokens":
            data.serve_text(side, tokenize=self.language.tokenize)
            return
        device = self.trainer.strategy.root_device
        lower = self.language.lower_blocks if side.serves == "states" else None
        if self.encoder is None or self.encoder.device != device:  # one load and fingerprint per run
            self.encoder = FrozenEncoder(LanguageTower(hp.language_model, hp.pooling, 0, hp.max_length), device,
                                         hp.text_precision, lower_blocks=lower)
        data.serve_text(side, encoder=self.encoder)

    # --- alignment ---------------------------------------------------------------------------------------
    def embed(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Shared-space vectors (B x proj_dim) and sub-space vectors (B x M x subspace_dim), table then text."""
        masked = self.hparams.masked_fields
        if masked:  # OOV where there is a value; padding stays padding
            batch = {**batch, **{f: batch[f].clamp(max=OOV) for f in masked}}
        text = batch["text"] if self.language is None else self.language(**batch["text"])
        return self.heads(self.tower(batch), text)

    def losses(self, tab: Tensor, text: Tensor, sub_tab: Tensor, sub_text: Tensor) -> dict[str, Tensor]:
        """Total, coarse and fine loss of this rank's rows (negatives from every rank's rows)."""
        hp = self.hparams
        coarse = coarse_loss(tab, text, hp.temperature)
        fine = fine_loss(sub_tab, sub_text, hp.temperature)
        return {"loss": hp.coarse_weight * coarse + hp.fine_weight * fine, "coarse": coarse, "fine": fine}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        losses = self.losses(*self.embed(batch))
        # sync_dist: each rank's loss covers its own rows only; their mean is the global batch's loss.
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(batch["row"]), sync_dist=True)
        return require_finite(losses["loss"], self.current_epoch, self.global_step)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        tab, text, sub_tab, sub_text = self.embed(batch)
        for name, value in self.losses(tab, text, sub_tab, sub_text).items():
            self.val_metrics[name].update(value, weight=len(tab))
        all_tab, offset = gather_rows(tab)
        all_sub_tab, _ = gather_rows(sub_tab)
        score = (self.hparams.coarse_weight * cosine_sim(text, all_tab)
                 + self.hparams.fine_weight * max_sim(sub_text, all_sub_tab))  # B x N, text -> rows
        own_row = torch.arange(len(text), device=self.device) + offset
        self.val_metrics["retrieval_top1"].update((score.argmax(1) == own_row).float())
        for name, metric in self.val_metrics.items():
            self.log(f"val/{name}", metric, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=hp.lr,
                                      weight_decay=hp.weight_decay)
        # Linear warm-up, then constant. Without warm-up steps (or with lr below the start) it starts at lr.
        start = min(1.0, WARMUP_START_LR / hp.lr) if hp.warmup_steps else 1.0
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=start, total_iters=hp.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}
