"""Answer extractors and scorers on hand-written model outputs."""

from __future__ import annotations

import pytest

from rhlens.cot.extract import (
    extract_choice,
    extract_number,
    extract_text,
    find_answer_segment,
    is_refusal,
    normalize_text,
    parse_number,
    score_choice,
    score_number,
    score_text,
)
from rhlens.cot.tasks import TaskItem


def _item(answer: str, **kwargs) -> TaskItem:
    return TaskItem(id="x", question="q", answer=answer, cot_prompt="c", direct_prompt="d", **kwargs)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Answer: 12", "12"),
        ("Answer: 12 apples", "12"),
        ("answer:12.", "12"),
        ("**Answer:** 1,234", "1234"),
        ("Answer: $1,234.50 in total", "1234.5"),
        ("The answer is -7.", "-7"),
        ("The answer is \u22123", "-3"),
        ("The answer is: 0.25", "0.25"),
        ("Final answer: 3.0", "3"),
        ("So the answer is 3 + 4 = 7 apples.", "7"),
        ("Tom has 3 apples.\nHe buys 4 more, so 3 + 4 = 7.\nAnswer: 7", "7"),
        # A chain of thought mentioning other numbers before the marker.
        ("First 12 - 5 = 7. Then 7 + 10 = 17.\nAnswer: 17 stickers\nHope this helps!", "17"),
        # The last marker wins.
        ("The answer is 5. Wait, no. Let me recount.\nFinal answer: 6", "6"),
        # Marker with the number on the next line.
        ("Answer:\n42", "42"),
        # No marker: the last number, enumerators and step labels ignored.
        ("1. Tom has 3 apples.\n2. He buys 4 more.\n3. Now he has 7 apples.", "7"),
        ("Step 1: add 3 and 4.\nStep 2: that makes 7", "7"),
        ("There are 365 days in a year.", "365"),
        ("The total is 2,050 meters.", "2050"),
        ("Temperatures of -4 degrees are cold.", "-4"),
        ("It went from 3-5 people", "5"),
        ("Eight.", "8"),
        ("The answer is twenty-one.", "21"),
        ("A spider has eight legs, so 8.", "8"),
        ("I'm not sure, but I think it is 8.", "8"),
        ("The list is 3,4,5", "5"),
    ],
)
def test_extract_number(output: str, expected: str) -> None:
    assert extract_number(output) == expected


@pytest.mark.parametrize(
    "output",
    [
        "",
        "I don't know.",
        "I do not know how many there are.",
        "Answer: I don't know",
        "The number cannot be determined from the information given.",
        "There is not enough information to answer.",
        "No number here, sorry.",
        "Answer: unknown",
    ],
)
def test_extract_number_none(output: str) -> None:
    assert extract_number(output) is None


@pytest.mark.parametrize(
    ("token", "canonical"),
    [
        ("1,234", "1234"),
        ("-0", "0"),
        ("7.50", "7.5"),
        ("$3", "3"),
        ("12.000", "12"),
        ("abc", None),
        ("nan", None),
    ],
)
def test_parse_number(token: str, canonical: str | None) -> None:
    assert parse_number(token) == canonical


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B. Carbon dioxide", "B"),
        ("C) Atlantic Ocean", "C"),
        ("**D**", "D"),
        ("The answer is C.", "C"),
        ("The answer is (d).", "D"),
        ("Answer: (B) Carbon dioxide", "B"),
        ("Answer: A because the Nile flows through Cairo.", "A"),
        ("Let me think. Plants breathe in carbon dioxide.\nAnswer: B", "B"),
        ("Plants use option B for this.", "B"),
        ("Between (A) and (C), I pick (C).", "C"),
        ("answer: b", "B"),
    ],
)
def test_extract_choice(output: str, expected: str) -> None:
    assert extract_choice(output) == expected


def test_extract_choice_ignores_sentence_initial_article() -> None:
    assert extract_choice("A spider has eight legs.") is None
    assert extract_choice("I think so.") is None


def test_extract_choice_refusal_and_out_of_range() -> None:
    assert extract_choice("I don't know.") is None
    assert extract_choice("Answer: I don't know") is None
    assert extract_choice("The answer is E.") is None  # only A-D for four options


def test_extract_choice_from_option_text() -> None:
    item = _item("B", choices=("Oxygen", "Carbon dioxide", "Helium", "Neon"))
    assert extract_choice("Plants take in carbon dioxide.", item) == "B"
    # Two options named: ambiguous, no answer.
    assert extract_choice("Either oxygen or carbon dioxide.", item) is None
    five = _item("E", choices=("a1", "b1", "c1", "d1", "e1"))
    assert extract_choice("The answer is E.", five) == "E"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Answer: Paris", "Paris"),
        ("**Answer:** Paris.", "Paris"),
        ('The answer is "Daln".', "Daln"),
        ("Anna lives in Rivo. Rivo is in Daln.\nAnswer: Daln\n", "Daln"),
        ("The capital of France is Paris.", "The capital of France is Paris"),
        ("Paris", "Paris"),
        ("Let me think.\n\nIt is Berlin.", "Berlin"),
    ],
)
def test_extract_text(output: str, expected: str) -> None:
    assert extract_text(output) == expected


@pytest.mark.parametrize("output", ["", "   \n", "I don't know.", "Answer: I'm not sure."])
def test_extract_text_none(output: str) -> None:
    assert extract_text(output) is None


def test_find_answer_segment() -> None:
    assert find_answer_segment("no marker here") is None
    assert find_answer_segment("Answer: 5\nAnswer:") == "5\nAnswer:"  # empty last marker skipped
    assert find_answer_segment("The correct answer is: (C)") == "(C)"


def test_is_refusal() -> None:
    assert is_refusal("I don't know")
    assert is_refusal("I can't answer that.")
    assert not is_refusal("The capital is Paris.")


def test_normalize_text() -> None:
    assert normalize_text("  The  Daln. ") == "daln"
    assert normalize_text("São Paulo!") == "sao paulo"


def test_score_number() -> None:
    item = _item("1234", aliases=("1234.0",))
    assert score_number("1234", item)
    assert score_number("1234.0000001", item)
    assert not score_number("1235", item)
    assert not score_number(None, item)


def test_score_choice() -> None:
    assert score_choice("b", _item("B"))
    assert not score_choice("C", _item("B"))
    assert not score_choice(None, _item("B"))


def test_score_text_exact_contains_and_distractors() -> None:
    item = _item("Daln", distractors=("Mesk",))
    assert score_text("daln", item)
    assert score_text("Anna lives in Rivo, which is in Daln", item)
    assert not score_text("Dalnish", item)  # whole words only
    assert not score_text("Daln or Mesk", item)  # every candidate listed
    assert not score_text("Mesk", item)
    assert not score_text(None, item)
    alias = _item("Washington", aliases=("Washington, D.C.",))
    assert score_text("Washington D.C.", alias)


def test_score_text_unanswerable() -> None:
    item = _item("", metadata={"answerable": False})
    assert score_text(None, item)
    assert not score_text("Petra Holm", item)
