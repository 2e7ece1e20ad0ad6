"""Feature-interaction parts the backbones are composed of ("interaction arch" in torchrec terms).

Each part maps field embeddings B x F x E (or their flat view B x (F*E)) to a vector per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from towers.mlp import MLP


def field_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both members of every field pair i < j.

    Args:
        x: B x F x E.

    Returns: left and right, each B x P x E with P = F (F - 1) / 2.
    """
    left, right = torch.triu_indices(x.shape[1], x.shape[1], offset=1, device=x.device)
    return x[:, left], x[:, right]


class FactorizationMachine(nn.Module):
    """Second-order FM interaction as a vector: 0.5 ((sum_i v_i)^2 - sum_i v_i^2); its sum is the FM term.

    Shapes: B x F x E -> B x E.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x.sum(1).pow(2) - x.pow(2).sum(1))


class CrossNetwork(nn.Module):
    """DCN cross layers: x_{l+1} = x_0 (x_l . w_l) + b_l + x_l.

    Args:
        dim: D, the width of the flat input.
        num_layers: number of cross layers.

    Shapes: B x D -> B x D.
    """

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.randn(num_layers, dim) / dim**0.5)
        self.biases = nn.Parameter(torch.zeros(num_layers, dim))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, b in zip(self.weights, self.biases, strict=True):
            x = x0 * (x @ w).unsqueeze(-1) + b + x
        return x


class CrossNetworkV2(nn.Module):
    """DCN-V2 full-rank cross layers: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l.

    Args:
        dim: D, the width of the flat input.
        num_layers: number of cross layers.

    Shapes: B x D -> B x D.
    """

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class InteractingLayer(nn.Module):
    """AutoInt interacting layer: multi-head self-attention over fields with a residual and ReLU.

    Args:
        embed_dim: E.
        num_heads: attention heads; must divide E.

    Shapes: B x F x E -> B x F x E.
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(x, x, x, need_weights=False)
        return torch.relu(attended + x)


class CompressedInteractionNetwork(nn.Module):
    """xDeepFM CIN: X^k_h = sum_ij W^{k,h}_ij (X^{k-1}_i * X^0_j), each layer sum-pooled over E.

    Identity activation, as the xDeepFM paper recommends.

    Args:
        num_fields: F.
        layer_sizes: feature maps H_k per layer.

    Shapes: B x F x E -> B x sum(layer_sizes).
    """

    def __init__(self, num_fields: int, layer_sizes: Sequence[int]) -> None:
        super().__init__()
        in_maps = [num_fields, *layer_sizes[:-1]]
        self.layers = nn.ModuleList(
            nn.Conv1d(maps * num_fields, size, kernel_size=1)
            for maps, size in zip(in_maps, layer_sizes, strict=True)
        )
        self.output_dim = sum(layer_sizes)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        batch_size, _, embed_dim = x0.shape
        x, pooled = x0, []
        for layer in self.layers:
            z = torch.einsum("bhe,bfe->bhfe", x, x0).reshape(batch_size, -1, embed_dim)  # B x (H*F) x E
            x = layer(z)  # B x H_k x E
            pooled.append(x.sum(-1))
        return torch.cat(pooled, dim=1)


class SqueezeExcitation(nn.Module):
    """FiBiNET SENET layer: reweights each field by a gate computed from all fields' mean embeddings.

    Args:
        num_fields: F.
        reduction_ratio: the bottleneck is max(1, F // reduction_ratio) wide.

    Shapes: B x F x E -> B x F x E.
    """

    def __init__(self, num_fields: int, reduction_ratio: int) -> None:
        super().__init__()
        hidden = max(1, num_fields // reduction_ratio)
        self.excitation = nn.Sequential(
            nn.Linear(num_fields, hidden, bias=False), nn.ReLU(),
            nn.Linear(hidden, num_fields, bias=False), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(x.mean(-1)).unsqueeze(-1)


class BilinearInteraction(nn.Module):
    """FiBiNET bilinear interaction with one shared matrix ("field all"): p_ij = (v_i W) * v_j.

    Args:
        embed_dim: E.

    Shapes: B x F x E -> B x P x E with P = F (F - 1) / 2.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.bilinear = nn.Linear(embed_dim, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = field_pairs(x)
        return self.bilinear(left) * right


class InnerProduct(nn.Module):
    """PNN inner-product layer: <v_i, v_j> for every field pair i < j.

    Shapes: B x F x E -> B x P with P = F (F - 1) / 2.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = field_pairs(x)
        return (left * right).sum(-1)


class TargetAttention(nn.Module):
    """DIN activation unit: weights each behavior by an MLP of (target, behavior, difference, product).

    Weights are not softmax-normalised (as in DIN), so the pooled vector keeps the history's intensity;
    padded positions get weight 0.

    Args:
        embed_dim: E.
        hidden_dims: hidden sizes of the scoring MLP (no BatchNorm: padded positions must not leak
            into batch statistics).

    Shapes: target B x E, behaviors B x L x E, mask B x L -> B x E.
    """

    def __init__(self, embed_dim: int, hidden_dims: Sequence[int]) -> None:
        super().__init__()
        self.mlp = MLP(4 * embed_dim, hidden_dims)
        self.score = nn.Linear(self.mlp.output_dim, 1)

    def forward(self, target: torch.Tensor, behaviors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = target.unsqueeze(1).expand_as(behaviors)  # B x L x E
        features = torch.cat([target, behaviors, target - behaviors, target * behaviors], dim=-1)
        weights = self.score(self.mlp(features)).squeeze(-1).masked_fill(~mask, 0.0)  # B x L
        return (weights.unsqueeze(-1) * behaviors).sum(1)
