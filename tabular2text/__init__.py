"""Turn tabular rows and behavior sequences into text (CTRL stage 0)."""

from tabular2text.schema import OOV, PAD, FeatureSpec, Field

__all__ = ["OOV", "PAD", "FeatureSpec", "Field"]
