"""`python -m eval`: LLM-Adapters' math and commonsense evaluation, batched and jitted."""

from eval.extract import extract_letter, extract_number, extract_option, number_correct
from eval.tasks import TASKS, Task, get_task

__all__ = ["TASKS", "Task", "get_task", "extract_letter", "extract_number", "extract_option",
           "number_correct"]
