"""Evaluation that tells the truth: perplexity, KL and top-1 against the original, size, speed, memory."""

from lowbit.evaluate.perplexity import EvalResult, evaluate_windows
from lowbit.evaluate.size import SizeReport, size_report
from lowbit.evaluate.text import default_eval_path, read_text, token_windows

__all__ = ["EvalResult", "SizeReport", "default_eval_path", "evaluate_windows", "read_text", "size_report",
           "token_windows"]
