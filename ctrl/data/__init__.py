"""Data: readers for each layout, preparation into parquet + feature spec, and the Lightning data module."""
