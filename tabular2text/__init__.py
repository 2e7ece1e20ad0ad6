"""The table side: readers of each layout (sources), preparation into parquet + feature spec (prepare,
encode), the templates that turn rows and behavior sequences into text, and the Lightning data module."""

from tabular2text.schema import OOV, PAD, FeatureSpec, Field

__all__ = ["OOV", "PAD", "FeatureSpec", "Field"]
