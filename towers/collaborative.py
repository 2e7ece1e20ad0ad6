"""The collaborative tower: field embeddings -> backbone -> representation (the layer under the logit).

Every backbone takes the feature spec as its first positional argument and typed keyword
hyper-parameters after it, so `{"class_path": ..., "init_args": ...}` (`backbone_config`) rebuilds any of
them (`build_backbone`). Each
`forward` returns the representation chosen so that one linear read-out of it is the usual model:
first-order (wide / LR) parts are returned per field and FM-style parts as their interaction vector,
so the read-out's weights can reproduce their sums.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence

import torch
from jsonargparse.typing import PositiveInt, restricted_number_type
from torch import nn

from tabular2text.schema import FeatureSpec
from towers.checkpoints import ConfigError
from towers.embedding import FieldEmbedding
from towers.interactions import (
    BilinearInteraction,
    CompressedInteractionNetwork,
    CrossNetwork,
    CrossNetworkV2,
    FactorizationMachine,
    InnerProduct,
    InteractingLayer,
    SqueezeExcitation,
    TargetAttention,
)
from towers.mlp import MLP

Batch = dict[str, torch.Tensor]

Dropout = restricted_number_type("Dropout", float, [(">=", 0), ("<", 1)])  # the share of units zeroed


class CollaborativeTower(nn.Module):
    """Base class: owns the field embeddings; subclasses define the representation.

    Args:
        spec: the feature spec.
        embed_dim: E.

    Attributes:
        output_dim: D, the width of `forward`'s output.
    """

    output_dim: int

    def __init__(self, spec: FeatureSpec, embed_dim: int) -> None:
        super().__init__()
        self.embedding = FieldEmbedding(spec, embed_dim)

    def field_embeddings(self, batch: Batch) -> torch.Tensor:
        """B x F x E, one slot per field in spec order."""
        return self.embedding(batch)

    def forward(self, batch: Batch) -> torch.Tensor:
        """B x D representation."""
        raise NotImplementedError


class WideDeep(CollaborativeTower):
    """Wide & Deep (Cheng et al. 2016). Representation: [per-field wide weights (F), deep MLP output].

    Args:
        spec: the feature spec.
        embed_dim: E.
        mlp_dims: hidden sizes of the deep MLP over the flat embeddings.
        dropout: MLP dropout.
        batch_norm: MLP BatchNorm.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        embed_dim: PositiveInt = 32,
        mlp_dims: Sequence[PositiveInt] = (256, 128, 64),
        dropout: Dropout = 0.1,
        batch_norm: bool = True,
    ) -> None:
        super().__init__(spec, embed_dim)
        num_fields = self.embedding.num_fields
        self.wide = FieldEmbedding(spec, 1)
        self.deep = MLP(num_fields * embed_dim, mlp_dims, dropout, batch_norm)
        self.output_dim = num_fields + self.deep.output_dim

    def forward(self, batch: Batch) -> torch.Tensor:
        deep = self.deep(self.field_embeddings(batch).flatten(1))
        return torch.cat([self.wide(batch).flatten(1), deep], dim=1)


