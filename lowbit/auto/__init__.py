"""Automatic mixed precision: which scheme each tensor gets under a size budget.

``sensitivity`` estimates, from calibration statistics, the output error every candidate scheme
would cause in every tensor; ``knapsack`` picks one candidate per tensor minimising the summed
error under the budget (exactly, in stored bits); ``allocate`` turns the choice into a plain recipe
(or GGUF per-tensor types) and says why each tensor got what it got; ``pareto`` quantizes at a row
of budgets and plots quality against size. This layer sits above ``pipeline`` and below ``api``.
"""

from lowbit.auto.allocate import Allocation, allocate, allocate_gguf
from lowbit.auto.budget import Budget, parse_size
from lowbit.auto.candidates import GGUF_CANDIDATES, LOWBIT_CANDIDATES, HEAD_CANDIDATES, Candidate

__all__ = ["Allocation", "Budget", "Candidate", "GGUF_CANDIDATES", "HEAD_CANDIDATES", "LOWBIT_CANDIDATES",
           "allocate", "allocate_gguf", "parse_size"]
