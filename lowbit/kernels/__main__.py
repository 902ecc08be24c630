"""``python -m lowbit.kernels``: build the compiled kernels now (``make setup`` runs it) and say so."""

import sys

from lowbit.kernels import status
from lowbit.kernels.build import build_dir

problem = status()
print(f"lowbit kernels: {problem}" if problem else f"lowbit kernels ready in {build_dir()}")
sys.exit(0 if problem is None or problem.startswith("disabled") or problem.startswith("CPU lacks") else 1)
