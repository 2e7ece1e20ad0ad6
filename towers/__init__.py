"""The towers: the collaborative (CTR) tower, its backbones and shared parts."""

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
]