class DeepFM(CollaborativeTower):
    """DeepFM (Guo et al. 2017). Representation: [first-order (F), FM interaction vector (E), MLP output].

    Args:
        spec: the feature spec.
        embed_dim: E.
        mlp_dims: hidden sizes of the deep MLP over the flat embeddings.
        dropout: MLP dropout.
        batch_norm: MLP BatchNorm.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        embed_dim: PositiveInt = 32,
        mlp_dims: Sequence[PositiveInt] = (256, 128, 64),
        dropout: Dropout = 0.1,
        batch_norm: bool = True,
    ) -> None:
        super().__init__(spec, embed_dim)
        num_fields = self.embedding.num_fields
        self.first_order = FieldEmbedding(spec, 1)
        self.fm = FactorizationMachine()
        self.deep = MLP(num_fields * embed_dim, mlp_dims, dropout, batch_norm)
        self.output_dim = num_fields + embed_dim + self.deep.output_dim

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.field_embeddings(batch)
        return torch.cat([self.first_order(batch).flatten(1), self.fm(emb), self.deep(emb.flatten(1))], dim=1)


class DCN(CollaborativeTower):
    """Deep & Cross Network (Wang et al. 2017). Representation: [cross output (F*E), MLP output].

    Args:
        spec: the feature spec.
        embed_dim: E.
        num_cross_layers: cross layers.
        mlp_dims: hidden sizes of the deep MLP, parallel to the cross network.
        dropout: MLP dropout.
        batch_norm: MLP BatchNorm.
    """

    cross_network: type[nn.Module] = CrossNetwork

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        embed_dim: PositiveInt = 32,
        num_cross_layers: PositiveInt = 3,
        mlp_dims: Sequence[PositiveInt] = (256, 128, 64),
        dropout: Dropout = 0.1,
        batch_norm: bool = True,
    ) -> None:
        super().__init__(spec, embed_dim)
        flat_dim = self.embedding.num_fields * embed_dim
        self.cross = self.cross_network(flat_dim, num_cross_layers)
        self.deep = MLP(flat_dim, mlp_dims, dropout, batch_norm)
        self.output_dim = flat_dim + self.deep.output_dim

    def forward(self, batch: Batch) -> torch.Tensor:
        flat = self.field_embeddings(batch).flatten(1)
        return torch.cat([self.cross(flat), self.deep(flat)], dim=1)


class DCNv2(DCN):
    """DCN-V2 (Wang et al. 2021), parallel structure, full-rank cross layers; otherwise as DCN.

    Representation: [cross output (F*E), MLP output]. Arguments as DCN.
    """

    cross_network = CrossNetworkV2


class AutoInt(CollaborativeTower):
    """AutoInt+ (Song et al. 2019): self-attentive field interactions beside a deep MLP.

    Representation: [attended fields (F*E), MLP output].

    Args:
        spec: the feature spec.
        embed_dim: E.
        num_attention_layers: interacting layers.
        num_heads: attention heads per layer; must divide E.
        mlp_dims: hidden sizes of the deep MLP over the flat embeddings.
        dropout: MLP dropout.
        batch_norm: MLP BatchNorm.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        embed_dim: PositiveInt = 32,
        num_attention_layers: PositiveInt = 3,
        num_heads: PositiveInt = 2,
        mlp_dims: Sequence[PositiveInt] = (256, 128, 64),
        dropout: Dropout = 0.1,
        batch_norm: bool = True,
    ) -> None:
        super().__init__(spec, embed_dim)
        flat_dim = self.embedding.num_fields * embed_dim
        self.attention = nn.Sequential(
            *(InteractingLayer(embed_dim, num_heads) for _ in range(num_attention_layers))
        )
        self.deep = MLP(flat_dim, mlp_dims, dropout, batch_norm)
        self.output_dim = flat_dim + self.deep.output_dim

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.field_embeddings(batch)
        return torch.cat([self.attention(emb).flatten(1), self.deep(emb.flatten(1))], dim=1)


