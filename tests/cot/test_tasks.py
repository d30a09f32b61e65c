"""Task registry, prompts and built-in tasks (no model needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rhlens.cot import tasks as tasks_mod
from rhlens.cot.extract import extract_number, extract_text, score_number, score_text
from rhlens.cot.tasks import Task, TaskItem, get_task, list_tasks, make_prompts, register_task
from rhlens.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"
BUILTINS = ("arithmetic", "capitals", "counts", "lookup")


def _task(name: str = "t", n: int = 2) -> Task:
    items = tuple(
        TaskItem(id=f"i{k}", question="q", answer=str(k), cot_prompt="c", direct_prompt="d") for k in range(n)
    )
    return Task(
        name=name,
        items=items,
        kind="knowledge",
        extractor=extract_number,
        scorer=score_number,
        answer_type="number",
    )


def test_builtins_registered() -> None:
    assert set(BUILTINS) <= set(list_tasks())
    assert list_tasks() == sorted(list_tasks())


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_deterministic_for_seed(name: str) -> None:
    a, b = get_task(name, seed=3), get_task(name, seed=3)
    assert a.items == b.items
    assert a.items != get_task(name, seed=4).items


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_items_well_formed(name: str) -> None:
    task = get_task(name, n=20)
    assert len(task) == 20
    assert task.kind == ("context" if name in ("arithmetic", "lookup") else "knowledge")
    assert len({it.id for it in task}) == 20
    for item in task:
        assert item.question in item.cot_prompt and item.question in item.direct_prompt
        assert "step by step" in item.cot_prompt and '"Answer: <' in item.cot_prompt
        assert item.direct_prompt.rstrip().endswith(".")
        assert "Answer with just the" in item.direct_prompt
        assert item.cot_prompt.split("\n\n")[0] == item.direct_prompt.split("\n\n")[0]
        # The gold answer, written the way the prompt asks, scores as correct...
        assert task.grade(f"Let me think.\nAnswer: {item.answer}", item)
        assert task.grade(item.answer, item)
        # ...and a refusal does not.
        assert not task.grade("I don't know.", item)
        if task.kind == "context":
            assert item.context and item.context in item.cot_prompt
        else:
            assert not item.context


def test_arithmetic_answer_follows_from_context() -> None:
    """Recompute every gold total from the sentences of the prompt."""
    for steps, ops, top in ((1, "add", 5), (2, "add", 9), (1, "mixed", 5), (3, "mixed", 9)):
        for item in get_task("arithmetic", n=25, seed=7, steps=steps, ops=ops, max_operand=top):
            numbers = [int(x) for x in re.findall(r"\d+", item.context)]
            assert len(numbers) == steps + 1
            assert 2 <= numbers[0] <= top and all(1 <= k <= top for k in numbers[1:])
            total = numbers[0]
            clauses = item.context.split(". ")[1:]
            for k, clause in zip(numbers[1:], clauses):
                gains = any(w in clause for w in ("buys", "finds", "gets"))
                assert gains or ops == "mixed"
                total += k if gains else -k
                assert total >= 0
            assert str(total) == item.answer
            assert item.metadata == {"steps": steps, "ops": ops, "max_operand": top}


def test_lookup_answer_is_the_chained_country() -> None:
    for item in get_task("lookup", n=25, seed=2, people=3):
        person = re.match(r"In which country does (\w+) live\?", item.question).group(1)
        town = re.search(rf"{person} lives in the town of (\w+)\.", item.context).group(1)
        country = re.search(rf"town of {town} is in the country of (\w+)\.", item.context).group(1)
        assert country == item.answer
        assert len(item.distractors) == 2 and item.answer not in item.distractors


def test_builtin_options_validated() -> None:
    with pytest.raises(ConfigError, match="n >= 1"):
        get_task("arithmetic", n=0)
    with pytest.raises(ConfigError, match="too many"):
        get_task("capitals", n=10_000)
    with pytest.raises(ConfigError, match="steps"):
        get_task("arithmetic", steps=0)
    with pytest.raises(ConfigError, match="max_operand"):
        get_task("arithmetic", max_operand=1)
    with pytest.raises(ConfigError, match="ops"):
        get_task("arithmetic", ops="multiply")


def test_make_prompts_shares_body() -> None:
    cot, direct = make_prompts("  What is 2 + 2? ", "number")
    assert cot.startswith("What is 2 + 2?\n\n") and direct.startswith("What is 2 + 2?\n\n")
    assert "Answer: <number>" in cot
    assert direct.endswith("Answer with just the number.")


def test_item_prompt_modes() -> None:
    item = _task().items[0]
    assert item.prompt("cot") == "c" and item.prompt("direct") == "d"


def test_task_validation() -> None:
    with pytest.raises(ConfigError, match="no items"):
        Task(name="e", items=(), kind="context", extractor=extract_text, scorer=score_text)
    dup = (_task().items[0], _task().items[0])
    with pytest.raises(ConfigError, match="two items with id"):
        Task(name="d", items=dup, kind="context", extractor=extract_text, scorer=score_text)


def test_task_accuracy_and_head() -> None:
    task = _task(n=4)
    assert task.accuracy(["Answer: 0", "1", "wrong", "I don't know"]) == 0.5
    with pytest.raises(ConfigError, match="4 items but got 1"):
        task.accuracy(["0"])
    assert len(task.head(2)) == 2 and task.head(2).name == task.name


def test_register_and_get(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks_mod, "_REGISTRY", dict(tasks_mod._REGISTRY))
    fixed = _task("mine")
    register_task("Mine", fixed)
    assert get_task("mine") is fixed
    assert "mine" in list_tasks()
    with pytest.raises(ConfigError, match="already registered"):
        register_task("mine", fixed)
    with pytest.raises(ConfigError, match="takes no options"):
        get_task("mine", n=3)
    register_task("mine", lambda n=2: _task("mine", n), overwrite=True)
    assert len(get_task("mine", n=5)) == 5


def test_get_task_unknown() -> None:
    with pytest.raises(ConfigError, match="No task named 'nope'"):
        get_task("nope")


def test_get_task_sniffs_files() -> None:
    assert get_task(FIXTURES / "gsm8k_mini.jsonl").name == "gsm8k:gsm8k_mini"
    assert get_task(str(FIXTURES / "mmlu_mini.jsonl")).answer_type == "choice"
    assert get_task(FIXTURES / "geography_test.csv").kind == "knowledge"
    assert get_task(FIXTURES / "musique_mini.jsonl", limit=1).kind == "context"
