"""Task metrics of the paper's evaluation (§5.1): Spider execution accuracy, GSM8K exact match, HellaSwag
normalised accuracy; the LLM-Adapters test sets of Routed-PEFT (accuracy of a parsed greedy answer)."""

# Importing a task's module registers its evaluator (evaluation.registry): a new task is one more import here.
from .common import EvalResult
from .config import EvalConfig
from .evaluate import evaluate, load_task_rows
from .facts import evaluate_facts
from .gsm8k import evaluate_gsm8k, extract_answer
from .hellaswag import evaluate_hellaswag
from .llm_adapters import evaluate_llm_adapters
from .registry import EVAL_SPLITS, EVAL_TASKS, EvalTask, ScoreContext, get_eval_task, register_eval_task
from .spider import (
    QueryError,
    QueryTimeout,
    SqlSandbox,
    cut_sql,
    evaluate_spider,
    execute_sql,
    execution_match,
    results_match,
)

__all__ = [
    "EVAL_SPLITS",
    "EVAL_TASKS",
    "EvalConfig",
    "EvalResult",
    "EvalTask",
    "QueryError",
    "QueryTimeout",
    "ScoreContext",
    "SqlSandbox",
    "cut_sql",
    "evaluate",
    "evaluate_facts",
    "evaluate_gsm8k",
    "evaluate_hellaswag",
    "evaluate_llm_adapters",
    "evaluate_spider",
    "execute_sql",
    "execution_match",
    "extract_answer",
    "get_eval_task",
    "load_task_rows",
    "register_eval_task",
    "results_match",
]
