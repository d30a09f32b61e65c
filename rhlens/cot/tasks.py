"""The task registry: built-in tasks by name, dataset files by path.

:func:`get_task` returns a registered task (the built-ins of :mod:`rhlens.cot.data`, or
your own added with :func:`register_task`) or loads a GSM8K / MMLU / MuSiQue file through
:mod:`rhlens.cot.loaders`. The item and task classes live in :mod:`rhlens.cot.items` and are
re-exported here, where they have always been imported from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rhlens.cot.data import BUILTIN_TASKS
from rhlens.cot.extract import Extractor, Scorer
from rhlens.cot.items import COT_INSTRUCTION, DIRECT_INSTRUCTION, Task, TaskItem, make_prompts
from rhlens.cot.loaders import load_task
from rhlens.errors import ConfigError

__all__ = [
    "COT_INSTRUCTION",
    "DIRECT_INSTRUCTION",
    "Extractor",
    "Scorer",
    "Task",
    "TaskItem",
    "get_task",
    "list_tasks",
    "make_prompts",
    "register_task",
]

# ----------------------------------------------------------------------------- registry

TaskFactory = Callable[..., Task]
_REGISTRY: dict[str, TaskFactory] = {}


def register_task(name: str, factory: TaskFactory | Task, *, overwrite: bool = False) -> None:
    """Make ``get_task(name)`` return a task.

    Args:
        name: registry key (case-insensitive).
        factory: a :class:`Task`, or a callable building one from keyword arguments
            (``seed``, ``n``, ...) that :func:`get_task` passes through.
        overwrite: replace an existing registration instead of raising.

    Raises:
        ConfigError: the name is taken and ``overwrite`` is false.
    """
    key = name.strip().lower()
    if not key:
        raise ConfigError("A task name cannot be empty.")
    if key in _REGISTRY and not overwrite:
        raise ConfigError(f"A task named {name!r} is already registered; pass overwrite=True to replace it.")
    if isinstance(factory, Task):
        task = factory

        def _fixed(**kwargs: Any) -> Task:
            if kwargs:
                raise ConfigError(
                    f"Task {name!r} was registered as a fixed task and takes no options "
                    f"(got {sorted(kwargs)})."
                )
            return task

        _REGISTRY[key] = _fixed
    else:
        _REGISTRY[key] = factory


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(_REGISTRY)


def get_task(name_or_path: str | Path, **kwargs: Any) -> Task:
    """A registered task by name, or a dataset file loaded by :mod:`rhlens.cot.loaders`.

    Args:
        name_or_path: a name from :func:`list_tasks`, or the path of a GSM8K / MMLU /
            MuSiQue file (JSONL or, for MMLU, CSV); the format is sniffed from the file.
        **kwargs: passed to the task's factory (built-ins take ``seed`` and ``n``) or to
            :func:`rhlens.cot.loaders.load_task` (``format``, ``limit``, ...).

    Raises:
        ConfigError: unknown name and no such file, or a malformed file.
    """
    key = str(name_or_path).strip().lower()
    if isinstance(name_or_path, str) and key in _REGISTRY:
        return _REGISTRY[key](**kwargs)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return load_task(path, **kwargs)
    raise ConfigError(
        f"No task named {str(name_or_path)!r} and no such file. Registered tasks: "
        f"{', '.join(list_tasks())}; or pass the path of a GSM8K/MMLU/MuSiQue file."
    )


for _name, _factory in BUILTIN_TASKS.items():
    register_task(_name, _factory)
