"""Datasets: the task registry (``tasks``), calibration and fine-tuning examples, and the registered tasks."""

# Importing the package registers the built-in tasks beyond tasks.py's own: the other calibration datasets of
# §3 and the LLM-Adapters tasks. They import tasks.py, so they are registered here rather than from it.
from . import hub_tasks, llm_adapters  # noqa: F401
