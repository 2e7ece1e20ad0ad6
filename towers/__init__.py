"""The towers: the collaborative (CTR) tower, its backbones and shared parts.

The language tower (`towers.language.LanguageTower`) and its bulk encoder (`towers.encoder`) are not imported
here: serving an exported collaborative model must not load transformers."""

from towers.collaborative import (
    BACKBONES,
    DCN,
    DIN,
    PNN,
    AutoInt,
    CollaborativeTower,
    CTRModel,
    DCNv2,
    DeepFM,
    FiBiNet,
    WideDeep,
    XDeepFM,
    backbone_name,
    named_backbone,
)
from towers.embedding import FieldEmbedding
from towers.mlp import MLP

__all__ = [
    "BACKBONES",
    "DCN",
    "DIN",
    "MLP",
    "PNN",
    "AutoInt",
    "CTRModel",
    "CollaborativeTower",
    "DCNv2",
    "DeepFM",
    "FiBiNet",
    "FieldEmbedding",
    "WideDeep",
    "XDeepFM",
    "backbone_name",
    "named_backbone",
]
