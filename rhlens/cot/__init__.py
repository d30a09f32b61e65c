"""Chain-of-thought vs direct-answer tasks for the retrieval-head masking experiment.

Wu et al. (2024) report that masking retrieval heads hurts chain-of-thought answers far
more than direct answers from the model's own knowledge. This package holds the offline
half of that experiment: items and tasks asked both ways (:mod:`~rhlens.cot.items`, also
from your own ``(prompt, answer)`` pairs with :func:`as_task`), the built-in tasks
(:mod:`~rhlens.cot.data`) and the registry that names them (:mod:`~rhlens.cot.tasks`),
loaders for GSM8K / MMLU / MuSiQue files (:mod:`~rhlens.cot.loaders`), and the answer
extractors and scorers that grade free-form generations (:mod:`~rhlens.cot.extract`). The
run itself, with the model, is :func:`rhlens.cot.experiment.cot_ablation`.

Modules import one way only: extract <- items <- data, loaders <- tasks <- experiment.
"""

from rhlens.cot.experiment import CoTConfig, CoTResult, cot_ablation
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
from rhlens.cot.items import Question, as_task
from rhlens.cot.loaders import (
    load_gsm8k,
    load_items,
    load_mmlu,
    load_musique,
    load_task,
    sniff_format,
)
from rhlens.cot.tasks import (
    Task,
    TaskItem,
    get_task,
    list_tasks,
    make_prompts,
    register_task,
)

__all__ = [
    "CoTConfig",
    "CoTResult",
    "Question",
    "Task",
    "TaskItem",
    "as_task",
    "cot_ablation",
    "extract_choice",
    "extract_number",
    "extract_text",
    "get_task",
    "is_refusal",
    "list_tasks",
    "load_gsm8k",
    "load_items",
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
