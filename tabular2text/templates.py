"""The seven templates that turn one tabular row into one sentence per side (CTRL stage 0).

With the defaults, the paper's example row renders as

    This is a user, gender is female, age is 18, occupation is doctor, who has recently watched
    Titanic|Avatar. This is a movie, title is The Terminator, genre is Sci-FI, director is Camelon.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tabular2text.schema import Field


@dataclass(frozen=True)
class Templates:
    """Seven format strings. `{name}` is a field's text name, `{value}` / `{values}` its value(s).

    Args:
        user_intro: opens the user sentence.
        item_intro: opens the item sentence; `{item_noun}` is "movie", "product", ...
        feature: one categorical, id or numeric field.
        multi_valued: one multi-valued field; values are joined by `value_sep`.
        behavior: the behavior sequence; `{action}` is "watched", "bought", ...; items joined by `value_sep`.
        feature_sep: between the intro and the features of one side.
        side_sep: between the user and the item sentence; its stripped form ends the text.
        value_sep: joins the values of a multi-valued field or a sequence.
    """

    user_intro: str = "This is a user"
    item_intro: str = "This is a {item_noun}"
    feature: str = "{name} is {value}"
    multi_valued: str = "{name} is {values}"
    behavior: str = "who has recently {action} {items}"
    feature_sep: str = ", "
    side_sep: str = ". "
    value_sep: str = "|"

    def __post_init__(self) -> None:
        for name, allowed in PLACEHOLDERS.items():
            used = {field for _, field, _, _ in string.Formatter().parse(getattr(self, name)) if field is not None}
            if used - allowed:
                known = ", ".join("{" + a + "}" for a in sorted(allowed))
                raise ValueError(f"template {name}={getattr(self, name)!r} names unknown field(s) "
                                 f"{', '.join('{' + u + '}' for u in sorted(used - allowed))}; "
                                 + (f"it may use only {known}" if known else "it takes no placeholders"))


PLACEHOLDERS: dict[str, set[str]] = {
    "user_intro": set(), "item_intro": {"item_noun"}, "feature": {"name", "value"},
    "multi_valued": {"name", "values"}, "behavior": {"action", "items"}, "feature_sep": set(), "side_sep": set(),
    "value_sep": set(),
}


# The paper's prompt study: natural sentences > name-value > name:value > masked names > values only.
PRESETS: dict[str, Templates] = {
    "natural": Templates(),
    "dash": Templates(feature="{name}-{value}", multi_valued="{name}-{values}"),
    "colon": Templates(feature="{name}:{value}", multi_valued="{name}:{values}"),
    "masked": Templates(feature="Field is {value}", multi_valued="Field is {values}"),
    "values": Templates(feature="{value}", multi_valued="{values}"),
}


def preset(template: str | dict[str, str]) -> Templates:
    """A preset by name, or a mapping of template names to format strings that replace those of "natural",
    e.g. {"feature": "{name}: {value}", "feature_sep": "; "}."""
    if isinstance(template, dict):
        names = [f.name for f in dataclasses.fields(Templates)]
        unknown = sorted(set(template) - set(names))
        if unknown:
            raise ValueError(f"unknown template name(s) {', '.join(unknown)}; use {', '.join(names)}")
        return dataclasses.replace(PRESETS["natural"], **template)
    try:
        return PRESETS[template]
    except KeyError:
        raise ValueError(f"unknown template preset {template!r}; use one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class Rendered:
    """A rendered row: the text, where the item sentence starts, and each field's character span."""

    text: str
    item_start: int
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def user_text(self) -> str:
        return self.text[: self.item_start].rstrip()

    @property
    def item_text(self) -> str:
        return self.text[self.item_start :]


def is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str):
        return value == "" or value.lower() == "nan"
    if isinstance(value, Sequence):
        return all(is_missing(v) for v in value)
    return False


MAX_VALUE_CHARS = 1000  # what one value may add to a text; a language model reads ~500 characters in all