class XDeepFM(CollaborativeTower):
    """xDeepFM (Lian et al. 2018). Representation: [first-order (F), CIN output, MLP output].

    Args:
        spec: the feature spec.
        embed_dim: E.
        cin_layer_sizes: feature maps per CIN layer.
        mlp_dims: hidden sizes of the deep MLP over the flat embeddings.
        dropout: MLP dropout.
        batch_norm: MLP BatchNorm.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        embed_dim: PositiveInt = 32,
        cin_layer_sizes: Sequence[PositiveInt] = (16, 16, 16),
        mlp_dims: Sequence[PositiveInt] = (256, 128, 64),
        dropout: Dropout = 0.1,
        batch_norm: bool = True,
    ) -> None:
        super().__init__(spec, embed_dim)
        num_fields = self.embedding.num_fields
        self.first_order = FieldEmbedding(spec, 1)
        self.cin = CompressedInteractionNetwork(num_fields, cin_layer_sizes)
        self.deep = MLP(num_fields * embed_dim, mlp_dims, dropout, batch_norm)
        self.output_dim = num_fields + self.cin.output_dim + self.deep.output_dim

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.field_embeddings(batch)
        first_order = self.first_order(batch).flatten(1)
        return torch.cat([first_order, self.cin(emb), self.deep(emb.flatten(1))], dim=1)


class FiBiNet(CollaborativeTower):
    """FiBiNET (Huang et al. 2019): SENET-reweighted and plain embeddings, each through a bilinear
    interaction, into a deep MLP. Representation: [first-order (F), MLP output].

    Args:
        spec: the feature spec.
        embed_dim: E.
        reduction_ratio: SENET bottleneck ratio.
        mlp_dims: hidden sizes of the deep MLP over both bilinear outputs.
        dropout: MLP dropout.
        batch_norm: MLP BatchNorm.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        embed_dim: PositiveInt = 32,
        reduction_ratio: PositiveInt = 3,
        mlp_dims: Sequence[PositiveInt] = (256, 128, 64),
        dropout: Dropout = 0.1,
        batch_norm: bool = True,
    ) -> None:
        super().__init__(spec, embed_dim)
        num_fields = self.embedding.num_fields
        num_pairs = num_fields * (num_fields - 1) // 2
        self.first_order = FieldEmbedding(spec, 1)
        self.senet = SqueezeExcitation(num_fields, reduction_ratio)
        self.bilinear = BilinearInteraction(embed_dim)
        self.senet_bilinear = BilinearInteraction(embed_dim)
        self.deep = MLP(2 * num_pairs * embed_dim, mlp_dims, dropout, batch_norm)
        self.output_dim = num_fields + self.deep.output_dim

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.field_embeddings(batch)
        pairs = torch.cat([self.bilinear(emb), self.senet_bilinear(self.senet(emb))], dim=1)  # B x 2P x E
        return torch.cat([self.first_order(batch).flatten(1), self.deep(pairs.flatten(1))], dim=1)


class PNN(CollaborativeTower):
    """Inner-product PNN (Qu et al. 2016): flat embeddings and all pairwise inner products into an MLP.

    Representation: MLP output.

    Args:
        spec: the feature spec.
        embed_dim: E.
        mlp_dims: hidden sizes of the MLP over the product layer.
        dropout: MLP dropout.
        batch_norm: MLP BatchNorm.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        embed_dim: PositiveInt = 32,
        mlp_dims: Sequence[PositiveInt] = (256, 128, 64),
        dropout: Dropout = 0.1,
        batch_norm: bool = True,
    ) -> None:
        super().__init__(spec, embed_dim)
        num_fields = self.embedding.num_fields
        self.inner_product = InnerProduct()
        num_pairs = num_fields * (num_fields - 1) // 2
        self.deep = MLP(num_fields * embed_dim + num_pairs, mlp_dims, dropout, batch_norm)
        self.output_dim = self.deep.output_dim

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.field_embeddings(batch)
        return self.deep(torch.cat([emb.flatten(1), self.inner_product(emb)], dim=1))


class DIN(CollaborativeTower):
    """Deep Interest Network (Zhou et al. 2018): each behavior sequence is pooled by attention of its
    target item (the field whose table it shares) instead of the mean; then a deep MLP.

    Representation: MLP output.

    Args:
        spec: the feature spec; needs at least one sequence field with `shares_embedding`.
        embed_dim: E.
        attention_dims: hidden sizes of the attention unit's scoring MLP.
        mlp_dims: hidden sizes of the deep MLP over the flat embeddings.
        dropout: MLP dropout.
        batch_norm: MLP BatchNorm.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        embed_dim: PositiveInt = 32,
        attention_dims: Sequence[PositiveInt] = (80, 40),
        mlp_dims: Sequence[PositiveInt] = (256, 128, 64),
        dropout: Dropout = 0.1,
        batch_norm: bool = True,
    ) -> None:
        super().__init__(spec, embed_dim)
        slot = {name: i for i, name in enumerate(spec.names)}
        # sequence name -> (its slot, the slot of its target item)
        self.slots = {
            f.name: (slot[f.name], slot[f.shares_embedding]) for f in spec.fields if f.shares_embedding
        }
        if not self.slots:
            raise ConfigError("DIN needs a sequence field with shares_embedding (its target item field)")
        self.attention = nn.ModuleDict({
            name: TargetAttention(embed_dim, attention_dims) for name in self.slots
        })
        self.deep = MLP(self.embedding.num_fields * embed_dim, mlp_dims, dropout, batch_norm)
        self.output_dim = self.deep.output_dim

    def forward(self, batch: Batch) -> torch.Tensor:
        slots = list(self.field_embeddings(batch).unbind(1))
        for name, attention in self.attention.items():
            seq, target = self.slots[name]
            slots[seq] = attention(slots[target], *self.embedding.sequence(batch, name))
        return self.deep(torch.cat(slots, dim=1))


