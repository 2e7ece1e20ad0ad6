import math

import pytest

from tabular2text.schema import Field
from tabular2text.templates import PRESETS, Templates, TextRenderer, preset

PAPER = ("This is a user, gender is female, age is 18, occupation is doctor, who has recently watched Titanic|Avatar."
         " This is a movie, title is The Terminator, genre is Sci-FI, director is Camelon.")

FIELDS = [
    Field("history", "sequence", "user", text_name="history"),  # declared first: still closes the user side
    Field("user_id", "categorical", "user"),  # no text name: an id is not rendered
    Field("gender", "categorical", "user", text_name="gender"),
    Field("age", "numeric", "user", text_name="age"),
    Field("occupation", "categorical", "user", text_name="occupation"),
    Field("title", "categorical", "item", text_name="title"),
    Field("genre", "multi_valued", "item", text_name="genre"),
    Field("director", "categorical", "item", text_name="director"),
]
ROW = {"user_id": "u7", "gender": "female", "age": 18.0, "occupation": "doctor", "history": ["Titanic", "Avatar"],
       "title": "The Terminator", "genre": ["Sci-FI"], "director": "Camelon"}


def render(templates: Templates | None = None, row: dict = ROW) -> str:
    return TextRenderer(FIELDS, templates or Templates(), item_noun="movie", history_action="watched").render(row).text


def test_default_renders_the_papers_sentence_exactly():
    assert render() == PAPER


@pytest.mark.parametrize(("name", "expected"), [
    ("natural", PAPER),
    ("dash", "This is a user, gender-female, age-18, occupation-doctor, who has recently watched Titanic|Avatar."
             " This is a movie, title-The Terminator, genre-Sci-FI, director-Camelon."),
    ("colon", "This is a user, gender:female, age:18, occupation:doctor, who has recently watched Titanic|Avatar."
              " This is a movie, title:The Terminator, genre:Sci-FI, director:Camelon."),
    ("masked", "This is a user, Field is female, Field is 18, Field is doctor, who has recently watched"
               " Titanic|Avatar. This is a movie, Field is The Terminator, Field is Sci-FI, Field is Camelon."),
    ("values", "This is a user, female, 18, doctor, who has recently watched Titanic|Avatar."
               " This is a movie, The Terminator, Sci-FI, Camelon."),
])
def test_presets_of_the_prompt_study(name, expected):
    assert render(PRESETS[name]) == expected


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown template preset 'fancy'.*natural"):
        preset("fancy")


def test_missing_values_are_skipped_never_rendered_as_nan():
    row = dict(ROW, age=math.nan, occupation=None, history=[], genre=["", None])
    text = render(row=row)
    assert text == "This is a user, gender is female. This is a movie, title is The Terminator, director is Camelon."
    assert "nan" not in text.lower()


def test_spans_locate_every_field_and_side():
    r = TextRenderer(FIELDS, Templates(), "movie", "watched").render(ROW)
    got = {name: r.text[a:b] for name, (a, b) in r.spans.items()}
    assert got == {
        "gender": "gender is female", "age": "age is 18", "occupation": "occupation is doctor",
        "history": "who has recently watched Titanic|Avatar", "title": "title is The Terminator",
        "genre": "genre is Sci-FI", "director": "director is Camelon",
        "user": PAPER[: PAPER.index(". This")], "item": PAPER[PAPER.index("This is a movie"):-1],
    }
    assert r.user_text + " " + r.item_text == PAPER


def test_value_text_and_custom_templates():
    fields = [Field("gender", "categorical", "user", text_name="gender", value_text={"F": "female"}),
              Field("price", "numeric", "item", text_name="price")]
    t = Templates(user_intro="A shopper", item_intro="An {item_noun}", feature="{name} = {value}",
                  feature_sep="; ", side_sep=" | ")
    text = TextRenderer(fields, t, item_noun="ad").render({"gender": "F", "price": 2.5}).text
    assert text == "A shopper; gender = female | An ad; price = 2.5 |"


def test_template_naming_an_unknown_field_is_refused_with_the_allowed_names():
    with pytest.raises(ValueError, match=r"template feature='\{gender\} = \{value\}' names unknown field\(s\)"
                                         r" \{gender\}; it may use only \{name\}, \{value\}"):
        Templates(feature="{gender} = {value}")
    with pytest.raises(ValueError, match=r"user_intro=.*\{age\}; it takes no placeholders"):
        Templates(user_intro="A user of {age}")
