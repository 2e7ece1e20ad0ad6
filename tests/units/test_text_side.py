"""The text side is decided once, from the language-tower settings: 3 tower modes x 2 granularities."""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import synthetic_spec

from tabular2text.text_side import TextSide
from tabular2text.text_vectors import FrozenText

SPEC = dataclasses.replace(synthetic_spec(), item_field="item_id")


@pytest.mark.parametrize(("settings", "expected"), [
    ({}, TextSide("vectors")),
    ({"trainable_layers": 1}, TextSide("tokens")),
    ({"trainable_layers": "all"}, TextSide("tokens")),
    ({"trainable_layers": 1, "cache_lower_layers": True}, TextSide("states")),
    ({"granularity": "entity"}, TextSide("entity_vectors", 3, "history")),
])
def test_each_setting_serves_one_text_side(settings, expected):
    side = TextSide.from_settings(SPEC, **settings)
    assert side == expected
    assert side.frozen == (side.serves in ("vectors", "entity_vectors"))


def test_entity_text_without_a_behavior_sequence_is_user_and_item():
    spec = SPEC.with_fields(tuple(f for f in SPEC.fields if f.kind != "sequence"))
    assert TextSide.from_settings(spec, "entity") == TextSide("entity_vectors", 2, None)


@pytest.mark.parametrize(("spec", "settings", "message"), [
    (SPEC, {"granularity": "user"}, "unknown text granularity 'user'"),
    (SPEC, {"granularity": "entity", "trainable_layers": 1}, "needs a frozen language tower"),
    (SPEC, {"granularity": "entity", "trainable_layers": 1, "cache_lower_layers": True},
     "cache_lower_layers .* needs text_granularity row$"),
    (SPEC, {"cache_lower_layers": True}, "cache_lower_layers .* trainable_layers of 1 or more, not all \\(got 0\\)$"),
    (SPEC, {"trainable_layers": "all", "cache_lower_layers": True}, "not all \\(got 'all'\\)$"),
    (synthetic_spec(), {"granularity": "entity"}, "needs an item id field"),
])
def test_settings_that_cannot_work_are_refused_once_here(spec, settings, message):
    with pytest.raises(ValueError, match=message):
        TextSide.from_settings(spec, **settings)


def test_entity_text_serves_user_item_and_the_mean_of_known_history_items():
    """A row's entity text: [user, item, mean of its history items' vectors], padding and unknown ids left out
    of the mean, zeros when none is known; by hand on a batch of three rows."""
    users, items = np.arange(6, dtype=np.float32).reshape(3, 2), 10 + np.arange(6, dtype=np.float32).reshape(3, 2)
    catalog = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0], [3.0, 6.0], [5.0, 4.0]])  # ids 0 PAD, 1 OOV
    text = FrozenText({"train": [(users, np.array([2, 0, 1])), (items, np.array([0, 1, 2]))]}, catalog, "history")
    batch = {"row": torch.tensor([0, 1, 2]), "history": torch.tensor([[2, 3, 1, 0], [4, 0, 0, 0], [1, 1, 0, 0]])}
    expected = torch.tensor([[4.0, 5.0, 10.0, 11.0, 2.0, 4.0],   # history: mean of ids 2 and 3 (OOV, PAD out)
                             [0.0, 1.0, 12.0, 13.0, 5.0, 4.0],   # id 4 alone
                             [2.0, 3.0, 14.0, 15.0, 0.0, 0.0]])  # nothing known: zeros
    assert torch.equal(text("train", batch), expected)
