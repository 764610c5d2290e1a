"""Task metrics of the paper's evaluation (§5.1): Spider execution accuracy, GSM8K exact match, HellaSwag
normalised accuracy; the LLM-Adapters test sets of Routed-PEFT (accuracy of a parsed greedy answer)."""

from .common import EvalResult
from .evaluate import EVAL_SPLITS, evaluate, load_task_rows
from .gsm8k import evaluate_gsm8k, extract_answer
from .hellaswag import evaluate_hellaswag
from .llm_adapters import evaluate_llm_adapters
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
    "EvalResult",
    "QueryError",
    "QueryTimeout",
    "SqlSandbox",
    "cut_sql",
    "evaluate",
    "evaluate_gsm8k",
    "evaluate_hellaswag",
    "evaluate_llm_adapters",
    "evaluate_spider",
    "execute_sql",
    "execution_match",
    "extract_answer",
    "load_task_rows",
    "results_match",
]
