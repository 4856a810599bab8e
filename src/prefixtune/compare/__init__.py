"""`prefixtune compare`: several methods on the same model, data, budget and evaluation, one process per run.

settings.py   what a comparison runs (compare.json) and the parsing of its flags
sweep.py      the learning-rate sweep: the rates each method tries, the winner
run.py        the plan (sweep runs, then one run per method, train size and seed), running or reusing them
process.py    one worker process: start, progress, errors; the directory lock
worker.py     one run in its own process: `python -m prefixtune.compare.worker --job JOB.json`
intervals.py  bootstrap intervals over test inputs, the sweep's tables
report.py     report.md / report.html, the tables and the plots
"""

from .report import GENERATION_METRICS, main_table, markdown
from .run import Job, Plan, plan, run_compare, write_job
from .settings import (
    CompareSettings,
    parse_factors,
    parse_methods,
    parse_rate_lists,
    parse_seeds,
    parse_sizes,
    route_overrides,
)

__all__ = [
    "GENERATION_METRICS",
    "CompareSettings",
    "Job",
    "Plan",
    "main_table",
    "markdown",
    "parse_factors",
    "parse_methods",
    "parse_rate_lists",
    "parse_seeds",
    "parse_sizes",
    "plan",
    "route_overrides",
    "run_compare",
    "write_job",
]
