"""The text side is decided once, from the language-tower settings: 3 tower modes x 2 granularities."""

import dataclasses

import pytest
from helpers import synthetic_spec

from tabular2text.text_side import TextSide

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
    (SPEC, {"granularity": "entity", "trainable_layers": 1, "cache_lower_layers": True}, "cache_lower_layers"),
    (SPEC, {"cache_lower_layers": True}, "cache_lower_layers .* trainable_layers >= 1 \\(not 0\\)"),
    (SPEC, {"trainable_layers": "all", "cache_lower_layers": True}, "cache_lower_layers"),
    (synthetic_spec(), {"granularity": "entity"}, "needs an item id field"),
])
def test_settings_that_cannot_work_are_refused_once_here(spec, settings, message):
    with pytest.raises(ValueError, match=message):
        TextSide.from_settings(spec, **settings)
