"""`prefixtune compare`: several methods on the same model, data, budget and evaluation, one process per run.

    run.py     the plan (one job per method, train size and seed), running or reusing the workers, results.json
    worker.py  one run in its own process: `python -m prefixtune.compare.worker --job JOB.json`
    report.py  report.md / report.html, the tables and the plots
"""

from .report import main_table, markdown
from .run import CompareSettings, parse_methods, parse_seeds, parse_sizes, plan, route_overrides, run_compare, write_job

__all__ = [
    "CompareSettings",
    "main_table",
    "markdown",
    "parse_methods",
    "parse_seeds",
    "parse_sizes",
    "plan",
    "route_overrides",
    "run_compare",
    "write_job",
]
