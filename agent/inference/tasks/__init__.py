"""Tasks by the id a bundle's manifest names.

Built-in tasks are listed here; a package adds one through the entry-point group `edge_agent.tasks`
(name = task id, value = "module:Class"). Nothing is imported until a bundle asks for it.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from agent.errors import ModelError

ENTRY_POINTS = "edge_agent.tasks"
BUILT_IN: dict[str, str] = {
    "mnist-digits": "agent.inference.tasks.mnist_digits:MnistDigitsTask",
    "detection": "agent.inference.tasks.detection:DetectionTask",
}


def known_tasks() -> dict[str, str]:
    """Task id -> "module:Class", built-in ones first; an installed plugin cannot replace a built-in."""
    plugins = {point.name: point.value for point in entry_points(group=ENTRY_POINTS)}
    return {**plugins, **BUILT_IN}


def task_class(task_id: str) -> type:
    """The Task class for a task id, or a ModelError naming the tasks this agent knows."""
    known = known_tasks()
    if task_id not in known:
        raise ModelError(f"model asks for task {task_id!r}, which this agent does not know ({', '.join(known)}); update the agent or install the task's package")
    module, _, name = known[task_id].partition(":")
    return getattr(importlib.import_module(module), name)
