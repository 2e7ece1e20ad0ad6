"""The one MLP block every backbone uses (the "dense arch" / "over arch" of torchrec)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Linear -> (BatchNorm) -> ReLU -> Dropout, once per hidden size.

    Args:
        in_dim: input width D.
        dims: hidden sizes; empty means identity (the output is the input).
        dropout: dropout probability after each activation; None for no dropout layer at all. A number, 0
            included, always adds the layer, so the weights' names do not depend on it: a tower aligned at one
            dropout initialises one fine-tuned at another (dropout 0 in stage 2 after 0.1 in stage 1).
        batch_norm: whether to normalise each hidden layer before the activation.

    Shapes: B x D -> B x dims[-1].
    """

    def __init__(
        self, in_dim: int, dims: Sequence[int], dropout: float | None = None, batch_norm: bool = False
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in dims:
            layers.append(nn.Linear(in_dim, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
            if dropout is not None:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        self.layers = nn.Sequential(*layers)
        self.output_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
