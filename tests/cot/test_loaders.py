"""Dataset loaders on small fixture files written for this project."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rhlens.cot import load_items
from rhlens.cot.loaders import load_gsm8k, load_mmlu, load_musique, load_task, sniff_format
from rhlens.cot.tasks import get_task
from rhlens.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"


def test_gsm8k() -> None:
    task = load_gsm8k(FIXTURES / "gsm8k_mini.jsonl")
    assert task.name == "gsm8k:gsm8k_mini" and task.kind == "context"
    assert [it.answer for it in task] == ["15", "2050", "-4", "7.5"]  # blank line skipped
    first = task.items[0]
    assert first.question.startswith("A baker fills 4 trays")
    assert first.metadata["rationale"].endswith("15 rolls are left.")
    assert "####" not in first.cot_prompt and "####" not in first.direct_prompt
    assert "step by step" in first.cot_prompt
    assert task.items[3].metadata["line"] == 5
    assert task.grade("24 - 9 = 15\nAnswer: 15 rolls", first)
    assert task.grade("They walk 2,050 meters.", task.items[1])
    assert len(load_gsm8k(FIXTURES / "gsm8k_mini.jsonl", limit=2)) == 2


def test_gsm8k_missing_final_answer_names_line() -> None:
    with pytest.raises(ConfigError, match=r"gsm8k_bad_answer\.jsonl: line 3: .*####"):
        load_gsm8k(FIXTURES / "gsm8k_bad_answer.jsonl")


def test_gsm8k_bad_json_names_line() -> None:
    with pytest.raises(ConfigError, match="line 3") as info:
        load_gsm8k(FIXTURES / "gsm8k_bad_json.jsonl")
    assert "gsm8k_bad_json.jsonl" in str(info.value) and "not valid JSON" in str(info.value)


def test_gsm8k_non_numeric_answer(tmp_path: Path) -> None:
    bad = tmp_path / "g.jsonl"
    bad.write_text(json.dumps({"question": "q?", "answer": "x\n#### seven"}) + "\n")
    with pytest.raises(ConfigError, match="line 1: final answer 'seven' is not a number"):
        load_gsm8k(bad)


def test_mmlu_csv() -> None:
    task = load_mmlu(FIXTURES / "geography_test.csv")
    assert task.kind == "knowledge" and task.answer_type == "choice"
    assert [it.answer for it in task] == ["A", "C", "B", "D"]
    desert = task.items[2]
    assert desert.question.startswith("Which of these is a desert, in the sense")
    assert desert.choices == ("Amazon basin", "Sahara", "Siberian taiga", "Congo basin")
    assert "about geography." in desert.cot_prompt
    assert "\nA. Amazon basin\nB. Sahara\nC. Siberian taiga\nD. Congo basin" in desert.cot_prompt
    assert desert.direct_prompt.endswith("Answer with just the letter.")
    # The multi-line record starts on line 5 (after a blank line).
    assert task.items[3].metadata["line"] == 5
    assert task.grade("The answer is (B).", desert)
    assert task.grade("Sahara", desert)
    assert not task.grade("A", desert)


def test_mmlu_csv_wrong_column_count() -> None:
    with pytest.raises(ConfigError, match=r"mmlu_bad_columns\.csv: line 3: expected 6 columns"):
        load_mmlu(FIXTURES / "mmlu_bad_columns.csv")


def test_mmlu_csv_bad_letter() -> None:
    with pytest.raises(ConfigError, match="line 3: answer must be one of A, B, C, D"):
        load_mmlu(FIXTURES / "mmlu_bad_letter.csv")


def test_mmlu_jsonl() -> None:
    task = load_mmlu(FIXTURES / "mmlu_mini.jsonl")
    assert [it.answer for it in task] == ["B", "B", "D"]
    assert task.items[0].metadata["subject"] == "high school biology"
    assert "about high school biology" in task.items[0].direct_prompt
    assert task.items[2].metadata["subject"] == ""
    assert task.items[2].cot_prompt.startswith("Which planet is closest to the Sun?")


def test_mmlu_jsonl_answer_out_of_range() -> None:
    with pytest.raises(ConfigError, match="line 3: field 'answer'"):
        load_mmlu(FIXTURES / "mmlu_bad.jsonl")


def test_musique() -> None:
    task = load_musique(FIXTURES / "musique_mini.jsonl")
    assert len(task) == 2 and task.kind == "context"  # unanswerable item skipped
    first = task.items[0]
    assert first.id == "musique-2hop_001"
    assert first.answer == "Norway" and first.aliases == ("Kingdom of Norway",)
    assert "Document [1] (Title: The Copper Lantern)" in first.cot_prompt
    assert "Question: In which country" in first.direct_prompt
    assert "Glass Harbour" in first.context
    assert task.grade("She was born in Norway.\nAnswer: Norway", first)
    assert task.grade("Answer: the River Lune", task.items[1])


def test_musique_options() -> None:
    supporting = load_musique(FIXTURES / "musique_mini.jsonl", supporting_only=True)
    assert "Glass Harbour" not in supporting.items[0].context
    full = load_musique(FIXTURES / "musique_mini.jsonl", include_unanswerable=True)
    assert len(full) == 3
    unanswerable = full.items[2]
    assert unanswerable.metadata["answerable"] is False
    assert full.grade("Answer: I don't know", unanswerable)
    assert not full.grade("Answer: Petra Holm", unanswerable)


def test_musique_bad_paragraphs() -> None:
    with pytest.raises(ConfigError, match=r"musique_bad\.jsonl: line 3: field 'paragraphs'"):
        load_musique(FIXTURES / "musique_bad.jsonl")


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("gsm8k_mini.jsonl", "gsm8k"),
        ("mmlu_mini.jsonl", "mmlu"),
        ("geography_test.csv", "mmlu"),
        ("musique_mini.jsonl", "musique"),
        ("items_mini.jsonl", "items"),
    ],
)
def test_sniff_format(name: str, fmt: str) -> None:
    assert sniff_format(FIXTURES / name) == fmt
    assert get_task(FIXTURES / name).items  # get_task sniffs the same way


def test_sniff_unknown_format() -> None:
    with pytest.raises(ConfigError, match="line 1: cannot tell the dataset format"):
        get_task(FIXTURES / "unknown_format.jsonl")


def test_sniff_names_first_malformed_line(tmp_path: Path) -> None:
    bad = tmp_path / "x.jsonl"
    bad.write_text("\n\n[1, 2]\n")
    with pytest.raises(ConfigError, match="line 3: expected a JSON object"):
        get_task(bad)


def test_load_task_explicit_format_and_limit() -> None:
    task = load_task(FIXTURES / "gsm8k_mini.jsonl", format="gsm8k", limit=1, name="mine")
    assert task.name == "mine" and len(task) == 1
    with pytest.raises(ConfigError, match="limit must be >= 1"):
        load_task(FIXTURES / "gsm8k_mini.jsonl", limit=0)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        get_task(empty)
    with pytest.raises(ConfigError, match="holds no usable items"):
        load_gsm8k(empty)
    with pytest.raises(ConfigError, match="Cannot read"):
        load_gsm8k(tmp_path / "missing.jsonl")


def test_your_own_items() -> None:
    task = load_items(FIXTURES / "items_mini.jsonl")
    assert task.name == "items:items_mini" and task.answer_type == "text"
    assert [it.id for it in task] == ["item-key", "item-L2", "item-L4"]  # blank line skipped
    assert [it.answer for it in task] == ["under the blue flowerpot", "42", "Paris"]
    assert task.items[2].aliases == ("Paris, France",)
    assert task.items[0].question in task.items[0].cot_prompt
    assert task.grade("It is under the blue flowerpot.", task.items[0])
    assert task.grade("The Louvre is in Paris, France", task.items[2])
    assert not task.grade("Lyon", task.items[2])
    assert len(load_items(FIXTURES / "items_mini.jsonl", limit=1)) == 1
    with pytest.raises(ConfigError, match="line 2: field 'answer' must be a non-empty string"):
        load_items(FIXTURES / "items_bad.jsonl")
