"""The alignment heads: what maps both towers' outputs into the spaces the contrastive losses compare."""

from __future__ import annotations

from torch import Tensor, nn


class AlignmentHeads(nn.Module):
    """A linear projection of each side into one shared space (the coarse loss compares these), and M linear
    sub-space maps W_m h + b_m of each projection (the fine loss compares these).

    Args:
        tab_dim: width of the collaborative tower's output.
        text_dim: width of the text vectors (the language tower's output).
        proj_dim: width of the shared space.
        num_subspaces: M, sub-spaces per side.
        subspace_dim: width of each sub-space.
    """

    def __init__(self, tab_dim: int, text_dim: int, proj_dim: int, num_subspaces: int, subspace_dim: int) -> None:
        super().__init__()
        self.num_subspaces, self.subspace_dim = num_subspaces, subspace_dim
        self.tab_proj = nn.Linear(tab_dim, proj_dim)
        self.text_proj = nn.Linear(text_dim, proj_dim)
        self.tab_subspaces = nn.Linear(proj_dim, num_subspaces * subspace_dim)  # the M maps at once
        self.text_subspaces = nn.Linear(proj_dim, num_subspaces * subspace_dim)

    def forward(self, tab_features: Tensor, text_features: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B x tab_dim, B x text_dim) -> shared-space vectors (B x proj_dim) and sub-space vectors
        (B x M x subspace_dim), table side then text side."""
        tab, text = self.tab_proj(tab_features), self.text_proj(text_features)
        shape = (-1, self.num_subspaces, self.subspace_dim)
        return tab, text, self.tab_subspaces(tab).view(shape), self.text_subspaces(text).view(shape)
