"""Checks shared by both training stages."""

from __future__ import annotations

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot serve the requested purpose; the message says why and what to pass."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; continuing would only write a broken checkpoint."""


def require_finite(loss: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
    """Return `loss`, or stop training with a message that says where it broke and what to try."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"the training loss became {loss.item()} at epoch {epoch}, step {step}; training stopped before"
            " saving it. Lower the learning rate (model.init_args.lr), raise the temperature, or check the"
            " input data for extreme numeric values")
    return loss