def format_value(value: object) -> str:
    """A value as text: integral floats without ".0", other floats to 4 significant digits, anything longer
    than MAX_VALUE_CHARS cut to that many characters (preparation says how many values were cut)."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.4g}"
    return str(value)[:MAX_VALUE_CHARS]


class TextRenderer:
    """Renders rows with a fixed field list and templates.

    Args:
        fields: the fields in rendering order; fields whose `text_name` is None are not rendered.
        templates: the seven templates.
        item_noun: fills `{item_noun}` in the item intro.
        history_action: fills `{action}` in the behavior template.
    """

    def __init__(self, fields: Sequence[Field], templates: Templates = Templates(), item_noun: str = "item",
                 history_action: str = "interacted with") -> None:
        self.templates = templates
        self.item_noun = item_noun
        self.history_action = history_action
        rendered = [f for f in fields if f.text_name is not None]
        # The behavior sequence closes the user sentence ("..., who has recently watched A|B.").
        self.user_fields = [f for f in rendered if f.side != "item" and f.kind != "sequence"]
        self.user_fields += [f for f in rendered if f.side != "item" and f.kind == "sequence"]
        self.item_fields = [f for f in rendered if f.side == "item"]

    def _phrase(self, f: Field, value: object) -> str:
        t = self.templates
        if f.kind == "sequence":
            return self.behavior(t.value_sep.join(format_value(v) for v in value if not is_missing(v)))
        if f.kind == "multi_valued":
            values = t.value_sep.join(f.value_text.get(str(v), format_value(v)) for v in value if not is_missing(v))
            return t.multi_valued.format(name=f.text_name, values=values)
        return t.feature.format(name=f.text_name, value=f.value_text.get(format_value(value), format_value(value)))

    def _sentence(self, intro: str, fields: list[Field], row: Mapping[str, object], offset: int,
                  spans: dict[str, tuple[int, int]]) -> str:
        text = intro
        for f in fields:
            value = row.get(f.name)
            if is_missing(value):
                continue
            phrase = self._phrase(f, value)
            text += self.templates.feature_sep
            spans[f.name] = (offset + len(text), offset + len(text) + len(phrase))
            text += phrase
        return text

    @property
    def item_intro(self) -> str:
        """The item intro with its noun; "a {item_noun}" reads "an item", "an article" before a vowel."""
        intro = self.templates.item_intro
        if self.item_noun[:1].lower() in "aeio":
            intro = intro.replace("a {item_noun}", "an {item_noun}")
        return intro.format(item_noun=self.item_noun)

    def profile_sentence(self, row: Mapping[str, object]) -> str:
        """The user sentence without its behavior sequence(s) and not yet closed (see `close_user`)."""
        return self._sentence(self.templates.user_intro, [f for f in self.user_fields if f.kind != "sequence"], row,
                              0, {})

    def close_user(self, sentence: str) -> str:
        """A user sentence as `Rendered.user_text` holds it: ended by the side separator's stripped form."""
        return (sentence + self.templates.side_sep).rstrip()

    def item_sentence(self, row: Mapping[str, object]) -> str:
        """The item sentence as `render` ends the text with it (closed by the side separator's stripped form)."""
        t = self.templates
        return self._sentence(self.item_intro, self.item_fields, row, 0, {}) + \
            t.side_sep.rstrip()

    def behavior(self, items: str) -> str:
        """The behavior phrase of items already joined by the value separator."""
        return self.templates.behavior.format(action=self.history_action, items=items)

    def render(self, row: Mapping[str, object]) -> Rendered:
        """Render one row of raw values; a sequence value is the list of its items' display names."""
        t = self.templates
        spans: dict[str, tuple[int, int]] = {}
        user = self._sentence(t.user_intro, self.user_fields, row, 0, spans)
        item_start = len(user) + len(t.side_sep)
        item = self._sentence(self.item_intro, self.item_fields, row, item_start, spans)
        text = user + t.side_sep + item + t.side_sep.rstrip()
        spans["user"] = (0, len(user))
        spans["item"] = (item_start, item_start + len(item))
        return Rendered(text=text, item_start=item_start, spans=spans)
