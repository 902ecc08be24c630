"""The multiple-choice knapsack: one option per item, least total error, total cost under a budget.

Solved exactly by dynamic programming over cost. Costs are stored bits, whose greatest common
divisor is usually large (whole rows of codes and scales); when ``capacity / gcd`` would still
exceed ``max_cells``, costs are rounded *up* to a coarser unit, so the answer stays within the
budget in true bits (it is then exact for the rounded costs, and at most ``n_items`` units from
the true optimum's spending).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def solve_mckp(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int, *,
               max_cells: int = 400_000) -> list[int]:
    """Index of the option chosen for each item, minimising ``sum(errors[i][choice[i]])`` subject to
    ``sum(costs[i][choice[i]]) <= budget``.

    Args:
        costs: per item, the non-negative integer cost of each option (at least one option each).
        errors: per item, the error of each option (same shape as ``costs``); finite.
        budget: the total cost allowed.
        max_cells: the most budget steps the table may have (memory: items x cells bytes).

    Raises:
        ValueError: mismatched shapes, an item without options, or a budget below the cheapest choice
            (the message gives the cheapest total).
    """
    if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise ValueError("every item needs at least one option, with one cost and one error per option")
    cheapest = sum(min(c) for c in costs)
    if budget < cheapest:
        raise ValueError(f"budget {budget} is below the cheapest choice, {cheapest}")
    # Spend counted above each item's cheapest option, in units of the costs' common divisor.
    extra = [[int(x) - min(c) for x in c] for c in costs]
    room = budget - cheapest
    unit = math.gcd(*[x for e in extra for x in e if x]) if any(x for e in extra for x in e) else 1
    if room // unit > max_cells:
        unit = -(-room // max_cells)
    steps = [np.array([-(-x // unit) for x in e], dtype=np.int64) for e in extra]
    cells = room // unit
    best = np.zeros(cells + 1)  # least error of the items so far, spending at most c units
    choice = np.zeros((len(steps), cells + 1), dtype=np.int16)
    for i, (step, err) in enumerate(zip(steps, errors)):
        new = np.full(cells + 1, np.inf)
        for j, (s, e) in enumerate(zip(step, err)):
            if s > cells:
                continue
            candidate = np.full(cells + 1, np.inf)
            candidate[s:] = best[:cells + 1 - s] + float(e)
            better = candidate < new
            new[better] = candidate[better]
            choice[i, better] = j
        best = new
    picked, c = [], cells
    for i in range(len(steps) - 1, -1, -1):
        j = int(choice[i, c])
        picked.append(j)
        c -= int(steps[i][j])
    return picked[::-1]
