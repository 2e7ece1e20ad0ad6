"""Stage 1's text side, decided once from the language-tower settings: what the data module serves in
`batch["text"]` and what the model reads it with. The model and the data module both read the one answer.

    language tower \\ text granularity   row (the paper's)                   entity (as DisCo and KAR do)
    frozen (trainable_layers 0)         "vectors": a cached vector per row    "entity_vectors": cached [user, item,
                                        (the tower runs once, in setup)      mean of its history items] per row
    trainable (trainable_layers k/all)  "tokens": token ids; the tower is     refused: entity text is encoded once
                                        in the model                         per entity, by a frozen tower
    top k over cached lower blocks      "states": cached hidden states; the   refused: states are cached per row
    (k >= 1, cache_lower_layers)        top k blocks are in the model        text
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tabular2text.schema import FeatureSpec

Serves = Literal["vectors", "entity_vectors", "tokens", "states"]


@dataclass(frozen=True)
class TextSide:
    """What `batch["text"]` holds (see the module docstring's table).

    Args:
        serves: "vectors" (B x H), "entity_vectors" (B x parts*H), "tokens" ({input_ids, attention_mask, ...})
            or "states" ({states: B x L x H, attention_mask: B x L}).
        parts: text vectors per row, side by side: 1 for row text; entity text: user and item, and the mean of
            the history items' vectors when the data has a behavior sequence (2 or 3).
        history_field: entity text: the behavior sequence whose items' vectors are averaged.
    """

    serves: Serves
    parts: int = 1
    history_field: str | None = None

    @property
    def frozen(self) -> bool:
        """The language tower runs once, in setup, into the data module's cache; the model holds none of it."""
        return self.serves in ("vectors", "entity_vectors")

    @classmethod
    def from_settings(cls, spec: FeatureSpec, granularity: str = "row", trainable_layers: int | str = 0,
                      cache_lower_layers: bool = False) -> TextSide:
        """The text side of these settings on data of `spec`, or a ValueError naming the setting that cannot work.

        Args:
            spec: the data's feature spec (entity text needs its item id field and reads its behavior sequence).
            granularity: "row" or "entity" (the model's `text_granularity`).
            trainable_layers: top language blocks that train; 0 freezes the tower, "all" trains all of it.
            cache_lower_layers: the frozen blocks below the top `trainable_layers` run once, into the cache.
        """
        if granularity not in ("row", "entity"):
            raise ValueError(f"unknown text granularity {granularity!r}; use row or entity")
        if cache_lower_layers and granularity != "row":
            raise ValueError("cache_lower_layers caches hidden states of each row's text: it needs text_granularity"
                             " row")
        if cache_lower_layers and trainable_layers in (0, "all"):
            raise ValueError("cache_lower_layers caches the frozen blocks below the trainable top ones: it needs"
                             f" trainable_layers of 1 or more, not all (got {trainable_layers!r})")
        if granularity == "row":
            if cache_lower_layers:
                return cls("states")
            return cls("vectors" if trainable_layers == 0 else "tokens")
        if trainable_layers != 0:
            raise ValueError("text_granularity entity encodes each entity once and needs a frozen language tower;"
                             " use trainable_layers 0 or text_granularity row")
        if spec.item_field is None:
            raise ValueError("text_granularity entity needs an item id field in the data; use text_granularity row")
        history = next((f.name for f in spec.fields if f.kind == "sequence"), None)
        return cls("entity_vectors", 3 if history else 2, history)
