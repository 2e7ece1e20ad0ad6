"""Field embeddings built from the feature spec (the "sparse arch" of torchrec)."""

from __future__ import annotations

import torch
from torch import nn

from tabular2text.schema import PAD, FeatureSpec, Field


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real positions of a padded list; an empty list gives zeros.

    Args:
        values: B x L x E.
        mask: B x L, True where the position holds a real value.

    Returns: B x E.
    """
    weights = mask.unsqueeze(-1).to(values.dtype)
    return (values * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class FieldEmbedding(nn.Module):
    """One E-dim vector per field, in spec order.

    One table per categorical and multi_valued field (id 0 is padding); a sequence field looks its ids
    up in the table of its `shares_embedding` field. Multi-valued and sequence fields are mean-pooled
    over their mask; a numeric field is its value times a learned vector.

    Args:
        spec: the feature spec; its field order is the slot order of the output.
        embed_dim: E.
        init_std: standard deviation of the normal initialisation of tables and numeric vectors.

    Shapes: batch -> B x F x E.
    """

    def __init__(self, spec: FeatureSpec, embed_dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.fields = spec.fields
        self.embed_dim = embed_dim
        self.tables = nn.ModuleDict({
            f.name: nn.Embedding(f.vocab_size, embed_dim, padding_idx=PAD)
            for f in spec.fields
            if f.kind != "numeric" and f.shares_embedding is None
        })
        self.numeric = nn.ParameterDict({
            f.name: nn.Parameter(torch.empty(embed_dim)) for f in spec.fields if f.kind == "numeric"
        })
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=init_std)
            with torch.no_grad():
                table.weight[PAD].zero_()
        for vector in self.numeric.values():
            nn.init.normal_(vector, std=init_std)

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    def table(self, f: Field) -> nn.Embedding:
        """The table a field looks its ids up in (a sequence uses its item field's table)."""
        return self.tables[f.shares_embedding or f.name]

    def sequence(self, batch: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw list of a multi_valued or sequence field for attention models.

        Returns: values B x L x E and mask B x L (True = real value).
        """
        f = next(f for f in self.fields if f.name == name)
        return self.table(f)(batch[name]), batch[name + "_mask"]

    def embed_field(self, batch: dict[str, torch.Tensor], f: Field) -> torch.Tensor:
        """The flat B x E view of one field."""
        if f.kind == "numeric":
            return batch[f.name].unsqueeze(-1) * self.numeric[f.name]
        if f.kind == "categorical":
            return self.table(f)(batch[f.name])
        return masked_mean(*self.sequence(batch, f.name))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.embed_field(batch, f) for f in self.fields], dim=1)
