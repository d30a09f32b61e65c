"""Chain-of-thought vs direct-answer tasks for the retrieval-head masking experiment.

Wu et al. (2024) report that masking retrieval heads hurts chain-of-thought answers far
more than direct answers from the model's own knowledge. This package holds the offline
half of that experiment: tasks asked both ways (:mod:`~rhlens.cot.tasks`), loaders for
GSM8K / MMLU / MuSiQue files (:mod:`~rhlens.cot.loaders`), and the answer extractors and
scorers that grade free-form generations (:mod:`~rhlens.cot.extract`).
"""

from rhlens.cot.extract import (
    extract_choice,
    extract_number,
    extract_text,
    is_refusal,
    normalize_text,
    score_choice,
    score_number,
    score_text,
)
from rhlens.cot.loaders import load_gsm8k, load_mmlu, load_musique, load_task, sniff_format
from rhlens.cot.tasks import (
    Task,
    TaskItem,
    get_task,
    list_tasks,
    make_prompts,
    register_task,
)

__all__ = [
    "Task",
    "TaskItem",
    "extract_choice",
    "extract_number",
    "extract_text",
    "get_task",
    "is_refusal",
    "list_tasks",
    "load_gsm8k",
    "load_mmlu",
    "load_musique",
    "load_task",
    "make_prompts",
    "normalize_text",
    "register_task",
    "score_choice",
    "score_number",
    "score_text",
    "sniff_format",
]
