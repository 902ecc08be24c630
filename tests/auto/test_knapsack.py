"""The multiple-choice knapsack against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from lowbit.auto.knapsack import solve_mckp


def _brute(costs, errors, budget):
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        if sum(c[j] for c, j in zip(costs, pick)) <= budget:
            err = sum(e[j] for e, j in zip(errors, pick))
            if best is None or err < best - 1e-12:
                best = err
    return best


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_on_small_cases(seed):
    rng = random.Random(seed)
    items = rng.randint(1, 5)
    costs = [[rng.randint(1, 12) * 3 for _ in range(rng.randint(1, 4))] for _ in range(items)]
    errors = [[rng.random() for _ in c] for c in costs]
    lo, hi = sum(map(min, costs)), sum(map(max, costs))
    budget = rng.randint(lo, hi)
    pick = solve_mckp(costs, errors, budget)
    assert sum(c[j] for c, j in zip(costs, pick)) <= budget
    assert sum(e[j] for e, j in zip(errors, pick)) == pytest.approx(_brute(costs, errors, budget))


def test_coarse_units_stay_within_the_budget():
    rng = random.Random(1)
    costs = [[rng.randint(10_000, 90_000) for _ in range(4)] for _ in range(6)]
    errors = [[1.0 / c for c in row] for row in costs]
    budget = sum(map(min, costs)) + 77_777
    pick = solve_mckp(costs, errors, budget, max_cells=50)  # forces rounding up to coarse units
    assert sum(c[j] for c, j in zip(costs, pick)) <= budget


def test_budget_below_the_cheapest_choice_is_refused():
    with pytest.raises(ValueError, match="below the cheapest choice, 5"):
        solve_mckp([[2, 4], [3]], [[1.0, 0.5], [0.1]], 4)