BACKBONES: dict[str, type[CollaborativeTower]] = {
    "wide_deep": WideDeep,
    "deepfm": DeepFM,
    "dcn": DCN,
    "autoint": AutoInt,
    "dcnv2": DCNv2,
    "xdeepfm": XDeepFM,
    "fibinet": FiBiNet,
    "pnn": PNN,
    "din": DIN,
}


def named_backbone(name: str) -> dict:
    """The backbone a name of `BACKBONES` picks, as a config's `model.init_args.backbone`: its public class_path
    and all of its own constructor defaults, so nothing of another backbone's settings carries over to it."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    config = backbone_config(BACKBONES[name])
    return {"class_path": f"towers.{BACKBONES[name].__name__}", "init_args": config["init_args"]}


def backbone_name(class_path: str) -> str:
    """The `BACKBONES` name of a backbone's class_path (towers.DCN -> dcn); another class's name in lower case."""
    names = {cls.__name__: name for name, cls in BACKBONES.items()}
    last = class_path.rpartition(".")[2]
    return names.get(last, last.lower())


class CTRModel(nn.Module):
    """A collaborative tower plus a fresh linear output layer.

    Args:
        tower: the (possibly aligned) collaborative tower.

    Shapes: batch -> B logits.
    """

    def __init__(self, tower: CollaborativeTower) -> None:
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(tower.output_dim, 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.tower(batch)).squeeze(-1)


def plain(value: object) -> object:
    """A setting as builtins (jsonargparse hands PositiveInt and the like; a weights-only load takes builtins)."""
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def backbone_config(factory: object) -> dict | None:
    """{"class_path", "init_args"} (defaults filled in) of what builds a tower from a spec: a backbone class,
    or a functools.partial of one (what jsonargparse makes of a config's class_path and init_args); None
    for any other callable."""
    args, keywords, func = (), {}, factory
    if isinstance(factory, functools.partial):
        args, keywords, func = factory.args, dict(factory.keywords), factory.func
    cls = next((a for a in (*args, func) if isinstance(a, type) and issubclass(a, CollaborativeTower)), None)
    if cls is None:
        return None
    defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()
                if p.default is not inspect.Parameter.empty}
    init_args = {k: plain(v) for k, v in {**defaults, **keywords}.items()}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def build_backbone(config: dict, spec: FeatureSpec) -> CollaborativeTower:
    """The tower `config` (as from `backbone_config`) describes, on `spec`. Only a CollaborativeTower of
    `towers` or of a module already imported is built: a config from a file never imports code of its own."""
    module_name, _, name = config["class_path"].rpartition(".")
    if module_name not in sys.modules and not module_name.startswith("towers."):
        raise ValueError(f"backbone {config['class_path']!r} is not in towers and its module is not imported;"
                         " import it before loading")
    cls = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(cls, type) and issubclass(cls, CollaborativeTower)):
        raise ValueError(f"backbone {config['class_path']!r} is not a towers.CollaborativeTower")
    return cls(spec, **config["init_args"])


def make_tower(factory: Callable[[FeatureSpec], CollaborativeTower], spec: FeatureSpec) -> CollaborativeTower:
    """factory(spec), with a backbone's settings as plain numbers (as its checkpoint and export rebuild it):
    jsonargparse hands validated types such as PositiveInt, which torch.export cannot trace through."""
    config = backbone_config(factory)
    return build_backbone(config, spec) if config else factory(spec)
